"""A join storm converges: the unauthenticated table's policy (admission.py, issue 8).

When the table is full, a stale pending connection (the master has waited on its
peer too long) is evicted, and otherwise accepting pauses: the pure tests drive
``Admission`` with an injected clock; the storm tests send more legitimate
clients than the table holds, plain and TLS, at once, and every one joins on its
first connection with no eviction. Issue 7's side (strangers cannot lock anyone
out) stays in tests/test_adversarial_master.py.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Optional

import pytest

from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.master import admission as adm
from rpicluster.master import listening
from rpicluster.master.admission import STALE_MIN, TURN_HALF_LIFE, Admission
from tests.helpers import Clock, on_loop, wait_for
from tests.tlscerts import CA, tls_section


class Conn:
    def __init__(self, address: str = "10.0.0.1") -> None:
        self.address = address


def table(pending: int = 3, per_address: int = 64, handshake_timeout: float = 5.0):
    clock = Clock()
    return Admission(100, pending, per_address, handshake_timeout, clock), clock


def fill(admission: Admission, n: int, address: str = "10.0.0.1") -> list[Conn]:
    conns = [Conn(address) for _ in range(n)]
    for conn in conns:
        assert admission.admit(conn, address) is None
    return conns


# ------------------------------------------------------------------ the policy


def test_a_full_table_of_progressing_connections_pauses_instead_of_evicting():
    admission, clock = table(pending=3)
    fill(admission, 3)
    clock.now += 0.9 * STALE_MIN  # not yet more than stale_after
    assert admission.full()
    room = admission.make_room()
    assert room.victim is None and "3 pending, none stale" in room.reason
    assert admission.pending == 3  # nobody was closed


def test_the_stalest_goes_first_whatever_its_address():
    admission, clock = table(pending=3)
    quiet = fill(admission, 1, "10.0.0.9")[0]
    clock.now += 0.1
    busy = fill(admission, 2, "10.0.0.1")  # the biggest holder, but younger
    clock.now += STALE_MIN - 0.05  # quiet has waited STALE_MIN + 0.05 s
    room = admission.make_room()
    assert room.victim is quiet
    assert (
        room.reason == f"waited {STALE_MIN + 0.05:.2f} s on the peer, stale after {STALE_MIN:.2f} s"
    )
    assert admission.pending == 2 and "10.0.0.9" not in admission.by_address
    assert not admission.full()
    assert admission.make_room().victim is None  # the next one is not stale yet
    for conn in busy:
        admission.release(conn)
    admission.release(quiet)
    assert (admission.open, admission.pending, admission.by_address, admission.turns) == (
        0,
        0,
        {},
        {},
    )


def test_only_the_masters_answers_restart_a_peers_turn():
    """A slowloris's bytes never count: only a handshake step the master answered does."""
    admission, clock = table(pending=2)
    trickler, answered = fill(admission, 2)
    clock.now += 0.75 * STALE_MIN
    admission.progressed(answered)  # its TLS flight went out: its peer's turn begins
    clock.now += 0.5 * STALE_MIN  # trickler: 1.25 x STALE_MIN since accept, answered 0.5 x
    assert admission.make_room().victim is trickler
    clock.now += 0.75 * STALE_MIN  # answered's peer has now sat on the answer too long
    assert admission.make_room().victim is answered


def test_stale_after_follows_the_slowest_recent_joiner_within_bounds():
    admission, clock = table(pending=10, handshake_timeout=5.0)
    assert admission.stale_after(clock.now) == STALE_MIN  # no joiner yet: quick peers assumed
    slow = fill(admission, 1)[0]
    clock.now += 0.3
    admission.authenticated(slow)  # a 0.3 s turn: stale after 4 x 0.3 s
    assert admission.stale_after(clock.now) == pytest.approx(1.2)
    clock.now += TURN_HALF_LIFE
    assert admission.stale_after(clock.now) == pytest.approx(0.6)  # decays by half
    clock.now += 10 * TURN_HALF_LIFE
    assert admission.stale_after(clock.now) == STALE_MIN
    slower = fill(admission, 1)[0]
    clock.now += 2.0
    admission.authenticated(slower)
    assert admission.stale_after(clock.now) == 2.5  # never more than handshake_timeout / 2


