"""The master's own counters and its rate-limited log lines.

Both are bounded by design: a fixed set of integer counters, and at most a few
log lines per window for each kind of event, so a storm of peers can neither
grow the master's memory nor fill a Pi's SD card with log writes.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rpicluster.master")


class Counters:
    """The master's own counters, reported in the master dict and by /metrics."""

    __slots__ = (
        "connections_total",
        "connections_open",
        "messages_total",
        "rejected_frames_total",
        "bad_messages_total",
        "auth_failures_total",
        "handshake_timeouts_total",
        "replaced_total",
        "goodbyes_total",
        "closed_without_goodbye_total",
        "silent_deaths_total",
        # Bounds before authentication (admission.py, docs/protocol.md "Limits").
        "unauthenticated_open",
        "connections_refused_total",
        "connections_evicted_total",
        "accept_errors_total",
        # Accepting paused because the table was full of progressing handshakes.
        "accept_paused_total",
        # Member data refused (memberdata.py) and queries answered ok: false.
        "details_refused_total",
        "vitals_refused_total",
        "vitals_rate_limited_total",
        "failed_queries_total",
        # Nodes removed with their history: ``rpicluster forget`` and forget_after.
        "nodes_forgotten_total",
        # Hellos refused because another live machine holds the node id (a copied card).
        "duplicate_ids_total",
        # With [tls]: handshakes that failed (no or wrong certificate, not TLS), and
        # hellos refused because they spoke for another node than their certificate.
        "tls_failures_total",
        "identity_refused_total",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class LogLimiter:
    """At most ``limit`` lines per ``window`` seconds for one kind of event, then a count.

    A few joins or deaths are worth a line each; 10,000 slaves re-joining after a
    restart are worth one summary, not 10,000 lines written from the event loop.
    """

    def __init__(self, what: str, limit: int = 20, window: float = 10.0) -> None:
        self.what = what
        self.limit = limit
        self.window = window
        self.start = 0.0
        self.count = 0
        self.suppressed = 0

    def __call__(self, now: float, level: int, msg: str, *args: Any) -> None:
        if now - self.start >= self.window:
            self.flush(now)
        self.count += 1
        if self.count <= self.limit:
            log.log(level, msg, *args)
        else:
            self.suppressed += 1

    def flush(self, now: float) -> None:
        """Log the count of suppressed lines once their window is over."""
        if now - self.start < self.window:
            return
        if self.suppressed:
            log.log(
                logging.WARNING if "dead" in self.what else logging.INFO,
                "%d more %s in the last %g s (not logged one by one)",
                self.suppressed,
                self.what,
                self.window,
            )
        self.start = now
        self.count = 0
        self.suppressed = 0
