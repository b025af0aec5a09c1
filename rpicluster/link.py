"""The slave's *link*: one authenticated connection to the master, and its thread.

Split from ``slave.py`` because the link is the slave's hot path and has one job:
after the handshake, one thread per connection is the only reader of the socket,
sends the heartbeats on their own schedule (so a slow ``perform_action()`` never
makes the node look dead), measures their round trip, hands query replies to
the role thread waiting for them, and declares the master lost when nothing
arrives for ``dead_after`` seconds. ``slave.py`` keeps the role's API,
``joining.py`` the loop that opens a link and opens it again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import protocol

if TYPE_CHECKING:
    from rpicluster.slave import RpiBasicSlaveThread

# The slave's one logger (as before the split): journal filters and tests name it.
logger = logging.getLogger("rpicluster.slave")


class NotConnectedError(ConnectionError):
    """The slave has no live connection to the master right now."""


class QueryError(Exception):
    """The master answered a query with ``ok: false``; ``str()`` is its error."""


class Link:
    """One authenticated connection: its socket, heartbeats and pending queries.

    The link thread is the only reader of the socket; writers (heartbeats, the
    role's ``send()``, ``stop()``'s goodbye) share one lock so frames never mix.
    """

    def __init__(
        self, slave: RpiBasicSlaveThread, sock: Any, interval: float, dead_after: float
    ) -> None:
        self.slave = slave
        self.sock = sock
        self.interval = interval
        self.dead_after = dead_after
        self.send_lock = threading.Lock()
        self.closed = threading.Event()
        self.close_reason = ""
        self.error_code: Optional[str] = None
        self.master_left = False  # the master said goodbye (a planned shutdown)
        self.pending: dict[int, list[Any]] = {}  # query id -> [Event, reply]
        self.pending_lock = threading.Lock()
        self.sent_at: dict[int, float] = {}  # heartbeat seq -> monotonic send time
        self.last_heard = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"{slave.name}-link", daemon=True)

    # ------------------------------------------------------------------ writing

    def send(self, frame: bytes) -> None:
        if self.closed.is_set():
            raise NotConnectedError("not connected to the master")
        with self.send_lock:
            try:
                protocol.send_frame(self.sock, frame)
            except (protocol.DisconnectionError, socket.timeout) as exc:
                self.close(f"send failed: {exc}")
                raise NotConnectedError(f"connection to the master lost: {exc}") from None

    def close(self, reason: str) -> None:
        """End the link (idempotent); wakes the link thread and every waiter."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self.pending_lock:
            for slot in self.pending.values():
                slot[0].set()
        self.slave._interrupt.set()

    # ------------------------------------------------------------------ reading

    def _run(self) -> None:
        slave = self.slave
        decoder = protocol.FrameDecoder(slave.max_frame_size)
        seq = itertools.count(1)
        next_beat = time.monotonic()
        try:
            while not self.closed.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(next(seq))
                    next_beat = max(next_beat + self.interval, now)
                if now - self.last_heard > self.dead_after:
                    self.close(f"no word from the master for {now - self.last_heard:.1f} s")
                    break
                timeout = min(next_beat, self.last_heard + self.dead_after) - now
                # TLS may hold decrypted bytes already; select() sees only the socket.
                pending = getattr(self.sock, "pending", None)
                if pending is not None and pending():
                    readable = [self.sock]
                else:
                    readable, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
                if not readable:
                    continue
                try:
                    data = self.sock.recv(65536)
                except (OSError, socket.timeout) as exc:
                    self.close(f"connection lost: {exc}")
                    break
                if not data:
                    self.close("connection closed by the master")
                    break
                self.last_heard = time.monotonic()
                for body in decoder.feed(data):
                    self._dispatch(protocol.decode_body(body))
        except protocol.ProtocolError as exc:
            self.close(f"master sent a bad frame ({exc.code}): {exc.message}")
        except NotConnectedError:
            pass
        except (OSError, ValueError) as exc:  # select on a socket closed under us
            self.close(f"connection lost: {exc}")
        finally:
            self.close(self.close_reason or "link ended")
            with contextlib.suppress(OSError):
                self.sock.close()

    def _heartbeat(self, seq: int) -> None:
        self.sent_at[seq] = time.monotonic()
        if len(self.sent_at) > 64:  # acks that never came: forget the oldest
            del self.sent_at[min(self.sent_at)]
        self.send(protocol.make(protocol.HEARTBEAT, seq=seq, sent_at=time.time()))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == protocol.HEARTBEAT_ACK:
            sent = self.sent_at.pop(message["seq"], None)
            if sent is not None:
                self.slave.last_rtt = time.monotonic() - sent
        elif kind == protocol.REPLY:
            with self.pending_lock:
                slot = self.pending.get(message["id"])
            if slot is not None:
                slot[1] = message
                slot[0].set()
        elif kind == protocol.ERROR:
            self.error_code = message["code"]
            logger.error("master reports error %s: %s", message["code"], message["message"][:200])
            if message["code"] in (protocol.E_REPLACED, protocol.E_AUTH_FAILED):
                self.close(f"master closed the connection ({message['code']})")
        elif kind == protocol.REFUSED:
            # One message was refused (a limit of docs/protocol.md); the link stays up.
            logger.warning(
                "master refused %d message(s): %s: %s",
                message["count"],
                message["code"],
                message["message"][:200],
            )
        elif kind == protocol.GOODBYE:
            self.master_left = True
            self.close(f"master said goodbye: {message['reason'][:200]}")
        else:
            logger.debug("ignoring %s message from the master", kind)