def test_a_longer_earlier_turn_counts_when_the_peer_authenticates():
    admission, clock = table()
    conn = fill(admission, 1)[0]
    clock.now += 0.4  # the peer's first turn: 0.4 s
    admission.progressed(conn)
    clock.now += 0.1
    admission.authenticated(conn)
    assert admission.stale_after(clock.now) == pytest.approx(1.6)


def test_strangers_turns_never_raise_stale_after():
    """Only peers that authenticated tune it, so a stranger cannot stretch its own slot."""
    admission, clock = table()
    failed, evicted = fill(admission, 2)
    clock.now += 2.0
    admission.progressed(failed)  # it earned an answer after 2 s, then failed
    admission.release(failed)
    assert admission.make_room().victim is evicted
    admission.authenticated(evicted)  # no longer pending: a no-op
    admission.release(evicted)
    assert admission.stale_after(clock.now) == STALE_MIN
    assert admission.pending == admission.open == 0


def test_a_new_table_assumes_quick_peers_and_caps_at_half_the_default_handshake_timeout():
    clock = Clock()
    clock.now = 0.0  # a clock that starts at zero (monotonic() may, in a container)
    admission = Admission(100, 3, 64, clock=clock)
    assert admission.stale_after(clock.now) == STALE_MIN  # nobody joined yet
    conn = fill(admission, 1)[0]
    clock.now = 30.0
    admission.authenticated(conn)  # a very slow joiner
    assert admission.stale_after(clock.now) == 2.5  # the default handshake_timeout 5 s / 2


def test_a_pending_connection_is_stale_only_past_stale_after():
    clock = Clock()
    clock.now = 0.0
    admission = Admission(100, 1, 64, 5.0, clock)
    conn = fill(admission, 1)[0]
    clock.now = STALE_MIN  # waited exactly stale_after: not yet stale
    assert admission.make_room().victim is None
    clock.now = 0.25
    assert admission.make_room().victim is conn


def test_a_quick_joiner_does_not_erase_a_slow_ones_recent_turn():
    admission, clock = table()
    slow = fill(admission, 1)[0]
    clock.now += 0.5
    admission.authenticated(slow)  # stale after 4 x 0.5 s
    quick = fill(admission, 1)[0]
    clock.now += 0.01
    admission.authenticated(quick)  # a 0.01 s turn, right after
    assert admission.stale_after(clock.now) == pytest.approx(2.0, rel=0.01)


def test_an_answer_to_a_connection_no_longer_pending_changes_nothing():
    admission, clock = table()
    conn = fill(admission, 1)[0]
    admission.authenticated(conn)
    admission.progressed(conn)  # a TLS record the master sends after the hello
    assert admission.turns == {} and admission.pending == 0
    admission.release(conn)
    admission.progressed(conn)
    assert (admission.open, admission.pending, admission.by_address) == (0, 0, {})


def test_caps_still_refuse_and_admit_still_bounds_the_table():
    admission, _ = table(pending=2, per_address=2)
    first, second = fill(admission, 2)
    assert "2 unauthenticated connections from 10.0.0.1" in admission.refuse_reason("10.0.0.1")
    other = Conn("10.0.0.2")
    assert admission.admit(other, other.address) is first  # a caller that skipped make_room
    assert admission.pending == 2 and admission.open == 3
    admission.authenticated(other)
    admission.release(first)
    admission.release(second)
    admission.release(other)
    assert (admission.open, admission.pending, admission.turns) == (0, 0, {})


# ------------------------------------------------------------ storms, over sockets


STORM = 24  # clients at once
TABLE = 4  # max_unauthenticated in the storm tests


