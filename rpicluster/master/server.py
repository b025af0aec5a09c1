"""The master's lifecycle: one asyncio event loop in a thread, started, swept, stopped.

Callbacks instead of a coroutine per connection or per message keep a heartbeat
to a few tens of microseconds, which is what lets one Pi core serve 10,000
slaves. The loop runs in a background thread so the master can be embedded in
tests and in ``rpicluster-master`` alike; the registry is touched only from it.

``Master`` is assembled from three seams: this module owns what has a lifetime
(start, the periodic work of the loop, the clean stop that saves every row),
``listening.py`` the listening socket and admission of new connections, and
``views.py`` what the master tells about itself and its fleet.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import socket
import threading
from typing import Any, Optional

from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.config import Config
from rpicluster.master import upkeep
from rpicluster.master.admission import Admission
from rpicluster.master.alerts import EVALUATE_INTERVAL, AlertEngine
from rpicluster.master.connection import Connection
from rpicluster.master.counters import Counters, LogLimiter
from rpicluster.master.listening import ACCEPT_RETRY_FIRST, Listening
from rpicluster.master.metrics import MetricsServer
from rpicluster.master.peertls import bound_identity
from rpicluster.master.registry import DEAD, Registry
from rpicluster.master.store import Store
from rpicluster.master.views import ClusterViews
from rpicluster.master.webhook import Webhook

log = logging.getLogger("rpicluster.master")

FLUSH_INTERVAL = 0.5  # seconds between two batches of changed rows to the store
# Seconds between two batches of heartbeat times to the store. State changes are
# written within FLUSH_INTERVAL and every time is written at a clean stop, so this
# only bounds how stale "last seen" is after a crash. A long interval spares a Pi's
# SD card 10,000 row updates every few seconds, and the event loop the stall that
# each batch's GIL contention costs (seen as heartbeat round-trip tail at 10,000).
LAST_SEEN_INTERVAL = 60.0
FORGET_INTERVAL = 60.0  # seconds between two looks for nodes gone longer than forget_after
CLOSE_TIMEOUT = 5.0  # seconds a closed connection may take to flush before it is aborted
STALL_WARNING = 1.0  # seconds of event-loop lateness worth a warning
READ_BUFFER = 256 * 1024  # bytes read from a socket at once, shared by all connections


class Master(Listening, ClusterViews):
    """The rpicluster master: ``start()``, ``cluster_state()``, ``stop()``, ``run_forever()``."""

    def __init__(self, config: Config) -> None:
        if config.master is None:
            raise ValueError(f"{config.path}: a master needs a [master] section")
        self.config = config
        cluster = config.cluster
        self.registry = Registry(cluster.suspect_after, cluster.dead_after)
        self.clock = self.registry.clock
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.counters = Counters()
        self.connections: set[Connection] = set()
        self.store: Store = None  # type: ignore[assignment]  # opened by start()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.port = config.master.socket_port
        self.stopping = False
        self.started_at = 0.0
        self.hostname = socket.gethostname()
        self._listener: Optional[socket.socket] = None
        self._accept_delay = ACCEPT_RETRY_FIRST
        settings = config.master
        self.max_connections = settings.max_connections
        self.admission = Admission(
            settings.max_connections,
            settings.max_unauthenticated,
            settings.max_unauthenticated_per_address,
            cluster.handshake_timeout,
            self.clock,
        )
        # [tls]: every connection is TLS with a client certificate of the cluster CA;
        # identities maps a certificate's name to the node id it speaks as.
        self.tls_context = tlsmod.server_context(config.tls) if config.tls else None
        self.tls_status: dict[str, Any] = (
            tlsmod.own_status(config.tls) if config.tls else {"enabled": False}
        )
        self.identities: dict[str, str] = {}
        self._thread: Optional[threading.Thread] = None
        self._timers: list[asyncio.TimerHandle] = []
        self._last_sweep = self.clock()
        self._final_flush_done = False  # set by _shutdown once the store has every row
        self.close_timeout = CLOSE_TIMEOUT
        # A tenth of forget_after, so a short one (a test's) is honoured closely.
        self.forget_interval = min(FORGET_INTERVAL, max(0.25, settings.forget_after / 10))
        self.log_joins = LogLimiter("joins")
        self.log_leaves = LogLimiter("disconnections")
        self.log_deaths = LogLimiter("silent nodes marked dead")
        self.log_refusals = LogLimiter("refused connections")
        self.log_members = LogLimiter("refused member messages")
        self.log_loop = LogLimiter("event loop errors")
        self.log_alerts = LogLimiter("alert notifications")
        self.alerts = AlertEngine(
            config.alerts, self.hostname, clock=self.clock, wall=self.registry.wall
        )
        self.webhook: Optional[Webhook] = None
        self.metrics: Optional[MetricsServer] = None  # [master] metrics_port, started in _run
        if config.alerts.webhook_url:
            self.webhook = Webhook(
                config.alerts.webhook_url,
                config.alerts.webhook_format,
                config.alerts.webhook_timeout,
            )
        # Often enough to mark a silent node dead well within dead_after + 0.5 s,
        # rarely enough to cost nothing with 10,000 nodes.
        self.sweep_interval = min(0.25, max(0.02, cluster.dead_after / 20))

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Open the store, load the known nodes, listen; returns once accepting."""
        settings = self.config.master
        assert settings is not None
        self.store = Store(settings.state_dir, settings.history_window)
        rows = self.store.load_nodes()
        self._fit_nofile()
        self.registry.load(rows)
        for node in self.registry.nodes.values():
            name = bound_identity(node)
            if name:
                self.identities[name] = node.node_id
        self.started_at = round(self.registry.wall(), 3)
        self.store.start()
        if self.webhook is not None:
            self.webhook.start()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="rpicluster-master", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join(5)
            self.store.close()
            if self.webhook is not None:
                self.webhook.close()
            raise
        log.info(
            "master listening on %s:%d (%d known nodes loaded from %s)",
            settings.socket_bind_ip,
            self.port,
            len(rows),
            self.store.path,
        )

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            listener = self._open()
        except BaseException as exc:  # start() waits on ready: it must always hear back
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            listener.close()
            self.loop.close()

    def _open(self) -> socket.socket:
        """The loop, the listener, the metrics port and the periodic jobs, or the reason why not.

        Runs on the loop's thread. Whatever fails, everything opened so far is
        closed again and the exception says what could not be done.
        """
        loop = self.loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        settings = self.config.master
        assert settings is not None
        host = settings.socket_bind_ip or "0.0.0.0"
        listener: Optional[socket.socket] = None
        try:
            try:
                listener = self._listen(host, settings.socket_port)
            except BaseException as exc:
                raise OSError(
                    f"master cannot listen on {settings.socket_bind_ip}:{settings.socket_port}:"
                    f" {exc}"
                ) from exc
            self._listener = listener
            self.port = listener.getsockname()[1]
            if settings.metrics_port:
                self.metrics = MetricsServer(self, host, settings.metrics_port)
                try:
                    loop.run_until_complete(self.metrics.start())
                except BaseException as exc:
                    where = f"{host}:{settings.metrics_port}"
                    raise OSError(f"master metrics cannot listen on {where}: {exc}") from exc
            loop.add_reader(listener.fileno(), self._accept)
            self._every(self.sweep_interval, self._sweep)
            self._every(FLUSH_INTERVAL, self._flush)
            self._every(LAST_SEEN_INTERVAL, self._flush_last_seen)
            self._every(self.forget_interval, self._forget_stale)
            self._every(EVALUATE_INTERVAL, self._evaluate_alerts)
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
            if listener is not None:
                listener.close()
            loop.close()
            raise
        return listener

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Rate-limited: an error that repeats per connection must not flood the journal.
        limiter, now = self.log_loop, self.clock()
        if now - limiter.start >= limiter.window:
            limiter.flush(now)
        limiter.count += 1
        if limiter.count <= limiter.limit:
            loop.default_exception_handler(context)
        else:
            limiter.suppressed += 1

    def _every(self, interval: float, fn: Any) -> None:
        # One slot per job, holding its next tick, so that shutdown cancels each.
        slot = len(self._timers)

        def tick() -> None:
            try:
                fn()
            except Exception:
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))
            self._timers[slot] = self.loop.call_later(interval, tick)

        self._timers.append(self.loop.call_later(interval, tick))

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye to every peer, close, flush the store; idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        if thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
            try:
                future.result(timeout)
            except concurrent.futures.TimeoutError:
                log.error("master shutdown did not finish within %g s; stopping anyway", timeout)
                self.loop.call_soon_threadsafe(self.loop.stop)
            except Exception as exc:  # still stop the loop and close the store
                log.error("master shutdown failed: %r; stopping anyway", exc)
                self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(timeout)
        if not thread.is_alive() and not self._final_flush_done:
            # _shutdown did not get to its flush (it failed or timed out); the
            # loop has ended, so the registry can be read here: save it anyway.
            self._flush()
            self.store.save_last_seen(self.registry.last_seen_rows())
        self.store.close(timeout)
        if self.webhook is not None:
            self.webhook.close()
        log.info("master stopped")

    async def _shutdown(self) -> None:
        self.stopping = True
        for timer in self._timers:
            timer.cancel()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
        if self.metrics is not None:
            self.metrics.close()
        goodbye = p.make(p.GOODBYE, reason="master shutting down")
        for conn in list(self.connections):
            if not conn.closed and conn.transport is not None:
                conn.write(goodbye)
                conn.closed = True
                conn.transport.close()
        for _ in range(100):  # let the transports flush and close
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        self._flush()
        self.store.save_last_seen(self.registry.last_seen_rows())
        self._final_flush_done = True
        self.loop.call_soon(self.loop.stop)

    def run_forever(self) -> None:
        """Start, block until SIGTERM or SIGINT, then stop cleanly (``rpicluster-master``)."""
        stop = threading.Event()

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(1.0):
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("master event loop ended unexpectedly")
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --------------------------------------------------------- periodic work

    def _sweep(self) -> None:
        registry = self.registry
        now = self.clock()
        late = now - self._last_sweep - self.sweep_interval
        self._last_sweep = now
        if late > STALL_WARNING:
            # A starved CPU or a blocked disk: say so, or the deaths that follow look random.
            log.warning("event loop ran %.1f s late (master starved of CPU or blocked)", late)
        for limiter in (
            self.log_joins,
            self.log_leaves,
            self.log_deaths,
            self.log_refusals,
            self.log_members,
            self.log_loop,
        ):
            limiter.flush(now)
        closed_nodes = set()
        for session in registry.sweep(grace=late):
            node = session.node
            session.conn.close(
                p.E_SILENT, f"no message for {registry.dead_after:g} s: node or role presumed dead"
            )
            if node.node_id not in closed_nodes:
                closed_nodes.add(node.node_id)
                if node.state == DEAD:
                    self.counters.silent_deaths_total += 1
                self.log_deaths(
                    now,
                    logging.WARNING,
                    "node %s (%s) silent for more than %g s: %s, closing its connection",
                    node.node_id,
                    node.hostname,
                    registry.dead_after,
                    node.state if node.state == DEAD else f"role {session.role} dropped",
                )

    def _flush(self) -> None:
        self.store.save_nodes(self.registry.take_dirty_rows())
        self.store.add_vitals(self.registry.take_vitals())

    def forget_node(self, node_id: str, why: str) -> int:
        """Remove a node and its history; close its connections (upkeep.py)."""
        node = self.registry.nodes.get(node_id)
        name = bound_identity(node) if node is not None else ""
        if name and self.identities.get(name) == node_id:
            del self.identities[name]  # its certificate may bind a new node id
        return upkeep.forget_node(self, node_id, why)

    def _forget_stale(self) -> None:
        upkeep.forget_stale(self)

    def _evaluate_alerts(self) -> None:
        upkeep.evaluate_alerts(self)

    def _flush_last_seen(self) -> None:
        self.store.save_last_seen(self.registry.last_seen_rows())
