"""The master's server at its edges, over real sockets on 127.0.0.1: accept failures and
the pause after them, the event-loop error limiter, run_forever and its signals, the
per-state node counts, the welcome's master dict, the caps from RLIMIT_NOFILE, the sweep's
closing of silent nodes and roles, and forgetting stale nodes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

from rpicluster import __version__
from rpicluster import protocol as p
from rpicluster.master import Master
from rpicluster.master import listening as listening_module
from rpicluster.master import server as server_module
from rpicluster.master.connection import Connection
from tests.helpers import on_loop, wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}


def join(master, secret, node_id="n1", role="basic", kind="slave", details=None):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    welcome = p.client_handshake(
        sock, secret, kind=kind, node_id=node_id, role=role, details=details
    )
    return sock, welcome


def gets_challenge(port: int, timeout: float = 0.3):
    """A socket that got its challenge within ``timeout``, else None (closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(timeout)
    try:
        if p.recv_message(sock)["type"] == p.CHALLENGE:
            return sock
    except (OSError, p.DisconnectionError):
        pass
    sock.close()
    return None


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def messages(caplog, words):
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


# ------------------------------------------------------------------- accepting


def test_out_of_descriptors_pauses_accepting_then_resumes(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    caplog.set_level(logging.ERROR, logger="rpicluster.master")
    assert master._accept_delay == 0.05
    on_loop(master, lambda: master._accept_failed(OSError(errno.EMFILE, "Too many open files")))
    assert master._accept_delay == 0.1  # the next pause doubles
    counters = master.cluster_state()["master"]["counters"]
    assert counters["accept_errors_total"] == 1
    assert messages(caplog, "cannot accept connections: [Errno 24] Too many open files;") == [
        "cannot accept connections: [Errno 24] Too many open files; not accepting for 0.05 s"
    ]
    # The listener is off the loop until the pause ends, then back on by itself.
    sock = wait_for(lambda: gets_challenge(master.port), what="accepting again")
    sock.close()
    assert master._accept_delay == 0.05  # a successful accept starts the doubling over


def test_the_pause_doubles_up_to_one_second(master_factory):
    master = master_factory(cluster=QUIET)
    delays = []

    def fail_seven() -> None:
        for _ in range(7):
            delays.append(master._accept_delay)
            master._accept_failed(OSError(errno.ENFILE, "File table overflow"))

    on_loop(master, fail_seven)
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    sock = wait_for(lambda: gets_challenge(master.port), what="accepting again")
    sock.close()


def test_another_accept_error_is_logged_without_pausing(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    caplog.set_level(logging.ERROR, logger="rpicluster.master")
    on_loop(master, lambda: master._accept_failed(OSError(errno.EPERM, "Operation not permitted")))
    assert messages(caplog, "accept() failed") == [
        "accept() failed: [Errno 1] Operation not permitted"
    ]
    assert master._accept_delay == 0.05
    assert master.cluster_state()["master"]["counters"]["accept_errors_total"] == 0
    # the listener never left the loop: a connection is served at once
    assert on_loop(master, lambda: master.loop.remove_reader(master._listener.fileno())) is True
    on_loop(master, lambda: master.loop.add_reader(master._listener.fileno(), master._accept))


def test_no_resume_once_the_master_is_stopping(master_factory):
    master = master_factory(cluster=QUIET)
    fd = master._listener.fileno()

    def pause_then_stop() -> None:
        master._accept_failed(OSError(errno.EMFILE, "Too many open files"))
        master.stopping = True

    on_loop(master, pause_then_stop)
    resumed = threading.Event()
    # Runs on the loop after the 0.05 s pause's own resume call (both are call_later).
    master.loop.call_soon_threadsafe(lambda: master.loop.call_later(0.2, resumed.set))
    assert resumed.wait(10)
    assert on_loop(master, lambda: master.loop.remove_reader(fd)) is False
    master.stopping = False


def test_accept_ignores_a_call_once_stopping(master_factory):
    master = master_factory(cluster=QUIET)
    fd = master._listener.fileno()
    on_loop(master, lambda: master.loop.remove_reader(fd))
    client = socket.create_connection(("127.0.0.1", master.port), timeout=5)

    def accept_while_stopping() -> int:
        master.stopping = True
        master._accept()
        master.stopping = False
        return master.admission.open

    assert on_loop(master, accept_while_stopping) == 0
    on_loop(master, master._accept)  # the connection was left in the backlog, served now
    client.settimeout(5)
    assert p.recv_message(client)["type"] == p.CHALLENGE
    client.close()


class NoFastPath:
    """The master's loop without ``_make_socket_transport``: accepts go through _attach."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def __getattr__(self, name: str):
        if name == "_make_socket_transport":
            raise AttributeError(name)
        return getattr(self._loop, name)


def test_a_loop_without_the_fast_path_serves_through_a_task(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    real = master.loop
    master.loop = NoFastPath(real)
    try:
        sock, welcome = join(master, cluster_secret)
        assert welcome["type"] == p.WELCOME
        p.send_frame(sock, p.make(p.HEARTBEAT, seq=1, sent_at=1.0))
        assert p.recv_message(sock) == {"type": p.HEARTBEAT_ACK, "seq": 1}
        sock.close()
    finally:
        master.loop = real


class VanishedSocket:
    """An accepted socket whose peer is gone before it is set up: every call fails."""

    def __init__(self) -> None:
        self.closed = False

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise OSError(errno.EBADF, "Bad file descriptor")

        return fail

    def close(self) -> None:
        self.closed = True


# asyncio's transport, half set up on the vanished socket, warns from its __del__.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("through_a_task", [False, True])
def test_a_socket_that_cannot_be_served_frees_its_slot(master_factory, through_a_task, caplog):
    caplog.set_level(logging.DEBUG, logger="rpicluster.master")
    master = master_factory(cluster=QUIET)
    sock = VanishedSocket()
    conn = Connection(master, "10.9.9.9", "10.9.9.9:1")
    on_loop(master, lambda: master.admission.admit(conn, "10.9.9.9"))
    assert master.admission.pending == 1
    if through_a_task:
        asyncio.run_coroutine_threadsafe(master._attach(sock, conn), master.loop).result(10)
    else:
        on_loop(master, lambda: master._serve(sock, conn, ("10.9.9.9", 1)))
    assert sock.closed
    assert master.admission.pending == 0 and master.admission.open == 0
    assert "10.9.9.9" not in master.admission.by_address
    assert any(
        line.startswith("connection from 10.9.9.9:1 could not be set up: ")
        and ("ValueError(" in line or "OSError(" in line)
        for line in messages(caplog, "could not be set up")
    )


def test_a_refused_connection_is_told_why_and_counted(master_factory, caplog):
    master = master_factory(cluster=QUIET, master={"max_unauthenticated_per_address": 1})
    first = gets_challenge(master.port)
    assert first is not None
    second = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    error = p.recv_message(second)
    assert error == {
        "type": p.ERROR,
        "code": p.E_TOO_MANY_CONNECTIONS,
        "message": "1 unauthenticated connections from 127.0.0.1, the limit is 1",
    }
    with pytest.raises(p.DisconnectionError):
        p.recv_message(second)
    assert master.cluster_state()["master"]["counters"]["connections_refused_total"] == 1
    port = second.getsockname()[1]
    assert messages(caplog, "refused:") == [
        f"connection from 127.0.0.1:{port} refused:"
        " 1 unauthenticated connections from 127.0.0.1, the limit is 1"
    ]
    third = socket.create_connection(("127.0.0.1", master.port), timeout=5)
    assert p.recv_message(third)["code"] == p.E_TOO_MANY_CONNECTIONS
    assert master.cluster_state()["master"]["counters"]["connections_refused_total"] == 2
    first.close()
    second.close()
    third.close()


# --------------------------------------------------------------- error limiter


def test_event_loop_errors_log_twenty_per_window_then_a_count(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    clock = master.clock = FakeClock()
    caplog.set_level(logging.INFO, logger="asyncio")
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    loop = master.loop
    limiter = master.log_loop
    limiter.start = clock.now

    def report(n: int) -> None:  # through the handler the master gave its loop
        for i in range(n):
            loop.call_exception_handler({"message": f"boom {i}"})

    report(25)
    assert len(messages(caplog, "boom")) == 20
    assert limiter.suppressed == 5
    clock.now += 9.5
    report(1)
    assert len(messages(caplog, "boom")) == 20
    clock.now += 0.5  # the window is over: the count is logged and lines flow again
    report(1)
    assert messages(caplog, "more event loop errors") == [
        "6 more event loop errors in the last 10 s (not logged one by one)"
    ]
    assert len(messages(caplog, "boom")) == 21
    assert limiter.count == 1 and limiter.start == clock.now


# ---------------------------------------------------------------- run_forever


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_run_forever_stops_cleanly_on_sigterm_and_restores_the_handlers(
    make_config, tmp_path, cluster_secret, caplog, monkeypatch
):
    import dataclasses

    config = make_config(master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path)})
    config = dataclasses.replace(config, master=dataclasses.replace(config.master, socket_port=0))
    master = Master(config)

    def stray(signum, frame) -> None:
        # Without run_forever's own handler the signal lands here: the test fails
        # (the exception leaves run_forever's wait) instead of the process dying.
        raise AssertionError("SIGTERM reached the test's handler, not the master's")

    original = signal.signal(signal.SIGTERM, stray)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    joined = {}

    waits = []

    class CountingEvent(threading.Event):
        """run_forever's stop event: its check of the loop runs every 10 ms, counted."""

        def wait(self, timeout=None):
            waits.append(timeout)
            return super().wait(None if timeout is None else timeout / 100)

    monkeypatch.setattr(server_module.threading, "Event", CountingEvent)

    def operator() -> None:
        wait_for(lambda: master._thread is not None and master.store is not None)
        wait_for(lambda: master._listener is not None)
        # other threads' events are CountingEvents too: count run_forever's 1 s waits only
        wait_for(lambda: waits.count(1.0) >= 3, what="run_forever checked a live loop 3 times")
        sock, _ = join(master, cluster_secret)
        joined["goodbye"] = sock
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=operator)
    thread.start()
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    try:
        master.run_forever()
        thread.join(10)
        assert "received SIGTERM, stopping" in messages(caplog, "received")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    finally:
        signal.signal(signal.SIGTERM, original)
    assert master._thread is None and master.store._closed
    sock = joined["goodbye"]
    assert p.recv_message(sock) == {"type": p.GOODBYE, "reason": "master shutting down"}
    sock.close()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals")
def test_run_forever_fails_when_the_event_loop_dies(make_config, tmp_path):
    import dataclasses

    config = make_config(master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path)})
    config = dataclasses.replace(config, master=dataclasses.replace(config.master, socket_port=0))
    master = Master(config)

    def kill_loop() -> None:
        wait_for(lambda: master._thread is not None and master.loop is not None)
        wait_for(lambda: master._listener is not None)
        master.loop.call_soon_threadsafe(master.loop.stop)

    thread = threading.Thread(target=kill_loop)
    thread.start()
    with pytest.raises(RuntimeError) as info:
        master.run_forever()
    thread.join(10)
    assert str(info.value) == "master event loop ended unexpectedly"
    assert master.store._closed