def hello(challenge: dict[str, Any], secret: str, kind: str, node_id: str) -> bytes:
    nonce = p.new_nonce()
    mac = p.hello_mac(secret, challenge["nonce"], nonce, kind, node_id, "basic")
    return p.make(
        p.HELLO,
        protocol=p.PROTOCOL_VERSION,
        kind=kind,
        node_id=node_id,
        role="basic",
        nonce=nonce,
        mac=mac,
    )


def storm(master, secret: str, kind: str, dial: Callable[[], Any]) -> dict[str, Any]:
    """STORM clients connect at once and hold their hello until the master has paused.

    Holding the hellos keeps the table full of connections that are progressing
    (they answer the moment they may), as a fleet on a starved CPU does; the old
    policy evicted one of them for every connect beyond the table.
    """
    go = threading.Event()
    results: list[Optional[str]] = [None] * STORM

    def client(i: int) -> None:
        try:
            sock = dial()
            challenge = p.recv_message(sock)
            go.wait(30)
            p.send_frame(sock, hello(challenge, secret, kind, f"storm-{i}"))
            results[i] = p.recv_message(sock)["type"]
            sock.close()
        except Exception as exc:  # noqa: BLE001  (reported as the client's result)
            results[i] = repr(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(STORM)]
    for thread in threads:
        thread.start()
    wait_for(lambda: master.counters.accept_paused_total > 0, 10, what="accept paused")
    go.set()
    for thread in threads:
        thread.join(30)
    return {"results": results, "counters": master.cluster_state()["master"]["counters"]}


def storm_master(master_factory, monkeypatch):
    # A loaded test machine must not make a held client stale: this test is about pausing.
    monkeypatch.setattr(adm, "STALE_MIN", 5.0)
    return master_factory(
        cluster={"handshake_timeout": 20},
        master={"max_unauthenticated": TABLE, "max_unauthenticated_per_address": 64},
    )


def test_a_plain_storm_of_slaves_bigger_than_the_table_all_joins(
    master_factory, monkeypatch, cluster_secret
):
    master = storm_master(master_factory, monkeypatch)

    def dial() -> socket.socket:
        return socket.create_connection(("127.0.0.1", master.port), timeout=30)

    got = storm(master, cluster_secret, p.KIND_SLAVE, dial)
    assert got["results"] == [p.WELCOME] * STORM
    wait_for(lambda: len(master.cluster_state()["nodes"]) == STORM, what="every slave known")
    assert got["counters"]["connections_evicted_total"] == 0
    assert got["counters"]["connections_refused_total"] == 0
    assert got["counters"]["accept_paused_total"] >= 1
    assert master.admission.pending == 0


def test_a_tls_storm_of_clients_bigger_than_the_table_all_joins(
    master_factory, make_config, monkeypatch, tmp_path, cluster_secret
):
    ca = CA(tmp_path / "pki")
    config = make_config(
        cluster={"handshake_timeout": 20},
        master={
            "socket_bind_ip": "127.0.0.1",
            "state_dir": str(tmp_path / "m"),
            "socket_port": 0,
            "max_unauthenticated": TABLE,
            "max_unauthenticated_per_address": 64,
        },
        tls=tls_section(ca.master("master")),
    )
    monkeypatch.setattr(adm, "STALE_MIN", 5.0)
    master = master_factory(config=config)
    context = tlsmod.client_context(ca.issue("pi-a"))

    def dial() -> tlsmod.TlsSocket:
        sock = socket.create_connection(("127.0.0.1", master.port), timeout=30)
        return tlsmod.connect(sock, context, "127.0.0.1")

    got = storm(master, cluster_secret, p.KIND_CLIENT, dial)  # one certificate, many clients
    assert got["results"] == [p.WELCOME] * STORM
    assert got["counters"]["connections_evicted_total"] == 0
    assert got["counters"]["tls_failures_total"] == 0
    assert got["counters"]["accept_paused_total"] >= 1


