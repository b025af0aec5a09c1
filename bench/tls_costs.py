"""What one TLS connection costs the master: RSS per session, CPU per handshake.

In-process, no network: N server-side :class:`rpicluster.tls.ServerTls`
sessions over memory BIOs, each with a client of its own certificate (made with
tests/tlscerts.py as the roles make them), one heartbeat-sized record each way.

    python -m bench.tls_costs --sessions 2000
"""

from __future__ import annotations

import argparse
import gc
import ssl
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rpicluster import tls  # noqa: E402
from tests.tlscerts import CA  # noqa: E402


def session(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[tls.ServerTls, float]:
    """One handshake and a record each way; the server side and its CPU seconds."""
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
    client.write(b"h" * 50)
    server.feed(outgoing.read())
    incoming.write(server.encrypt(b"a" * 30))
    client.read(100)
    return server, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    ca = CA(Path(tempfile.mkdtemp(prefix="rpicluster-tls-costs-")))
    server_ctx = tls.server_context(ca.master("master"))
    client_ctx = tls.client_context(ca.issue("pi"))
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    kept, cpu = [], 0.0
    for _ in range(args.sessions):
        server, spent = session(server_ctx, client_ctx)
        kept.append(server)
        cpu += spent
    gc.collect()
    per = (process.memory_info().rss - before) / args.sessions / 1024
    print(f"{args.sessions} server-side sessions ({ssl.OPENSSL_VERSION}): {per:.1f} KiB of RSS")
    print(f"each; {cpu / args.sessions * 1000:.2f} ms of server CPU per handshake")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