# ------------------------------------------------------------ views and counts


def test_the_full_master_dict_counts_nodes_per_state(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    alive, _ = join(master, cluster_secret, "alive-1")
    alive2, _ = join(master, cluster_secret, "alive-2")
    left, _ = join(master, cluster_secret, "left-1")
    dead, _ = join(master, cluster_secret, "dead-1")
    p.send_frame(left, p.make(p.GOODBYE, reason="bye"))
    dead.close()

    def counts():
        nodes = master.cluster_state()["master"]["nodes"]
        return nodes if nodes["left"] == 1 and nodes["dead"] == 1 else None

    assert wait_for(counts, what="left and dead counted") == {
        "alive": 2,
        "suspect": 0,
        "dead": 1,
        "left": 1,
    }
    for sock in (alive, alive2, left):
        sock.close()


def test_the_welcome_carries_the_cluster_timing_and_nothing_private(master_factory, cluster_secret):
    master = master_factory(
        cluster={"heartbeat_interval": 0.5, "suspect_after": 1.5, "dead_after": 4}
    )
    before = time.time()
    sock, welcome = join(master, cluster_secret)
    info = welcome["master"]
    assert info == {
        "hostname": socket.gethostname(),
        "version": __version__,
        "protocol": 2,
        "started_at": master.started_at,
        "heartbeat_interval": 0.5,
        "suspect_after": 1.5,
        "dead_after": 4.0,
        "max_frame_size": 1024 * 1024,
    }
    assert before - 60 < info["started_at"] <= before + 0.001  # rounded to the ms
    full = master.cluster_state()["master"]
    assert set(full) >= set(info) | {"forget_after", "nodes", "counters", "store"}
    assert {key: full[key] for key in info} == info
    assert full["forget_after"] == master.config.master.forget_after
    assert full["counters"]["unauthenticated_open"] == 0
    assert full["store"]["ok"] is True
    sock.close()


def test_the_unauthenticated_count_is_current(master_factory):
    master = master_factory(cluster=QUIET)
    strangers = [gets_challenge(master.port) for _ in range(3)]
    assert all(strangers)
    state = master.cluster_state()["master"]["counters"]
    assert state["unauthenticated_open"] == 3
    for sock in strangers:
        sock.close()


def test_cluster_state_works_on_the_loop_and_after_stop(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock, _ = join(master, cluster_secret)
    state = on_loop(master, master.cluster_state)
    assert [node["node_id"] for node in state["nodes"]] == ["n1"]
    assert state["total"] == 1 and state["next_offset"] is None
    sock.close()
    master.stop()
    after = master.cluster_state()
    assert [node["node_id"] for node in after["nodes"]] == ["n1"]
    master.stop()  # idempotent


def test_a_config_without_master_section_is_refused(make_config):
    config = make_config(slave={"master_ip": "127.0.0.1"})
    with pytest.raises(ValueError, match="a master needs a \\[master\\] section"):
        Master(config)


@pytest.mark.parametrize(
    ("dead_after", "sweep"), [(60, 0.25), (5, 0.25), (4, 0.2), (0.6, 0.03), (0.3, 0.02)]
)
def test_the_sweep_runs_often_enough_for_dead_after(make_config, dead_after, sweep):
    """A twentieth of dead_after, between 20 ms and 250 ms: a silent node is closed at most
    that long after dead_after, and 10,000 nodes are not swept more often than needed."""
    config = make_config(
        cluster={"heartbeat_interval": 0.01, "suspect_after": 0.02, "dead_after": dead_after},
        master={"state_dir": "/nonexistent"},
    )
    assert Master(config).sweep_interval == pytest.approx(sweep)


@pytest.mark.parametrize(("forget_after", "interval"), [(0, 0.25), (1, 0.25), (30, 3), (86400, 60)])
def test_stale_nodes_are_looked_for_a_tenth_of_forget_after_apart(
    make_config, forget_after, interval
):
    config = make_config(
        cluster={"heartbeat_interval": 0.1, "suspect_after": 0.3, "dead_after": 0.6},
        master={"state_dir": "/nonexistent", "forget_after": forget_after},
    )
    assert Master(config).forget_interval == pytest.approx(interval)


# ----------------------------------------------------------- RLIMIT_NOFILE caps


@pytest.mark.parametrize(
    ("nofile", "wanted", "used"),
    [(0, 1000, 1000), (1128, 1000, 1000), (1127, 1000, 999), (200, 1000, 72), (100, 1000, 16)],
)
def test_max_connections_fits_under_the_descriptor_limit(
    master_factory, monkeypatch, caplog, nofile, wanted, used
):
    monkeypatch.setattr(listening_module, "raise_nofile_limit", lambda: nofile)
    master = master_factory(cluster=QUIET, master={"max_connections": wanted})
    assert master.max_connections == used
    assert master.admission.max_connections == used
    lines = messages(caplog, "is above what RLIMIT_NOFILE")
    if used == wanted:
        assert lines == []
    else:
        assert lines == [
            f"max_connections {wanted} is above what RLIMIT_NOFILE {nofile} allows; using {used}"
            " (raise LimitNOFILE in the unit)"
        ]


class FakeResource:
    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, fail: Optional[Exception] = None) -> None:
        self.limits = (soft, hard)
        self.fail = fail
        self.set_to = None

    def getrlimit(self, which: int):
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits) -> None:
        assert which == self.RLIMIT_NOFILE
        if self.fail is not None:
            raise self.fail
        self.set_to = limits
        self.limits = limits


