"""Unit tests of RpiBasicSlaveThread against a scripted master on 127.0.0.1.

The scripted master can do what the real one never does on purpose (go silent
without closing TCP), so the slave's own link logic is tested here; the
integration tests run the same slave against the real master.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

import pytest

from rpicluster import protocol
from rpicluster.config import ConfigError, parse_config
from rpicluster.slave import NotConnectedError, QueryError, RpiBasicSlaveThread
from tests.helpers import wait_for

SECRET = "unit-test-secret-0123456789"


class ScriptedMaster:
    """Accepts connections, authenticates with ``secret``, acks heartbeats, records frames."""

    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.received: list[tuple[int, dict[str, Any]]] = []  # (connection no., message)
        self.hellos: list[dict[str, Any]] = []
        self.auth_failures = 0
        self.silent = threading.Event()
        self.master_extra: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.accepted = 0  # connections accepted so far (counted before they are served)
        self.closed = False
        self.accept_thread = threading.Thread(target=self._accept, daemon=True)
        self.accept_thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.closed:  # accepted while close() ran: refuse it, no welcome
                    conn.close()
                    return
                self.conns.append(conn)
                self.accepted = number = len(self.conns)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        try:
            nonce = protocol.new_nonce()
            protocol.send_frame(
                conn,
                protocol.make(protocol.CHALLENGE, protocol=protocol.PROTOCOL_VERSION, nonce=nonce),
            )
            hello = protocol.recv_message(conn)
            expected = protocol.hello_mac(
                self.secret, nonce, hello["nonce"], hello["kind"], hello["node_id"], hello["role"]
            )
            if not protocol.macs_equal(hello["mac"], expected):
                with self.lock:
                    self.auth_failures += 1
                protocol.send_frame(
                    conn,
                    protocol.make(protocol.ERROR, code=protocol.E_AUTH_FAILED, message="bad mac"),
                )
                conn.close()
                return
            with self.lock:
                self.hellos.append(hello)
            protocol.send_frame(
                conn,
                protocol.make(
                    protocol.WELCOME,
                    protocol=protocol.PROTOCOL_VERSION,
                    mac=protocol.welcome_mac(self.secret, hello["nonce"], nonce),
                    master={"hostname": "scripted", "port": self.port, **self.master_extra},
                ),
            )
            while True:
                message = protocol.recv_message(conn)
                with self.lock:
                    self.received.append((number, message))
                if self.silent.is_set():
                    continue
                if message["type"] == protocol.HEARTBEAT:
                    protocol.send_frame(
                        conn, protocol.make(protocol.HEARTBEAT_ACK, seq=message["seq"])
                    )
                elif message["type"] == protocol.QUERY:
                    if message["what"] == "echo":
                        reply = {"ok": True, "data": {k: v for k, v in message.items()}}
                    else:
                        reply = {"ok": False, "error": f"unknown query {message['what']!r}"}
                    protocol.send_frame(
                        conn, protocol.make(protocol.REPLY, id=message["id"], **reply)
                    )
        except (OSError, protocol.ProtocolError, protocol.DisconnectionError):
            pass
        finally:
            conn.close()

    def messages(self, msg_type: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for _, m in self.received if m["type"] == msg_type]

    def connection_count(self) -> int:
        with self.lock:
            return len(self.hellos)

    def close(self) -> None:
        """Stop listening and drop every connection, without goodbye; returns once done.

        close() alone does not wake a thread blocked in accept() on Linux (it would
        still accept one more connection), so the listener is shut down first and
        the accept thread joined: after close() no connection is ever served.
        """
        with self.lock:
            self.closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() with EINVAL
        self.accept_thread.join(5)
        assert not self.accept_thread.is_alive(), "scripted master still accepting"
        self.listener.close()
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()


@pytest.fixture
def scripted():
    master = ScriptedMaster(SECRET)
    yield master
    master.close()


@pytest.fixture
def make_slave():
    threads: list[RpiBasicSlaveThread] = []

    def make(port: int, cls: type = RpiBasicSlaveThread, **kwargs: Any) -> RpiBasicSlaveThread:
        options: dict[str, Any] = {
            "secret": SECRET,
            "node_id": f"node-{len(threads)}",
            "heartbeat_interval": 0.05,
            "dead_after": 0.5,
            "reconnect_base": 0.05,
            "reconnect_cap": 0.2,
        }
        options.update(kwargs)
        thread = cls("127.0.0.1", port, **options)
        threads.append(thread)
        thread.start()
        return thread

    yield make
    for thread in threads:
        thread.stop()
    for thread in threads:
        thread.join(2)
        assert not thread.is_alive(), f"{thread.name} did not stop"


def test_join_sends_details_and_heartbeats(scripted, make_slave):
    began = time.monotonic()
    slave = make_slave(scripted.port)
    hello = wait_for(lambda: scripted.hellos and scripted.hellos[0], what="hello")
    assert hello["kind"] == "slave" and hello["role"] == "basic"
    assert hello["node_id"] == "node-0"
    details = hello["details"]
    assert details["hostname"] == socket.gethostname()
    for key in ("ram_total", "cpu_model", "cpu_cores", "os", "kernel", "architecture"):
        assert details[key], key
    wait_for(lambda: len(scripted.messages("heartbeat")) >= 5, what="5 heartbeats")
    seqs = [m["seq"] for m in scripted.messages("heartbeat")]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    wait_for(lambda: slave.last_rtt is not None, what="a heartbeat round trip")
    # A round trip measured within this test cannot be longer than the test so far
    # (how fast loopback is belongs in bench/, not here).
    assert 0 <= slave.last_rtt <= time.monotonic() - began
    assert slave.master_info["hostname"] == "scripted"
    assert slave.connected.is_set()


def test_the_masters_heartbeat_interval_wins_over_a_disagreeing_config(
    scripted, make_slave, caplog
):
    scripted.master_extra = {"heartbeat_interval": 0.02, "dead_after": 0.4}
    slave = make_slave(scripted.port, heartbeat_interval=5.0, dead_after=30)
    wait_for(slave.connected.is_set, what="connected")
    # At its own 5 s interval, 10 heartbeats would take 45 s: 10 s proves the master's won.
    wait_for(lambda: len(scripted.messages("heartbeat")) >= 10, what="fast heartbeats")
    assert any("using the master's" in r.getMessage() for r in caplog.records)


def test_request_returns_data_and_raises_the_masters_error(scripted, make_slave):
    slave = make_slave(scripted.port)
    wait_for(slave.connected.is_set, what="connected")
    assert slave.request("echo", answer=42)["answer"] == 42
    with pytest.raises(QueryError, match="unknown query 'nope'"):
        slave.request("nope")
    scripted.silent.set()
    with pytest.raises((TimeoutError, NotConnectedError)):
        slave.request("echo", timeout=0.1)


def test_send_refuses_a_type_it_cannot_send(scripted, make_slave):
    slave = make_slave(scripted.port)
    wait_for(slave.connected.is_set, what="connected")
    with pytest.raises(ValueError, match="cannot send 'hello'"):
        slave.send("hello", x=1)


def test_send_while_offline_raises_not_connected():
    slave = RpiBasicSlaveThread("127.0.0.1", 9, secret=SECRET, node_id="offline")
    with pytest.raises(NotConnectedError):
        slave.send("vitals", vitals={"ts": 1.0})


def test_silent_master_is_declared_lost_and_the_slave_reconnects(scripted, make_slave):
    slave = make_slave(scripted.port, heartbeat_interval=0.05, dead_after=0.3)
    wait_for(slave.connected.is_set, what="connected")
    scripted.silent.set()
    started = time.monotonic()
    # The TCP connection stays up: only the slave's own dead_after can notice.
    wait_for(lambda: not slave.connected.is_set(), what="master declared lost")
    lost_after = time.monotonic() - started
    # Not before dead_after since the last ack, which came at most one interval earlier.
    assert lost_after >= 0.3 - 0.05, lost_after
    scripted.silent.clear()
    wait_for(lambda: slave.connections >= 2, what="reconnection")


def test_wrong_secret_is_refused_logged_and_retried(scripted, make_slave, caplog):
    caplog.set_level(logging.DEBUG, logger="rpicluster.slave")
    slave = make_slave(scripted.port, secret="a-wrong-secret-0123456789")
    wait_for(lambda: scripted.auth_failures >= 3, what="three refused attempts")
    assert slave.is_alive() and not slave.connected.is_set()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "no error logged for the refused secret"
    assert "auth_failed" in errors[0].getMessage()
    assert "secret" in errors[0].getMessage()


def test_unreachable_master_is_retried_and_joined_when_it_appears(make_slave):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on port now
    slave = make_slave(port)
    wait_for(lambda: slave.backoff.attempt >= 3, what="three refused attempts")
    assert not slave.connected.is_set()
    master = ScriptedMaster(SECRET, port)
    try:
        wait_for(slave.connected.is_set, what="join once the master is up")
    finally:
        master.close()


def test_stop_says_goodbye_and_ends_promptly(scripted, make_slave):
    # Long intervals: a stop that waited for the next heartbeat tick (30 s) or for
    # dead_after (60 s) instead of ending at once would blow the bound below.
    slave = make_slave(scripted.port, heartbeat_interval=30, dead_after=60)
    wait_for(slave.connected.is_set, what="connected")
    started = time.monotonic()
    slave.stop()
    slave.join(20)
    assert not slave.is_alive()
    assert time.monotonic() - started < 10
    # The scripted master reads the goodbye on its own thread: await it.
    goodbyes = wait_for(lambda: scripted.messages("goodbye"), what="the goodbye read")
    assert [g["reason"] for g in goodbyes] == ["slave stopping"]


def test_stop_during_backoff_does_not_wait_it_out():
    slave = RpiBasicSlaveThread(
        "127.0.0.1", 9, secret=SECRET, node_id="n", reconnect_base=30, reconnect_cap=60
    )
    slave.start()
    wait_for(lambda: slave.backoff.attempt >= 1, what="first failed attempt")
    started = time.monotonic()
    slave.stop()
    slave.join(20)
    # The backoff is 30-60 s: anything well under it proves stop() cut it short.
    assert not slave.is_alive() and time.monotonic() - started < 10


class Slow(RpiBasicSlaveThread):
    role = "slow"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def perform_action(self) -> None:
        self.release.wait(5)  # blocks like a long computation, ignoring wait()
        self.wait(None)


def test_slow_perform_action_does_not_stop_heartbeats(scripted, make_slave):
    slave = make_slave(scripted.port, cls=Slow)
    wait_for(slave.connected.is_set, what="connected")
    before = len(scripted.messages("heartbeat"))
    wait_for(
        lambda: len(scripted.messages("heartbeat")) >= before + 10,
        what="heartbeats during a blocked perform_action",
    )
    assert slave.connections == 1
    slave.release.set()


class Failing(RpiBasicSlaveThread):
    role = "failing"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def perform_action(self) -> None:
        self.calls += 1
        if self.calls <= 3:
            raise RuntimeError(f"boom {self.calls}")
        self.wait(None)


def test_exceptions_in_perform_action_are_reported_and_never_fatal(scripted, make_slave, caplog):
    caplog.set_level(logging.ERROR, logger="rpicluster.slave")
    slave = make_slave(scripted.port, cls=Failing)
    reports = wait_for(
        lambda: len(scripted.messages("action_error")) >= 3 and scripted.messages("action_error"),
        what="three action_error reports",
    )
    assert [r["count"] for r in reports] == [1, 2, 3]
    assert reports[0]["error"] == "RuntimeError: boom 1"
    wait_for(lambda: slave.calls == 4, what="the loop going on after the errors")
    assert slave.is_alive() and slave.connections == 1 and slave.action_errors == 3
    first = [r for r in caplog.records if "perform_action() failed" in r.getMessage()][0]
    assert first.exc_info is not None  # the first of a streak carries the traceback


class Custom(RpiBasicSlaveThread):
    pass


def test_a_role_name_the_master_would_refuse_is_refused_at_once():
    class Blank(RpiBasicSlaveThread):
        role = "  padded "

    with pytest.raises(ValueError, match="Blank.role '  padded ' must be 1..200 printable"):
        Blank("127.0.0.1", 9, secret=SECRET, node_id="n")


def test_role_name_is_the_class_path_unless_set():
    assert RpiBasicSlaveThread.role_name() == "basic"
    assert Custom.role_name() == f"{__name__}:Custom"
    assert Slow.role_name() == "slow"


CONFIG = """
[cluster]
secret = {secret}
heartbeat_interval = 0.2
suspect_after = 0.5
dead_after = 1.5
max_frame_size = 16384
handshake_timeout = 2
[slave]
master_ip = 127.0.0.1
socket_port = 6000
state_dir = {state_dir}
reconnect_base = 0.1
reconnect_cap = 0.7
"""


def test_from_config_takes_every_setting(tmp_path):
    config = parse_config(CONFIG.format(secret=SECRET, state_dir=tmp_path), "t.cfg")
    slave = RpiBasicSlaveThread.from_config(config)
    assert slave.server_address == ("127.0.0.1", 6000)
    assert slave.heartbeat_interval == 0.2 and slave.dead_after == 1.5
    assert slave.backoff.base == 0.1 and slave.backoff.cap == 0.7
    assert slave.max_frame_size == 16384 and slave.handshake_timeout == 2
    assert slave.config is config
    assert slave.node_id == (tmp_path / "node_id").read_text().strip()
    assert RpiBasicSlaveThread.from_config(config).node_id == slave.node_id


def test_from_config_with_an_unwritable_state_dir_names_the_key(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = parse_config(CONFIG.format(secret=SECRET, state_dir=blocker / "sub"), "t.cfg")
    with pytest.raises(ConfigError, match=r"t\.cfg: \[slave\] state_dir: .*state directory"):
        RpiBasicSlaveThread.from_config(config)


def _count_spreads(slave: RpiBasicSlaveThread) -> list[int]:
    calls: list[int] = []
    original = slave.backoff.spread_fully

    def spy() -> None:
        calls.append(1)
        original()

    slave.backoff.spread_fully = spy  # type: ignore[method-assign]
    return calls


def test_a_master_goodbye_spreads_the_reconnect_over_the_whole_window(master, make_slave):
    """A planned master restart reaches every slave at once: they must not stampede it."""
    slave = make_slave(master.port, secret=master.config.cluster.secret)
    wait_for(slave.connected.is_set, what="connected")
    spreads = _count_spreads(slave)
    master.stop()
    wait_for(lambda: spreads, what="the backoff spread after the master's goodbye")
    assert slave.backoff.ceiling() == slave.backoff.cap


def test_a_lost_connection_without_goodbye_retries_quickly(scripted, make_slave):
    slave = make_slave(scripted.port)
    wait_for(slave.connected.is_set, what="connected")
    spreads = _count_spreads(slave)
    # close() returns once nothing listens: the slave's reconnects are refused from
    # here on, so "disconnected" and the failed attempt are states that last.
    scripted.close()  # the connection drops, no goodbye
    wait_for(lambda: not slave.connected.is_set(), what="disconnected")
    wait_for(lambda: slave.backoff.attempt >= 1, what="a reconnect attempt")
    assert spreads == []
    assert slave.connections == 1 and scripted.accepted == 1
