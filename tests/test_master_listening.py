"""The master's listening socket at its edges (listening.py), over real sockets: a batch of
accepts goes on past an aborted or refused connection, an accept error pauses accepting,
accepted sockets never block the loop, a peer is named by its address in log lines, and a
peer with no address (not TCP) is still served, named "?".

``accept()`` answers come from a scripted stand-in for the listening socket where the test
needs an answer the kernel gives only by chance (an aborted connection, out of file
descriptors); the sockets it hands over are real."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

import pytest

from rpicluster import protocol as p
from tests.helpers import on_loop, wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


class ScriptedListener:
    """accept() answers from a script (a socket and address, or an exception to raise),
    then BlockingIOError as a drained backlog does; fileno() is the real listener's."""

    def __init__(self, real: socket.socket, script: list) -> None:
        self.real = real
        self.script = list(script)

    def accept(self):
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "no connection waiting")
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def fileno(self) -> int:
        return self.real.fileno()


def accept_from(master, script: list) -> list:
    """One readiness event of the listener with accept() scripted; what it did not take."""
    real = master._listener
    listener = ScriptedListener(real, script)

    def run() -> None:
        master._listener = listener
        try:
            master._accept()
        finally:
            master._listener = real

    on_loop(master, run)
    return listener.script


def tcp_pair():
    """A connected loopback pair: (client socket, the server's socket, its peer address)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, address = listener.accept()
    return client, server, address


def challenged(sock: socket.socket) -> bool:
    sock.settimeout(10)
    return p.recv_message(sock)["type"] == p.CHALLENGE


def messages(caplog, words):
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_an_aborted_connection_does_not_end_the_batch(master_factory):
    master = master_factory(cluster=QUIET)
    client, server, address = tcp_pair()
    left = accept_from(
        master, [ConnectionAbortedError(errno.ECONNABORTED, "aborted"), (server, address)]
    )
    assert left == []  # served in the same batch, not at the next readiness event
    assert challenged(client)
    client.close()


def test_a_refused_connection_does_not_end_the_batch_nor_fail_on_a_vanished_peer(
    master_factory, caplog
):
    master = master_factory(cluster=QUIET)
    # The refused peer is gone before its answer is sent: the send fails (EPIPE).
    gone, refused = socket.socketpair()
    gone.close()
    client, server, address = tcp_pair()
    admission = master.admission
    original = admission.refuse_reason
    admission.refuse_reason = lambda addr: (
        "full for the test" if addr == "10.1.1.1" else original(addr)
    )
    try:
        left = accept_from(master, [(refused, ("10.1.1.1", 4321)), (server, address)])
    finally:
        admission.refuse_reason = original
    assert left == []
    assert refused.fileno() == -1  # closed after the refusal
    assert messages(caplog, "refused:") == [
        "connection from 10.1.1.1:4321 refused: full for the test"
    ]
    assert master.cluster_state()["master"]["counters"]["connections_refused_total"] == 1
    assert challenged(client)
    client.close()


def test_running_out_of_descriptors_in_accept_pauses_accepting(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    caplog.set_level(logging.ERROR, logger="rpicluster.master")
    left = accept_from(master, [OSError(errno.EMFILE, "Too many open files")])
    assert left == []
    assert master.cluster_state()["master"]["counters"]["accept_errors_total"] == 1
    assert messages(caplog, "cannot accept") == [
        "cannot accept connections: [Errno 24] Too many open files; not accepting for 0.05 s"
    ]
    assert wait_for(lambda: master._accept_delay == 0.1, what="the pause doubled")


def test_accepted_sockets_never_block_the_loop(master_factory):
    master = master_factory(cluster=QUIET)
    client = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    assert challenged(client)

    def flags() -> list[int]:
        return [
            fcntl.fcntl(conn.transport.get_extra_info("socket").fileno(), fcntl.F_GETFL)
            for conn in master.connections
        ]

    assert [bool(f & os.O_NONBLOCK) for f in on_loop(master, flags)] == [True]
    client.close()


def test_a_peer_is_named_by_its_address_and_port_in_log_lines(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    client = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    assert challenged(client)
    client.sendall(p.HEADER.pack(8) + b"not json")
    assert p.recv_message(client)["type"] == p.ERROR
    port = client.getsockname()[1]
    lines = messages(caplog, "; closing")
    assert len(lines) == 1 and lines[0].startswith(
        f"peer 127.0.0.1:{port}: bad_frame: first frame is not"
    )
    client.close()


def test_a_peer_without_an_address_is_served_and_named_by_a_question_mark(master_factory):
    master = master_factory(cluster=QUIET)
    # accept() on a socket that is not TCP gives no (host, port) tuple.
    theirs, ours = socket.socketpair()
    assert accept_from(master, [(ours, "")]) == []
    assert challenged(theirs)
    peers = on_loop(master, lambda: [(conn.address, conn.peer) for conn in master.connections])
    assert peers == [("", "?")]
    assert master.admission.pending == 1
    theirs.close()
    wait_for(lambda: master.admission.pending == 0, what="the slot freed")


def test_a_master_bound_to_ipv6_loopback_serves_over_ipv6(master_factory):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    master = master_factory(cluster=QUIET, master={"socket_bind_ip": "::1"})
    client = socket.create_connection(("::1", master.port), timeout=10)
    assert challenged(client)
    client.close()


def test_a_fleet_connecting_at_once_waits_in_the_backlog(master_factory):
    """300 connections while the master accepts none: the kernel holds every one of them
    (a backlog of 4096 where the kernel allows it; Linux's default would be 128)."""
    master = master_factory(
        cluster=QUIET, master={"max_unauthenticated_per_address": 400, "max_unauthenticated": 400}
    )
    fd = master._listener.fileno()
    assert on_loop(master, lambda: master.loop.remove_reader(fd)) is True
    clients = []
    try:
        for _ in range(300):
            clients.append(socket.create_connection(("127.0.0.1", master.port), timeout=5))
    finally:
        on_loop(master, lambda: master.loop.add_reader(fd, master._accept))
    assert all(challenged(client) for client in clients)
    for client in clients:
        client.close()