@pytest.mark.parametrize(
    ("soft", "hard", "fail", "result", "set_to"),
    [
        (1024, 524288, None, 65536, (65536, 524288)),
        (1024, 4096, None, 4096, (4096, 4096)),
        (1024, -1, None, 65536, (65536, -1)),
        (65536, 524288, None, 65536, None),
        (100000, 524288, None, 100000, None),
        (-1, -1, None, 0, None),
        (1024, 524288, ValueError("not allowed"), 1024, None),
        (1024, 524288, PermissionError(errno.EPERM, "Operation not permitted"), 1024, None),
    ],
)
def test_raise_nofile_limit(monkeypatch, soft, hard, fail, result, set_to):
    import sys

    fake = FakeResource(soft, hard, fail)
    monkeypatch.setitem(sys.modules, "resource", fake)
    assert listening_module.raise_nofile_limit() == result
    assert fake.set_to == set_to


def test_raise_nofile_limit_without_the_resource_module(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "resource", None)  # import fails, as off Linux
    assert listening_module.raise_nofile_limit() == 0


# ------------------------------------------------------------ sweep and forget


def test_a_silent_node_is_closed_with_silent_and_counted(master_factory, cluster_secret, caplog):
    master = master_factory()  # dead_after 0.6 s
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    sock, _ = join(master, cluster_secret, "quiet", details={"hostname": "pi-q"})
    error = p.recv_message(sock)
    assert error == {
        "type": p.ERROR,
        "code": p.E_SILENT,
        "message": "no message for 0.6 s: node or role presumed dead",
    }
    assert master.cluster_state()["master"]["counters"]["silent_deaths_total"] == 1
    assert messages(caplog, "silent for more than") == [
        "node quiet (pi-q) silent for more than 0.6 s: dead, closing its connection"
    ]
    sock.close()


