"""How the master stops, over real sockets on 127.0.0.1: a clean stop says goodbye to
every peer, ends the event loop and saves the registry once, on the loop; a shutdown that
fails, that does not finish, or a loop or store writer that is stuck still lets ``stop()``
return, saving the registry from outside only once the loop has ended.

Each test stops its master itself with the timeout it is about (the fixture's stop at
teardown is then a no-op)."""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
from pathlib import Path

import pytest

from rpicluster import protocol as p
from tests.helpers import queued_client, read_to_the_end, wait_for

QUIET = {"heartbeat_interval": 1, "suspect_after": 30, "dead_after": 60}
RELEASE_AFTER = 60.0  # a stuck test releases its blocked thread after this long at the latest


def join(master, secret, node_id="n1", role="basic", kind="slave"):
    sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
    p.client_handshake(sock, secret, kind=kind, node_id=node_id, role=role)
    return sock


def heartbeat(sock, seq=1):
    """One heartbeat and its ack: the node's last-seen time is now set on the master."""
    p.send_frame(sock, p.make(p.HEARTBEAT, seq=seq, sent_at=1.0))
    assert p.recv_message(sock)["type"] == p.HEARTBEAT_ACK


def heard_after_saved(master, sock, node_id="n1"):
    """A heartbeat once the node's row is in the database: only a save of the last-seen
    times (not of changed rows) can bring the newer time there."""
    wait_for(lambda: node_id in saved_last_seen(master), what="the node's row saved")
    heartbeat(sock)


def record_flushes(master):
    """The threads that flush the registry to the store, in order (stop() calls self._flush)."""
    threads: list[threading.Thread] = []
    flush = master._flush

    def recorded() -> None:
        threads.append(threading.current_thread())
        flush()

    master._flush = recorded
    return threads


def saved_last_seen(master):
    with sqlite3.connect(Path(master.config.master.state_dir) / "rpicluster.db") as db:
        return dict(db.execute("SELECT node_id, last_seen FROM nodes").fetchall())


def errors(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("rpicluster")
    ]


class ReleaseOnMessage(logging.Handler):
    """Sets ``event`` when a record containing ``words`` is logged."""

    def __init__(self, words: str, event: threading.Event) -> None:
        super().__init__()
        self.words = words
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if self.words in record.getMessage():
            self.event.set()


@pytest.fixture
def released():
    """An event a test's blocked thread waits on; set at the latest after RELEASE_AFTER."""
    event = threading.Event()
    safety = threading.Timer(RELEASE_AFTER, event.set)
    safety.daemon = True
    safety.start()
    yield event
    event.set()
    safety.cancel()


def test_a_clean_stop_says_goodbye_to_every_peer_and_saves_the_registry_once_on_the_loop(
    master_factory, cluster_secret, caplog
):
    caplog.set_level(logging.INFO, logger="rpicluster")
    master = master_factory(cluster=QUIET)
    slave = join(master, cluster_secret, node_id="n1")
    client = join(master, cluster_secret, node_id="cli", role="status", kind="client")
    heard_after_saved(master, slave)
    loop_thread = master._thread
    # Named for a stack dump; a daemon, so a master never stopped cannot keep a process alive.
    assert loop_thread.name == "rpicluster-master" and loop_thread.daemon
    flushes = record_flushes(master)

    master.stop()

    for sock in (slave, client):
        sock.settimeout(10)
        assert p.recv_message(sock) == {"type": p.GOODBYE, "reason": "master shutting down"}
        with pytest.raises(p.DisconnectionError):
            p.recv_message(sock)
        sock.close()
    assert not loop_thread.is_alive() and master.loop.is_closed()
    assert master._listener.fileno() == -1  # the listening socket is closed
    assert flushes == [loop_thread]
    assert errors(caplog) == []
    assert "master stopped" in [r.getMessage() for r in caplog.records]
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    assert saved_last_seen(master) == {"n1": expected}
    master.stop()  # idempotent: nothing more happens
    assert flushes == [loop_thread]


