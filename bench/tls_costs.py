"""What one TLS connection costs the master: memory per session, CPU per handshake.

In-process, no network: N server-side :class:`rpicluster.tls.ServerTls`
sessions over memory BIOs, each with a client of its own certificate (made with
tests/tlscerts.py as the roles make them): the handshake, a hello of a real
Pi's size, heartbeats both ways, and (``--reply``) one large reply such as a
dashboard's cluster query. Each session is kept, as the master keeps its
connections, and the growth is divided by N.

Two measures: RSS growth, and the bytes glibc's malloc holds in use (mallinfo2,
read with ctypes: a bench-only look inside the process), which tells live
OpenSSL state from heap fragmentation. ``--steps`` splits one session's cost
into OpenSSL's parts: the SSL object alone, a handshake without a client
certificate, and the client certificate's share.

    python -m bench.tls_costs --sessions 2000
    python -m bench.tls_costs --sessions 2000 --tickets 2 --no-slices   # as before
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report  # noqa: E402
from rpicluster import tls  # noqa: E402
from tests import tlscerts  # noqa: E402
from tests.tlscerts import CA  # noqa: E402

HELLO_SIZE = 700  # a Pi's hello with its details is 600-700 bytes of JSON


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        )
    ]


def malloc_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (0 where unknown)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return 0
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def session(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, reply: int = 0
) -> tuple[tls.ServerTls, float]:
    """One handshake, a hello, heartbeats, an optional reply; the server side, its CPU s."""
    server = tls.ServerTls(server_ctx)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    cpu = 0.0
    done = False
    while not (done and server.ready):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        data = outgoing.read()
        if data:
            start = time.process_time()
            server.feed(data)
            back = server.output()
            cpu += time.process_time() - start
            incoming.write(back)
    client.write(b"h" * HELLO_SIZE)
    server.feed(outgoing.read())
    for _ in range(3):
        client.write(b"h" * 50)
        server.feed(outgoing.read())
        incoming.write(server.encrypt(b"a" * 30))
        client.read(100)
    if reply:
        incoming.write(server.encrypt(b"r" * reply))
        received = 0
        while received < reply:
            received += len(client.read(65536))
    return server, cpu


def per_session(make: Callable[[], object], count: int) -> tuple[float, float]:
    """KiB of RSS and of malloc in use per kept object that ``make`` returns."""
    process = psutil.Process()
    for _ in range(10):  # warm: first-use allocations are not per session
        make()
    gc.collect()
    rss0, used0 = process.memory_info().rss, malloc_in_use()
    kept = [make() for _ in range(count)]
    gc.collect()
    rss = (process.memory_info().rss - rss0) / count / 1024
    used = (malloc_in_use() - used0) / count / 1024
    del kept
    return rss, used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument(
        "--tickets", type=int, default=None, help="server num_tickets (default: tls.py's, 0)"
    )
    parser.add_argument(
        "--no-slices", action="store_true", help="whole writes into the BIOs (as before)"
    )
    parser.add_argument(
        "--reply", type=int, default=0, help="one reply of this many bytes to each session"
    )
    parser.add_argument("--steps", action="store_true", help="split the cost into OpenSSL's parts")
    parser.add_argument(
        "--client-key",
        choices=("p256", "ed25519"),
        default="p256",
        help="the Pis' key type (the roles make ECDSA P-256; ed25519 to compare)",
    )
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    args = parser.parse_args()
    if args.no_slices:
        tls.IN_SLICE = tls.OUT_SLICE = 1 << 30
    ca = CA(Path(tempfile.mkdtemp(prefix="rpicluster-tls-costs-")))
    server_ctx = tls.server_context(ca.master("master"))
    if args.tickets is not None:
        server_ctx.num_tickets = args.tickets
    if args.client_key == "ed25519":
        from unittest import mock

        from cryptography.hazmat.primitives.asymmetric import ed25519

        with mock.patch.object(
            tlscerts.ec, "generate_private_key", lambda _curve: ed25519.Ed25519PrivateKey.generate()
        ):
            client_ctx = tls.client_context(ca.issue("pi"))
    else:
        client_ctx = tls.client_context(ca.issue("pi"))
    cpu: list[float] = []

    def one() -> tls.ServerTls:
        server, spent = session(server_ctx, client_ctx, args.reply)
        cpu.append(spent)
        return server

    load = os.getloadavg()[0]
    rss, used = per_session(one, args.sessions)
    lines = [
        f"{args.sessions} server-side sessions ({ssl.OPENSSL_VERSION};"
        f" num_tickets {server_ctx.num_tickets}; BIO slices"
        f" {'off' if args.no_slices else f'{tls.IN_SLICE} in, {tls.OUT_SLICE} out'};"
        f" client key {args.client_key}; hello {HELLO_SIZE} B; reply {args.reply} B):"
        f" {rss:.1f} KiB of RSS,"
        f" {used:.1f} KiB of malloc in use each; {sum(cpu) / len(cpu) * 1000:.2f} ms"
        f" of server CPU per handshake (machine load {load:.1f}/{os.getloadavg()[0]:.1f});"
        f" server session cache {server_ctx.session_stats()}"
    ]
    if args.steps:
        count = max(200, args.sessions // 2)
        bare = tls.server_context(ca.master("bare"))
        bare.verify_mode = ssl.CERT_NONE  # no client certificate asked for
        steps = [
            ("the SSL object and its two BIOs, no handshake", lambda: tls.ServerTls(server_ctx)),
            (
                "after a handshake without a client certificate",
                lambda: session(bare, client_ctx)[0],
            ),
            (
                "after a handshake with the client's certificate",
                lambda: session(server_ctx, client_ctx)[0],
            ),
        ]
        for label, make in steps:
            _, step_used = per_session(make, count)
            lines.append(f"{label}: {step_used:.1f} KiB of malloc in use each")
    if args.no_append:
        print("\n".join(lines))
    else:
        report.append("tls_costs: what one TLS connection costs the master", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