def test_one_silent_role_is_closed_and_the_node_stays(master_factory, cluster_secret, caplog):
    master = master_factory()  # dead_after 0.6 s
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    quiet, _ = join(master, cluster_secret, "two", role="basic", details={"hostname": "pi-2"})
    chatty, _ = join(master, cluster_secret, "two", role="vitals")
    quiet.settimeout(0.05)
    seq = 0

    def quiet_role_closed():
        nonlocal seq
        seq += 1
        p.send_frame(chatty, p.make(p.HEARTBEAT, seq=seq, sent_at=1.0))
        assert p.recv_message(chatty)["seq"] == seq
        try:
            return p.recv_message(quiet)
        except socket.timeout:
            return None

    error = wait_for(quiet_role_closed, what="the silent role closed")
    assert error["code"] == p.E_SILENT
    node = next(n for n in master.cluster_state()["nodes"] if n["node_id"] == "two")
    assert node["state"] == "alive" and node["connected"] is True
    assert master.cluster_state()["master"]["counters"]["silent_deaths_total"] == 0
    assert messages(caplog, "silent for more than") == [
        "node two (pi-2) silent for more than 0.6 s: role basic dropped, closing its connection"
    ]
    quiet.close()
    chatty.close()


def test_nodes_gone_longer_than_forget_after_are_forgotten(master_factory, cluster_secret):
    master = master_factory(master={"forget_after": 1})
    state_dir = Path(master.config.master.state_dir)
    gone, _ = join(master, cluster_secret, "gone")
    kept, _ = join(master, cluster_secret, "kept")
    p.send_frame(gone, p.make(p.GOODBYE, reason="retired"))
    gone.close()
    seq = 0

    def forgotten():
        nonlocal seq
        seq += 1
        p.send_frame(kept, p.make(p.HEARTBEAT, seq=seq, sent_at=1.0))
        p.recv_message(kept)
        ids = [n["node_id"] for n in master.cluster_state()["nodes"]]
        return ids == ["kept"]

    wait_for(forgotten, what="the gone node forgotten")
    assert master.cluster_state()["master"]["counters"]["nodes_forgotten_total"] == 1
    kept.close()
    master.stop()
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        assert [row[0] for row in db.execute("SELECT node_id FROM nodes")] == ["kept"]


