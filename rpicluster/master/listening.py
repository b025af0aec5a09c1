"""The master's listening socket: accepting in batches, admitting, pausing when out of fds.

Split from the master's lifecycle (``server.py``) because this is the part a
flood of connections meets first, and it has its own concerns: a whole fleet
reconnecting at once after a restart (the backlog, batches of accepts without a
task or coroutine each), strangers holding connections before authenticating
(``admission.py`` decides, this module applies it: evicting a stale pending
connection, or pausing while every pending one is still progressing), and running out of file
descriptors without spinning. ``Listening`` is a mixin of ``Master``: it uses the
master's loop, counters and log limiters and creates one ``Connection`` per peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
import socket
from typing import TYPE_CHECKING, Any, Callable, Optional

from rpicluster import protocol as p
from rpicluster.master.connection import Connection

if TYPE_CHECKING:
    import ssl

    from rpicluster.master.admission import Admission
    from rpicluster.master.counters import Counters, LogLimiter

log = logging.getLogger("rpicluster.master")

LISTEN_BACKLOG = 4096  # a whole fleet reconnecting at once after a master restart
ACCEPT_BATCH = 256  # connections accepted per readiness event before other work runs
# Out of file descriptors (EMFILE/ENFILE) or kernel memory: stop accepting for a
# while, doubling from the first to the last delay, instead of retrying (and
# logging) thousands of times a second as asyncio's own accept loop does.
ACCEPT_RETRY_FIRST = 0.05
ACCEPT_RETRY_LAST = 1.0
# The unauthenticated table full of handshakes still progressing (admission.py):
# stop accepting this long, then look again; the kernel's backlog holds the connects.
ACCEPT_PAUSE = 0.05
FD_RESERVE = 128  # file descriptors kept for the store, logs and the like
WANTED_NOFILE = 65536  # what the master raises its soft RLIMIT_NOFILE to (up to the hard one)
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE towards WANTED_NOFILE; return it (0 when unknown)."""
    try:
        import resource
    except ImportError:  # not on a Pi
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(WANTED_NOFILE, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return 0 if soft == resource.RLIM_INFINITY else int(soft)


def _waiting(listener: socket.socket) -> bool:
    """True when a connection waits in the listener's backlog (one poll, no wait)."""
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class Listening:
    """Accepting connections for ``Master`` (a mixin: the attributes below are the master's)."""

    loop: asyncio.AbstractEventLoop
    stopping: bool
    max_connections: int
    admission: Admission
    counters: Counters
    log_refusals: LogLimiter
    tls_context: Optional[ssl.SSLContext]
    _listener: Optional[socket.socket]
    _accept_delay: float
    clock: Callable[[], float]

    def _fit_nofile(self) -> None:
        """Keep max_connections within what RLIMIT_NOFILE allows, raising the limit first."""
        nofile = raise_nofile_limit()
        if nofile and self.max_connections > nofile - FD_RESERVE:
            cap = max(16, nofile - FD_RESERVE)
            log.warning(
                "max_connections %d is above what RLIMIT_NOFILE %d allows; using %d"
                " (raise LimitNOFILE in the unit)",
                self.max_connections,
                nofile,
                cap,
            )
            self.max_connections = self.admission.max_connections = cap

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        """A non-blocking listening socket with a backlog for a whole fleet at once."""
        listener = socket.create_server(
            (host, port),
            family=socket.AF_INET6 if ":" in host else socket.AF_INET,
            backlog=LISTEN_BACKLOG,
        )
        listener.setblocking(False)
        return listener

    def _accept(self) -> None:
        """Accept a batch of connections, admitting each against the caps (admission.py)."""
        listener = self._listener
        if listener is None or self.stopping:
            return
        admission = self.admission
        for index in range(ACCEPT_BATCH):
            if admission.full():
                # Room is made only for a connection that waits: the readiness event
                # says so for the first of a batch, a poll of the listener for the rest.
                if index and not _waiting(listener):
                    return
                room = admission.make_room()
                if room.victim is None:
                    self._pause_accept(room.reason)
                    return
                room.victim.evict(room.reason)
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._accept_delay = ACCEPT_RETRY_FIRST
            sock.setblocking(False)
            address = str(addr[0]) if isinstance(addr, tuple) else ""
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "?"
            reason = admission.refuse_reason(address)
            if reason:
                self.counters.connections_refused_total += 1
                self.log_refusals(
                    self.clock(), logging.WARNING, "connection from %s refused: %s", peer, reason
                )
                if self.tls_context is None:  # with TLS no frame can precede the handshake
                    with contextlib.suppress(OSError):
                        sock.send(p.make(p.ERROR, code=p.E_TOO_MANY_CONNECTIONS, message=reason))
                sock.close()
                continue
            conn = Connection(self, address, peer)
            victim = admission.admit(conn, address)
            if victim is not None:
                victim.evict()
            self._serve(sock, conn, addr)

    def _serve(self, sock: socket.socket, conn: Connection, addr: Any) -> None:
        """Wrap an accepted socket in a transport for ``conn``.

        asyncio's own accept loop calls the loop's ``_make_socket_transport``
        directly; doing the same here (when the loop has it) costs no task, no
        coroutine and no future per connection, which is what a flood of short
        connections would otherwise spend the master's CPU on.
        """
        make = getattr(self.loop, "_make_socket_transport", None)
        if make is None:
            self.loop.create_task(self._attach(sock, conn))
            return
        try:
            make(sock, conn, extra={"peername": addr})
        except Exception as exc:  # the peer vanished in between; nothing to serve
            log.debug("connection from %s could not be set up: %r", conn.peer, exc)
            sock.close()
            self.admission.release(conn)

    async def _attach(self, sock: socket.socket, conn: Connection) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock=sock)
        except Exception as exc:  # the peer vanished in between; nothing to serve
            log.debug("connection from %s could not be set up: %r", conn.peer, exc)
            sock.close()
            self.admission.release(conn)

    def _accept_failed(self, exc: OSError) -> None:
        listener = self._listener
        if exc.errno not in _RESOURCE_ERRORS or listener is None:
            self.log_refusals(self.clock(), logging.ERROR, "accept() failed: %s", exc)
            return
        delay = self._accept_delay
        self._accept_delay = min(ACCEPT_RETRY_LAST, delay * 2)
        self.counters.accept_errors_total += 1
        self.log_refusals(
            self.clock(),
            logging.ERROR,
            "cannot accept connections: %s; not accepting for %g s",
            exc,
            delay,
        )
        self._stop_accepting(listener, delay)

    def _pause_accept(self, why: str) -> None:
        """Stop accepting for ACCEPT_PAUSE: evicting a progressing handshake wastes it."""
        listener = self._listener
        if listener is None:
            return
        self.counters.accept_paused_total += 1
        self.log_refusals(
            self.clock(),
            logging.INFO,
            "unauthenticated table full (%s): not accepting for %g s",
            why,
            ACCEPT_PAUSE,
        )
        self._stop_accepting(listener, ACCEPT_PAUSE)

    def _stop_accepting(self, listener: socket.socket, delay: float) -> None:
        """Leave connects in the kernel's backlog for ``delay`` seconds, then accept again."""
        self.loop.remove_reader(listener.fileno())
        self.loop.call_later(delay, self._resume_accept)

    def _resume_accept(self) -> None:
        if self._listener is not None and not self.stopping:
            self.loop.add_reader(self._listener.fileno(), self._accept)