def test_the_tls_flight_restarts_the_peers_turn(master_factory, make_config, tmp_path):
    """peertls tells admission when the master answered a TLS step (the turn's clock)."""
    ca = CA(tmp_path / "pki")
    config = make_config(
        master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path / "m"), "socket_port": 0},
        tls=tls_section(ca.master("master")),
    )
    master = master_factory(config=config)
    raw = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    sock = tlsmod.connect(raw, tlsmod.client_context(ca.issue("pi-a")), "127.0.0.1")
    assert p.recv_message(sock)["type"] == p.CHALLENGE
    [(since, longest, address)] = list(master.admission.turns.values())
    admitted = master.admission.clock() - 10  # at most this long ago
    assert address == "127.0.0.1" and longest > 0.0 and since > admitted
    sock.close()


def test_room_is_made_only_for_connections_that_wait(master_factory):
    """Within one batch of accepts a stale peer goes only for a connect that waits."""
    master = master_factory(
        cluster={"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60},
        master={"max_unauthenticated": 2, "max_unauthenticated_per_address": 64},
    )

    def dial() -> socket.socket:
        return socket.create_connection(("127.0.0.1", master.port), timeout=10)

    def evicted() -> int:
        return master.cluster_state()["master"]["counters"]["connections_evicted_total"]

    first, second = dial(), dial()
    for sock in (first, second):
        assert p.recv_message(sock)["type"] == p.CHALLENGE
    fd = master._listener.fileno()
    shift = {"by": 0.0}
    real = master.admission.clock

    def later() -> float:
        return real() + shift["by"]

    def freeze() -> None:  # connects now wait in the backlog until _accept runs
        master.loop.remove_reader(fd)
        master.admission.clock = later

    on_loop(master, freeze)
    shift["by"] = 1.0  # both strangers stale
    newcomer = dial()
    on_loop(master, master._accept)
    assert p.recv_message(newcomer)["type"] == p.CHALLENGE
    assert evicted() == 1  # the first stranger only: nobody else waited
    with pytest.raises((p.DisconnectionError, ConnectionError)):
        p.recv_message(first)
    shift["by"] = 2.0  # the second stranger and the newcomer stale now
    waiting = [dial(), dial()]
    on_loop(master, master._accept)
    for sock in waiting:
        assert p.recv_message(sock)["type"] == p.CHALLENGE
    assert evicted() == 3
    assert master.counters.accept_paused_total == 0
    on_loop(master, master._resume_accept)
    for sock in [first, second, newcomer, *waiting]:
        sock.close()


def test_a_full_table_of_fresh_connections_pauses_accepting_says_so_and_resumes(
    master_factory, caplog
):
    """No stale stranger to evict: accepting stops for ACCEPT_PAUSE, logged, then resumes."""
    master = master_factory(
        cluster={"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60},
        master={"max_unauthenticated": 2, "max_unauthenticated_per_address": 64},
    )

    def dial() -> socket.socket:
        return socket.create_connection(("127.0.0.1", master.port), timeout=10)

    first, second = dial(), dial()
    for sock in (first, second):
        assert p.recv_message(sock)["type"] == p.CHALLENGE
    fd = master._listener.fileno()
    real = master.admission.clock
    frozen = {"at": real()}

    def freeze() -> None:  # neither stranger gets stale while the clock stands still
        master.loop.remove_reader(fd)
        master.admission.clock = lambda: frozen["at"]

    on_loop(master, freeze)
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    newcomer = dial()
    on_loop(master, master._accept)
    assert master.counters.accept_paused_total == 1
    line = (
        f"unauthenticated table full (2 pending, none stale (after {STALE_MIN:.2f} s)):"
        f" not accepting for {listening.ACCEPT_PAUSE:g} s"
    )
    assert line in [record.getMessage() for record in caplog.records]
    # The pause ends by itself, finds the table still full of fresh strangers, pauses again.
    wait_for(lambda: master.counters.accept_paused_total >= 2, what="accepting resumed")
    frozen["at"] += 1.0  # now both strangers are stale: the next resume lets the newcomer in
    assert p.recv_message(newcomer)["type"] == p.CHALLENGE
    for sock in (first, second, newcomer):
        sock.close()