def test_a_shutdown_that_fails_still_ends_the_loop_and_saves_the_registry(
    master_factory, cluster_secret, caplog
):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    heard_after_saved(master, sock)
    loop_thread = master._thread

    async def broken() -> None:
        raise RuntimeError("boom")

    master._shutdown = broken
    flushes = record_flushes(master)
    master.stop(3.0)

    assert errors(caplog) == ["master shutdown failed: RuntimeError('boom'); stopping anyway"]
    assert not loop_thread.is_alive()
    assert flushes == [threading.current_thread()]  # from here, once the loop had ended
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    assert saved_last_seen(master) == {"n1": expected}
    sock.close()


def test_a_shutdown_that_does_not_finish_in_time_is_cut_short_and_the_registry_saved(
    master_factory, cluster_secret, caplog, released
):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    heard_after_saved(master, sock)
    loop_thread = master._thread
    # The shutdown holds the loop until stop() has given up waiting for it (and said so),
    # then returns without doing its work: the loop can stop, the registry is not saved.
    handler = ReleaseOnMessage("did not finish within", released)
    logging.getLogger("rpicluster.master").addHandler(handler)

    async def late() -> None:
        released.wait(RELEASE_AFTER)

    master._shutdown = late
    flushes = record_flushes(master)
    try:
        master.stop()  # the default limit, as rpicluster-master's run_forever() uses it
    finally:
        logging.getLogger("rpicluster.master").removeHandler(handler)

    assert errors(caplog) == ["master shutdown did not finish within 5 s; stopping anyway"]
    assert not loop_thread.is_alive()
    assert flushes == [threading.current_thread()]
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    assert saved_last_seen(master) == {"n1": expected}
    sock.close()


def test_stop_returns_while_the_loop_is_stuck_and_leaves_the_registry_to_it(
    master_factory, cluster_secret, caplog, released
):
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    loop_thread = master._thread

    async def stuck() -> None:
        released.wait(RELEASE_AFTER)

    master._shutdown = stuck
    flushes = record_flushes(master)
    master.stop(0.5)

    # stop() gave up on the loop: the registry belongs to the loop's thread, so nothing
    # outside it may read it while that thread runs.
    assert loop_thread.is_alive() and not released.is_set()
    assert flushes == []
    assert "master shutdown did not finish within 0.5 s; stopping anyway" in errors(caplog)
    released.set()
    wait_for(lambda: not loop_thread.is_alive(), what="the loop to end once released")
    sock.close()


def test_stop_returns_while_the_store_writer_is_stuck(master_factory, caplog, released):
    master = master_factory()
    store = master.store
    store.read(lambda conn: released.wait(RELEASE_AFTER), lambda result: None)
    loop_thread = master._thread

    master.stop(1.0)

    assert not released.is_set()  # stop() returned while the writer still waited
    assert not loop_thread.is_alive()
    assert f"{store.path}: writer did not finish within 1 s" in errors(caplog)
    released.set()


