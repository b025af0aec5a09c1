"""Shared test helpers: await a condition instead of sleeping; run a call on the master's loop."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first, so a
    failing test says which condition never came true.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def on_loop(master: Any, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on the master's event loop and return its result (or raise its error).

    The master's state belongs to its loop's thread; a test that reads or changes
    it from its own thread would race the loop.
    """
    done = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc
        done.set()

    master.loop.call_soon_threadsafe(run)
    assert done.wait(10), "the event loop did not run the call"
    if "error" in box:
        raise box["error"]
    return box["value"]


def queued_client(master: Any, secret: str) -> tuple[Any, Any, int]:
    """A client connection with replies waiting in the master (more than the kernel took):
    ``(socket, the master's Connection, how many queries it sent)``. The client's small
    receive buffer keeps what waits small; it has read nothing yet."""
    import socket

    from rpicluster import protocol as p

    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", master.port))
    p.client_handshake(client, secret, kind=p.KIND_CLIENT, node_id="cli", role="status")
    (conn,) = [conn for conn in list(master.connections) if conn.kind == p.KIND_CLIENT]
    read, sent = master.counters.messages_total, 0
    while not on_loop(master, conn.transport.get_write_buffer_size):
        assert sent < 100_000, "the kernel took every reply"
        client.sendall(b"".join(p.make(p.QUERY, id=sent + i, what="cluster") for i in range(1, 21)))
        sent += 20
        messages_read(master, read + sent)  # the batch answered before the next look
    return client, conn, sent


def messages_read(master: Any, count: int) -> None:
    wait_for(lambda: master.counters.messages_total >= count, what=f"{count} messages read")


def read_to_the_end(sock: Any) -> list[dict[str, Any]]:
    """Every message until the peer closes the connection."""
    from rpicluster import protocol as p

    frames = []
    while True:
        try:
            frames.append(p.recv_message(sock))
        except p.DisconnectionError:
            return frames


class Clock:
    """A clock a test sets by hand (``clock.now += 1``), for code that takes one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
