"""Alert delivery end to end: a real master, real slave processes, a real HTTP receiver.

The receiver is ``http.server`` on loopback. Killing a slave process (SIGKILL, no
goodbye) must bring exactly one ``firing`` notification, restarting it exactly
one ``resolved``; a receiver that never answers must delay nothing else and show
as failing in the master dict (``rpicluster status``, ``/healthz``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rpicluster.client import MasterClient
from rpicluster.master import webhook as wh
from tests.conftest import TEST_CLUSTER
from tests.helpers import wait_for

REPO = Path(__file__).resolve().parents[1]


class Receiver:
    """A webhook receiver on 127.0.0.1 that records each POST (``status`` to answer)."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.posts.append((dict(self.headers), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=s3cret"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def notes(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def blackhole():
    """A listener that accepts connections (the kernel does) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/never"
    sock.close()


@pytest.fixture
def slave_process(tmp_path, cluster_secret):
    """``rpicluster-slave`` processes; restart one with the same name = the same node id."""
    processes: list[subprocess.Popen] = []

    def start(port: int, name: str = "p") -> subprocess.Popen:
        state_dir = tmp_path / f"state-{name}"
        config = tmp_path / f"{name}.cfg"
        lines = ["[cluster]", f"secret = {cluster_secret}"]
        lines += [f"{key} = {value}" for key, value in TEST_CLUSTER.items()]
        lines += ["[slave]", "master_ip = 127.0.0.1", f"socket_port = {port}", "roles = basic"]
        lines += [f"state_dir = {state_dir}", "reconnect_base = 0.05", "reconnect_cap = 0.3"]
        config.write_text("\n".join(lines) + "\n")
        process = subprocess.Popen(
            [sys.executable, "-m", "rpicluster", "slave", "--config", str(config)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        node_file = state_dir / "node_id"
        process.node_id = wait_for(  # type: ignore[attr-defined]
            lambda: node_file.exists() and node_file.read_text().strip(), what="node id"
        )
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(5)


def state_of(master, node_id: str) -> str:
    node = master.registry.nodes.get(node_id)
    return node.state if node is not None else ""


def test_kill_a_slave_one_firing_restart_one_resolved(
    master_factory, receiver, slave_process, cluster_secret
):
    master = master_factory(alerts={"hold": 0.3, "webhook_url": receiver.url})
    process = slave_process(master.port)
    wait_for(lambda: state_of(master, process.node_id) == "alive", what="alive")
    wait_for(lambda: not master.alerts.first, what="a first evaluation")
    process.send_signal(signal.SIGKILL)
    process.wait(5)
    wait_for(lambda: receiver.posts, 10, what="a firing notification")
    process = slave_process(master.port)  # same state dir: the same node
    wait_for(lambda: state_of(master, process.node_id) == "alive", what="alive again")
    wait_for(lambda: len(receiver.posts) >= 2, 10, what="a resolved notification")
    # Settled: nothing more comes (each evaluation runs every second).
    evaluated = master.alerts.fired_total + master.alerts.resolved_total
    time.sleep(2.5)
    notes = receiver.notes()
    assert [(n["status"], n["alert"], n["node_id"]) for n in notes] == [
        ("firing", "node_dead", process.node_id),
        ("resolved", "node_dead", process.node_id),
    ]
    assert master.alerts.fired_total + master.alerts.resolved_total == evaluated == 2
    headers = receiver.posts[0][0]
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "rpicluster-alerts"
    state = master.cluster_state()["master"]["alerts"]
    assert state["firing_count"] == 0
    hook = state["webhook"]
    assert hook["ok"] is True and hook["sent_total"] == 2 and hook["queue"] == 0
    assert "s3cret" not in json.dumps(hook) and "/hook" not in hook["target"]


def test_a_receiver_that_never_answers_delays_nothing_else(
    master_factory, blackhole, slave_process, cluster_secret
):
    master = master_factory(alerts={"hold": 0, "webhook_url": blackhole, "webhook_timeout": 1.5})
    process = slave_process(master.port)
    wait_for(lambda: state_of(master, process.node_id) == "alive", what="alive")
    wait_for(lambda: not master.alerts.first, what="a first evaluation")
    process.send_signal(signal.SIGKILL)
    process.wait(5)
    wait_for(lambda: master.alerts.fired_total == 1, 5, what="the alert fired")
    # The sender is now stuck in its request; the master answers at once meanwhile.
    with MasterClient("127.0.0.1", master.port, cluster_secret, timeout=5) as client:
        for _ in range(20):
            started = time.monotonic()
            client.cluster_state()
            assert time.monotonic() - started < 0.5
    other = slave_process(master.port, "q")
    wait_for(lambda: state_of(master, other.node_id) == "alive", 5, what="a new node joins")

    def failing() -> Any:
        hook = master.cluster_state()["master"]["alerts"]["webhook"]
        return hook if hook["ok"] is False else None

    hook = wait_for(failing, 10, what="the webhook shown failing")
    assert "timed out" in hook["error"] and hook["sent_total"] == 0
    assert master.cluster_state()["master"]["alerts"]["firing_count"] == 1


def test_retries_with_backoff_then_gives_up_and_counts(receiver):
    receiver.status = 503
    hook = wh.Webhook(receiver.url, "json", timeout=2)
    hook.retry_first = 0.01
    hook.start()
    try:
        hook.put({"alert": "node_dead", "status": "firing", "summary": "x"})
        wait_for(lambda: hook.health()["failed_total"] == 1, 10, what="given up")
        health = hook.health()
        assert len(receiver.posts) == wh.ATTEMPTS == health["attempts_total"]
        assert health["ok"] is False and health["error"] == "HTTP 503 Service Unavailable"
        receiver.status = 200
        hook.put({"alert": "node_dead", "status": "resolved", "summary": "x"})
        wait_for(lambda: hook.health()["sent_total"] == 1, 10, what="delivered")
        # A give-up is recent: still not ok, with the reason.
        assert "given up" in hook.health()["error"]
    finally:
        hook.close()


def test_the_queue_is_bounded_and_drops_the_oldest(blackhole):
    hook = wh.Webhook(blackhole, "json", timeout=5)  # not started: nothing is sent
    for i in range(wh.QUEUE_LIMIT + 10):
        hook.put({"alert": "a", "status": "firing", "summary": str(i)})
    health = hook.health()
    assert health["queue"] == wh.QUEUE_LIMIT and health["dropped_total"] == 10
    assert health["ok"] is False
    assert hook._queue[0]["summary"] == "10"
    hook.close()
    assert hook.health()["dropped_total"] == wh.QUEUE_LIMIT + 10


def test_text_and_chat_formats(receiver):
    note = {
        "alert": "node_dead",
        "status": "firing",
        "severity": "critical",
        "summary": "pi-3 dead",
    }
    body, headers = wh.render(note, "text")
    assert body == b"[FIRING] node_dead: pi-3 dead"
    assert headers["Content-Type"].startswith("text/plain") and headers["Priority"] == "high"
    assert headers["Title"] == "rpicluster firing: node_dead"
    body, headers = wh.render(note, "chat")
    assert json.loads(body) == {"text": "[FIRING] node_dead: pi-3 dead"}
    for fmt in ("text", "chat"):
        hook = wh.Webhook(receiver.url, fmt)
        hook.start()
        hook.put(note)
        wait_for(lambda h=hook: h.health()["sent_total"] == 1, 5, what=f"{fmt} delivered")
        hook.close()
    assert receiver.posts[0][1] == b"[FIRING] node_dead: pi-3 dead"
    assert json.loads(receiver.posts[1][1])["text"].startswith("[FIRING]")


def test_an_unsendable_notification_does_not_stop_the_sender(receiver):
    hook = wh.Webhook(receiver.url, "json")
    hook.start()
    try:
        hook.put({"alert": "x", "status": "firing", "value": float("nan")})  # not JSON
        hook.put({"alert": "node_dead", "status": "firing", "summary": "after"})
        wait_for(lambda: hook.health()["sent_total"] == 1, 5, what="the next one delivered")
        assert hook.health()["failed_total"] == 1
        assert json.loads(receiver.posts[0][1])["summary"] == "after"
    finally:
        hook.close()