def test_stopping_a_master_that_never_started_does_nothing(make_config, tmp_path, caplog):
    from rpicluster.master import Master

    caplog.set_level(logging.INFO, logger="rpicluster")
    config = make_config(master={"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path)})
    master = Master(config)
    state = master.cluster_state()  # built here: there is no loop yet
    assert state["nodes"] == [] and state["master"]["started_at"] == 0.0
    master.stop()
    assert master.store is None and master.loop is None
    assert caplog.records == []


def test_periodic_work_that_fails_is_logged_and_runs_again(master_factory, cluster_secret, caplog):
    master = master_factory(cluster=QUIET)
    store = master.store
    save = store.save_nodes
    failures = []

    def failing(rows) -> None:
        if len(failures) < 2:
            failures.append(rows)
            raise RuntimeError("disk on fire")
        save(rows)

    store.save_nodes = failing
    wait_for(lambda: len(failures) == 2, what="two flushes failed")
    sock = join(master, cluster_secret)  # a new node: a changed row for the next flush
    wait_for(lambda: "n1" in saved_last_seen(master), what="the flush working again")
    failed = [r for r in caplog.records if r.getMessage() == "periodic _flush failed"]
    assert len(failed) == 2 and all(r.exc_info and r.exc_info[0] is RuntimeError for r in failed)
    sock.close()


# ------------------------------------------------------------------- starting


def test_start_says_where_it_listens_and_what_it_loaded(master_factory, cluster_secret, caplog):
    caplog.set_level(logging.INFO, logger="rpicluster.master")
    first = master_factory(cluster=QUIET)
    join(first, cluster_secret).close()
    state_dir = first.config.master.state_dir
    first.stop()
    caplog.clear()
    master = master_factory(cluster=QUIET, state_dir=state_dir)
    assert [r.getMessage() for r in caplog.records if "listening on" in r.getMessage()] == [
        f"master listening on 127.0.0.1:{master.port} (1 known nodes loaded from"
        f" {master.store.path})"
    ]


@pytest.mark.parametrize("which", ["socket_port", "metrics_port"])
def test_a_taken_port_stops_the_start_clearly_and_releases_the_rest(make_config, tmp_path, which):
    import dataclasses

    from rpicluster.master import Master

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = {"socket_bind_ip": "127.0.0.1", "state_dir": str(tmp_path)}
        if which == "metrics_port":
            settings["metrics_port"] = port
        config = make_config(cluster=QUIET, master=settings)
        main_port = port if which == "socket_port" else 0
        config = dataclasses.replace(
            config, master=dataclasses.replace(config.master, socket_port=main_port)
        )
        master = Master(config)
        with pytest.raises(OSError) as error:
            master.start()
    what = "master" if which == "socket_port" else "master metrics"
    assert str(error.value).startswith(f"{what} cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in str(error.value).lower()
    assert master.store._closed  # the store opened by start() is closed again
    if which == "metrics_port":
        assert master._listener.fileno() == -1  # the master's own port is released
    assert not master._thread.is_alive()  # the event loop's thread has ended


def test_an_empty_bind_address_listens_on_every_address(make_config, tmp_path, monkeypatch):
    """``socket_bind_ip =`` (allowed with [tls]) means all addresses; bound here to
    127.0.0.1 instead, so that the test opens nothing beyond loopback."""
    import dataclasses

    from rpicluster.master import Master

    asked = []
    listen = Master._listen

    def on_loopback(host, port):
        asked.append(host)
        return listen("127.0.0.1", port)

    monkeypatch.setattr(Master, "_listen", staticmethod(on_loopback))
    config = make_config(cluster=QUIET, master={"socket_port": 0, "state_dir": str(tmp_path)})
    config = dataclasses.replace(
        config, master=dataclasses.replace(config.master, socket_bind_ip="")
    )
    master = Master(config)
    master.start()
    try:
        assert asked == ["0.0.0.0"]
    finally:
        master.stop()


def test_started_at_is_the_wall_time_of_the_start_to_the_millisecond(make_config, tmp_path):
    from rpicluster.master import Master

    config = make_config(cluster=QUIET, master={"socket_port": 0, "state_dir": str(tmp_path)})
    master = Master(config)
    master.registry.wall = lambda: 1_800_000_000.123456
    master.start()
    try:
        started_at = master.cluster_state()["master"]["started_at"]
    finally:
        master.stop()
    assert started_at == 1_800_000_000.123 and isinstance(started_at, float)


def test_a_failure_after_listening_stops_the_start_instead_of_hanging_it(
    make_config, tmp_path, monkeypatch
):
    """start() waits for the loop's thread to say it listens: a failure in between (a
    periodic job that cannot be scheduled, say) must reach start(), never leave it waiting."""
    from rpicluster.master import Master

    def cannot_schedule(self, interval, fn):
        raise RuntimeError("no timer for you")

    monkeypatch.setattr(Master, "_every", cannot_schedule)
    config = make_config(cluster=QUIET, master={"state_dir": str(tmp_path)})
    master = Master(config)
    with pytest.raises(RuntimeError, match="no timer for you"):
        master.start()
    assert master._listener.fileno() == -1  # the port is released
    assert master.loop.is_closed()
    assert master.store._closed
    assert not master._thread.is_alive()


def test_every_periodic_job_is_cancelled_at_shutdown_however_often_the_others_ran(
    master_factory,
):
    """Each job keeps its own next tick: a fast job (the sweep) ticking many times must
    not push a slow job's timer (the 60 s ones) out of what the shutdown cancels."""
    master = master_factory(
        cluster={"heartbeat_interval": 0.1, "suspect_after": 0.2, "dead_after": 0.4}
    )  # a sweep every 0.02 s
    jobs = len(master._timers)
    last = [master._timers[0]]  # held, so that a new handle never reuses its id

    def sweep_ticked_often() -> bool:
        current = master._timers[0]  # the sweep's slot: a new handle every tick
        if current is not last[-1]:
            last.append(current)
        return len(last) > 30

    wait_for(sweep_ticked_often, what="the sweep ticking 30 times")
    timers = list(master._timers)
    assert len(timers) == jobs  # one slot per job, however often they ran
    master.stop()
    assert all(timer.cancelled() for timer in timers)


def test_a_peer_that_stops_reading_does_not_hold_up_the_stop(
    master_factory, cluster_secret, caplog
):
    """Its connection is given about a second to drain, then dropped: stop() ends in time
    and the peer, reading at last, comes to the end of its connection."""
    master = master_factory(cluster=QUIET)
    details = {f"key{i:02}": "v" * 190 for i in range(32)}  # about 6.6 KB per node
    slaves = []
    for i in range(16):  # 16 nodes: a cluster reply of about 110 KB
        sock = socket.create_connection(("127.0.0.1", master.port), timeout=10)
        p.client_handshake(
            sock, cluster_secret, kind=p.KIND_SLAVE, node_id=f"n{i}", role="basic", details=details
        )
        slaves.append(sock)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", master.port))
    p.client_handshake(client, cluster_secret, kind=p.KIND_CLIENT, node_id="cli", role="status")
    # About 6.6 MB of replies: more than the kernel holds (4 MB at most here), less than the
    # 8 MB after which the master drops a peer that does not read.
    client.sendall(p.make(p.QUERY, id=1, what="cluster") * 60)

    def buffered() -> int:
        return sum(
            conn.transport.get_write_buffer_size()
            for conn in master.connections
            if conn.kind == p.KIND_CLIENT and conn.transport is not None
        )

    def waiting() -> int:
        done = threading.Event()
        box = []
        master.loop.call_soon_threadsafe(lambda: (box.append(buffered()), done.set()))
        done.wait(10)
        return box[0] if box else 0

    wait_for(lambda: waiting() > 0, what="replies waiting in the master for the peer")
    master.stop()
    assert errors(caplog) == []  # the shutdown finished within stop()'s 5 s
    with pytest.raises(p.DisconnectionError):
        while True:
            p.recv_message(client)
    client.close()
    for sock in slaves:
        sock.close()


def test_the_metrics_listener_is_bound_to_the_masters_address_only(master_factory):
    """Bound to 127.0.0.1, it does not answer on 127.0.0.2 (loopback too, another address)."""
    for attempt in range(5):  # a port free a moment ago can be taken meanwhile
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            master = master_factory(cluster=QUIET, master={"metrics_port": port})
            break
        except OSError as exc:
            if "already in use" not in str(exc) or attempt == 4:
                raise
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=10).close()
    assert master.metrics is not None


def test_last_seen_times_reach_the_database_while_running(
    master_factory, cluster_secret, monkeypatch
):
    """Every LAST_SEEN_INTERVAL (60 s; shortened here) without waiting for a stop."""
    from rpicluster.master import server as server_module

    monkeypatch.setattr(server_module, "LAST_SEEN_INTERVAL", 0.3)
    master = master_factory(cluster=QUIET)
    sock = join(master, cluster_secret)
    heard_after_saved(master, sock)
    expected = master.registry.to_wall(master.registry.nodes["n1"].seen)
    wait_for(lambda: saved_last_seen(master) == {"n1": expected}, what="the heartbeat's time saved")
    sock.close()


def stop_in_background(master):
    """stop() on another thread, returned once the shutdown has begun on the loop."""
    stopper = threading.Thread(target=master.stop, name="test-stop")
    stopper.start()
    wait_for(lambda: master.stopping, what="the shutdown to begin")
    return stopper


def test_a_peer_reading_again_gets_its_queued_replies_then_the_goodbye(
    master_factory, cluster_secret, caplog
):
    """The shutdown lets a connection with replies still queued drain (for a second at
    most) before it drops what is left: a peer that reads gets them all, then the goodbye."""
    master = master_factory(cluster=QUIET)
    client, _conn, sent = queued_client(master, cluster_secret)
    stopper = stop_in_background(master)

    *replies, last = read_to_the_end(client)

    stopper.join(10)
    assert [reply["id"] for reply in replies] == list(range(1, sent + 1))
    assert last == {"type": p.GOODBYE, "reason": "master shutting down"}
    assert errors(caplog) == []
    client.close()


def test_a_peer_already_refused_gets_no_goodbye_after_its_error(
    master_factory, cluster_secret, caplog
):
    """A connection closed with an error, its replies still queued, is left to drain: the
    error is the last the peer reads, not followed by a goodbye."""
    master = master_factory(cluster=QUIET)
    client, conn, sent = queued_client(master, cluster_secret)
    client.sendall(p.encode({"type": "no-such-type"}))
    wait_for(lambda: conn.closed, what="the master to refuse the peer")
    stopper = stop_in_background(master)

    *replies, last = read_to_the_end(client)

    stopper.join(10)
    assert [reply["id"] for reply in replies] == list(range(1, sent + 1))
    assert last["type"] == p.ERROR and last["code"] == p.E_UNKNOWN_TYPE
    client.close()


def test_a_history_read_answered_during_the_shutdown_is_not_sent_after_the_goodbye(
    master_factory, cluster_secret, monkeypatch, released
):
    """The goodbye is a connection's last frame: a reply that comes back from the store's
    thread once the shutdown has said goodbye is dropped, even while the peer still reads."""
    from rpicluster.master import queries

    reading = threading.Event()

    def held(*args):
        reading.set()
        released.wait(RELEASE_AFTER)
        return original(*args)

    original = queries.read_history
    monkeypatch.setattr(queries, "read_history", held)
    master = master_factory(cluster=QUIET)
    slave = join(master, cluster_secret)
    client, conn, sent = queued_client(master, cluster_secret)
    answered = threading.Event()
    history_done = conn._history_done

    def done(*args) -> None:
        history_done(*args)
        answered.set()

    conn._history_done = done
    client.sendall(p.make(p.QUERY, id=sent + 1, what="history", node_id="n1"))
    assert reading.wait(10), "the history read never started"
    stopper = stop_in_background(master)
    released.set()
    assert answered.wait(10), "the history read never came back"

    *replies, last = read_to_the_end(client)

    stopper.join(10)
    assert [reply["id"] for reply in replies] == list(range(1, sent + 1))
    assert last == {"type": p.GOODBYE, "reason": "master shutting down"}
    client.close()
    slave.close()
