"""The master's TLS layer over memory BIOs (rpicluster.tls.ServerTls), in memory.

Why these matter: a memory BIO keeps the capacity of the largest write it held
for the life of its connection, so ServerTls moves ciphertext in slices; and
slaves never resume sessions, so the master sends no session tickets. These
tests check what crosses: the exact plaintext whatever the chunking, records no
larger than a slice, no ticket a client could use.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
from pathlib import Path

import pytest

from rpicluster import tls as tlsmod
from tests.tlscerts import CA


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = CA(Path(tmp_path_factory.mktemp("pki")))
    return tlsmod.server_context(ca.master("master")), tlsmod.client_context(ca.issue("pi"))


class Pair:
    """A ServerTls and a client SSLObject joined by hand, bytes moved by the test."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.server = tlsmod.ServerTls(server_ctx)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def to_server(self, chunk: int) -> bytes:
        """The client's pending ciphertext fed to the server ``chunk`` bytes at a time."""
        data = self.outgoing.read()
        plain = b"".join(self.server.feed(data[i : i + chunk]) for i in range(0, len(data), chunk))
        self.incoming.write(self.server.output())
        return plain

    def handshake(self, chunk: int = 65536) -> None:
        for _ in range(10):
            with contextlib.suppress(ssl.SSLWantReadError):
                self.client.do_handshake()
            self.to_server(chunk)
            if self.server.ready and self.client.version() is not None:
                return
        raise AssertionError("no handshake after 10 flights")

    def client_reads(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += self.client.read(65536)
        return out


def records(data: bytes) -> list[int]:
    """Lengths of the TLS records in ``data`` (5-byte headers), checking they tile it."""
    lengths, i = [], 0
    while i < len(data):
        (length,) = struct.unpack(">H", data[i + 3 : i + 5])
        lengths.append(length)
        i += 5 + length
    assert i == len(data)
    return lengths


@pytest.mark.parametrize("chunk", [1, 100, tlsmod.IN_SLICE, tlsmod.IN_SLICE + 1, 70000])
def test_the_plaintext_arrives_whole_whatever_the_chunking(contexts, chunk):
    pair = Pair(*contexts)
    pair.handshake(chunk)
    message = bytes(range(256)) * 400  # 100 KiB: several records, many slices
    pair.client.write(message)
    assert pair.to_server(chunk) == message
    pair.client.write(b"heartbeat")
    assert pair.to_server(chunk) == b"heartbeat"


def test_a_large_reply_goes_out_in_records_of_one_slice(contexts):
    pair = Pair(*contexts)
    pair.handshake()
    reply = b"r" * 200_000
    wire = pair.server.encrypt(reply)
    lengths = records(wire)
    assert len(lengths) >= len(reply) // tlsmod.OUT_SLICE
    assert max(lengths) <= tlsmod.OUT_SLICE + 256  # the AEAD tag and padding only
    pair.incoming.write(wire)
    assert pair.client_reads(len(reply)) == reply


def test_a_small_reply_is_one_record(contexts):
    pair = Pair(*contexts)
    pair.handshake()
    assert len(records(pair.server.encrypt(b'{"type":"heartbeat_ack","seq":1}'))) == 1


def test_the_master_sends_no_session_ticket(contexts):
    """Slaves never resume: a ticket would be wasted bytes and CPU at every handshake."""
    server_ctx, client_ctx = contexts
    assert server_ctx.num_tickets == 0
    pair = Pair(server_ctx, client_ctx)
    pair.handshake()
    pair.incoming.write(pair.server.encrypt(b"welcome"))
    assert pair.client_reads(7) == b"welcome"  # tickets, if any, arrive before it
    assert pair.client.version() == "TLSv1.3"
    assert not pair.client.session.has_ticket


def test_with_tickets_the_same_check_sees_one(contexts):
    """The check above can fail: a server that sends tickets is seen sending them."""
    server_ctx, client_ctx = contexts
    server_ctx.num_tickets = 2
    try:
        pair = Pair(server_ctx, client_ctx)
        pair.handshake()
        pair.incoming.write(pair.server.encrypt(b"welcome"))
        assert pair.client_reads(7) == b"welcome"
        assert pair.client.session.has_ticket
    finally:
        server_ctx.num_tickets = 0