# ------------------------------------------------ what the first mutation run found


def test_last_seen_times_are_flushed_to_the_database(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    sock, _ = join(master, cluster_secret)
    on_loop(master, master._flush)
    before = master.registry.nodes["n1"].seen
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=1, sent_at=1.0))
    p.recv_message(sock)
    assert master.registry.nodes["n1"].seen > before
    on_loop(master, master._flush_last_seen)
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    done = threading.Event()
    box = {}

    def read(conn):
        return conn.execute("SELECT last_seen FROM nodes WHERE node_id = 'n1'").fetchone()[0]

    master.store.read(read, lambda value: (box.setdefault("v", value), done.set()))
    assert done.wait(10)
    assert box["v"] == expected
    sock.close()


def test_forget_releases_the_certificate_name_bound_to_the_node(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    mine, _ = join(master, cluster_secret, "mine")
    other, _ = join(master, cluster_secret, "other")

    def bind_and_forget():
        master.registry.nodes["mine"].details["tls"] = {"name": "pi-cert"}
        master.registry.nodes["other"].details["tls"] = {"name": "other-cert"}
        master.identities.update({"pi-cert": "mine", "other-cert": "someone-else"})
        closed = master.forget_node("mine", "test")
        closed_other = master.forget_node("other", "test")
        return closed, closed_other, dict(master.identities)

    closed, closed_other, identities = on_loop(master, bind_and_forget)
    assert (closed, closed_other) == (1, 1)
    # the name bound to "mine" is free again; "other-cert" speaks for another id: kept
    assert identities == {"other-cert": "someone-else"}
    assert master.cluster_state()["nodes"] == []
    mine.close()
    other.close()


class FixedHead:
    """The master dict as a constant, so a test can size a page to the byte."""

    def __init__(self, master) -> None:
        self.info = master.master_dict()

    def __call__(self, full: bool = True):
        return self.info


def page(master, limit=1 << 30, offset=0):
    frame = on_loop(master, lambda: master.cluster_page(1, offset, limit))
    import json

    return json.loads(frame[4:])["data"]


class NoConn:
    def close(self, code=None, message="") -> None:
        pass


def add_node(master, node_id: str, pad: int) -> int:
    """Register a node with ``pad`` bytes of details; return its JSON length in a page."""
    import json

    def add():
        master.registry.register(
            node_id, "basic", "10.0.0.1", {"hostname": f"h-{node_id}", "p": "x" * pad}, NoConn()
        )
        return len(json.dumps(master.registry.node_dict(master.registry.nodes[node_id])))

    return on_loop(master, add)


def set_pad(master, node_id: str, pad: int) -> int:
    """Change a node's padding in place (its times stay); return its JSON length."""
    import json

    def change():
        node = master.registry.nodes[node_id]
        node.details["p"] = "x" * pad
        return len(json.dumps(master.registry.node_dict(node)))

    return on_loop(master, change)


def test_a_cluster_page_is_filled_to_exactly_half_a_frame(master_factory):
    import json

    master = master_factory(cluster={**QUIET, "max_frame_size": 16384})
    master.master_dict = FixedHead(master)
    budget = 16384 // 2
    head = len(json.dumps(master.master_dict()))
    first = add_node(master, "a", 10)
    second_base = add_node(master, "b", 0)
    # the page's size estimate: the head + 200 bytes of envelope + each node and a comma
    room = budget - (head + 200) - (first + 1) - 1
    assert room > second_base
    assert set_pad(master, "b", room - second_base) == room
    full = page(master)
    assert [n["node_id"] for n in full["nodes"]] == ["a", "b"]
    assert full["next_offset"] is None
    set_pad(master, "b", room - second_base + 1)  # one byte too many for this page
    split = page(master)
    assert [n["node_id"] for n in split["nodes"]] == ["a"] and split["next_offset"] == 1
    assert [n["node_id"] for n in page(master, offset=1)["nodes"]] == ["b"]


def test_a_node_too_big_for_the_page_is_sent_trimmed(master_factory):
    master = master_factory(cluster={**QUIET, "max_frame_size": 16384})
    add_node(master, "big", 9000)
    add_node(master, "small", 0)
    first = page(master)
    assert [n["node_id"] for n in first["nodes"]] == ["big", "small"]
    assert first["nodes"][0]["truncated"] is True and first["nodes"][0]["details"] == {}
    assert "truncated" not in first["nodes"][1]


def test_a_late_sweep_warns_past_one_second_of_lateness(master_factory, caplog):
    master = master_factory(cluster=QUIET)  # sweep_interval 0.25 s
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    clock = master.clock = FakeClock(1000.0)

    def sweep_late_by(late: float) -> None:
        master._last_sweep = clock.now - master.sweep_interval - late
        master._sweep()

    on_loop(master, lambda: sweep_late_by(1.0))
    assert messages(caplog, "event loop ran") == []
    on_loop(master, lambda: sweep_late_by(1.25))
    assert messages(caplog, "event loop ran") == [
        "event loop ran 1.2 s late (master starved of CPU or blocked)"
    ]


def test_silent_nodes_are_counted_once_each(master_factory, cluster_secret, caplog):
    master = master_factory()  # dead_after 0.6 s
    caplog.set_level(logging.WARNING, logger="rpicluster.master")
    socks = [
        join(master, cluster_secret, "two-roles", role="basic"),
        join(master, cluster_secret, "two-roles", role="vitals"),
        join(master, cluster_secret, "other"),
    ]
    wait_for(
        lambda: all(n["state"] == "dead" for n in master.cluster_state()["nodes"]),
        what="both nodes dead",
    )
    assert master.cluster_state()["master"]["counters"]["silent_deaths_total"] == 2
    # On a loaded machine the two roles' joins can be a sweep apart: one role is then
    # dropped first ("role basic dropped"), and the node's death is a second line.
    lines = [line for line in messages(caplog, "silent for more than") if ": dead," in line]
    assert sorted(line.split()[1] for line in lines) == ["other", "two-roles"]
    for sock, _ in socks:
        sock.close()


def test_cluster_state_hands_back_an_error_of_the_loop(master_factory, monkeypatch):
    master = master_factory(cluster=QUIET)

    def broken(full: bool = True):
        raise RuntimeError("view broken")

    monkeypatch.setattr(master, "master_dict", broken)
    with pytest.raises(RuntimeError, match="view broken"):
        master.cluster_state()


def test_forgetting_an_unknown_node_closes_nothing_and_says_why(master_factory, caplog):
    master = master_factory(cluster=QUIET)
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    assert on_loop(master, lambda: master.forget_node("nobody", "operator's request")) == 0
    assert "node nobody forgotten (operator's request); 0 connection(s) closed" in messages(
        caplog, "forgotten ("
    )


def test_a_clean_stop_saves_every_last_seen_time(master_factory, cluster_secret):
    master = master_factory(cluster=QUIET)
    state_dir = Path(master.config.master.state_dir)
    sock, _ = join(master, cluster_secret)
    on_loop(master, master._flush)
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=1, sent_at=1.0))
    p.recv_message(sock)
    master.stop()
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    with sqlite3.connect(state_dir / "rpicluster.db") as db:
        assert db.execute("SELECT last_seen FROM nodes").fetchall() == [(expected,)]
    sock.close()


def test_the_webhook_is_built_with_every_alerts_setting(make_config, tmp_path):
    """URL, format and timeout of ``[alerts]`` reach the sender (how each behaves is
    tests/test_alerts_webhook.py's); built with the master, sending once it starts."""
    from rpicluster.master import Master

    config = make_config(
        master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path)},
        alerts={
            "webhook_url": "http://127.0.0.1:9/hook",
            "webhook_format": "text",
            "webhook_timeout": 1.5,
        },
    )
    webhook = Master(config).webhook
    assert (webhook.url, webhook.fmt, webhook.timeout) == ("http://127.0.0.1:9/hook", "text", 1.5)
