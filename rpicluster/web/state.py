"""The webserver's copy of the cluster state, refreshed from the master.

Why a copy: the dashboard must keep answering (with the last known state) while the
master is unreachable, and a page view must never cost the master a query.

Why compact: a Pi Zero has 512 MB. One hour of vitals every 5 s for 100 nodes is
72,000 readings; kept as JSON dicts that is tens of megabytes, kept as one
``array('d')`` per plotted field it is about 4 MB. Histories are immutable and
replaced (copy on write) when new points arrive, so the HTTP threads read a
:class:`Snapshot` without any lock while the role thread builds the next one.

Steady state is cheap: a node's history is asked for only when its latest vitals
are newer than what we hold, and then only the points after that (``since``).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from rpicluster import displayable

log = logging.getLogger(__name__)

# Field names we read from a vitals dict, with the older/other spellings we accept.
VITALS_ALIASES: dict[str, tuple[str, ...]] = {
    "ts": ("ts",),
    "cpu_percent": ("cpu_percent",),
    "cpu_freq_mhz": ("cpu_freq_mhz",),
    "temperature": ("temperature", "temperature_c"),
    "ram_available": ("ram_available", "mem_available"),
    "ram_total": ("ram_total", "mem_total"),
    "swap_free": ("swap_free",),
    "disk_free": ("disk_free",),
    "disk_total": ("disk_total",),
    "load_1": ("load_1",),
    "load_5": ("load_5",),
    "load_15": ("load_15",),
    "uptime": ("uptime",),
}
# The fields kept per history point (besides ``ts``): what the plots draw.
HISTORY_FIELDS = ("cpu_percent", "temperature", "ram_available", "ram_total", "load_1", "disk_free")
HISTORY_PAGE_LIMIT = 1000  # the master's maximum ``limit`` of a history query
MAX_HISTORY_PAGES = 20  # per node and refresh, so one refresh stays bounded
MAX_CLUSTER_PAGES = 10000
MAX_HISTORY_QUERIES = 200  # history queries per refresh, so a refresh stays bounded
MAX_HISTORY_POINTS = 1_000_000  # all nodes together: about 56 MB of arrays
MIN_POINTS_PER_NODE = 60
NAN = float("nan")


class BadReply(ValueError):
    """The master's reply does not have the documented shape; says which query and field."""


def number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a real, finite JSON number, else None
    (a 400-digit integer too: see :func:`rpicluster.displayable.number`)."""
    return displayable.number(value)


def vital(vitals: Optional[Mapping[str, Any]], name: str) -> Optional[float]:
    """One numeric vital by its canonical name (see VITALS_ALIASES), or None."""
    if not isinstance(vitals, Mapping):
        return None
    for key in VITALS_ALIASES.get(name, (name,)):
        found = number(vitals.get(key))
        if found is not None:
            return found
    return None


def ram_total(node: Mapping[str, Any]) -> Optional[float]:
    """The node's RAM size: from its vitals, else from the details sent at join."""
    total = vital(node.get("vitals"), "ram_total")
    if total is None and isinstance(node.get("details"), Mapping):
        details = node["details"]
        total = number(details.get("ram_total")) or number(details.get("ram"))
    return total


class History:
    """One node's vitals history: a ``ts`` column and one column per HISTORY_FIELDS.

    Immutable: :meth:`extended` and :meth:`trimmed` return new objects (or ``self``
    when nothing changes). Unknown values are NaN.
    """

    __slots__ = ("ts", "columns", "cache")

    def __init__(self, ts: array, columns: dict[str, array]) -> None:
        self.ts = ts
        self.columns = columns
        # What the pages derive from this history (plots, computed columns): valid as
        # long as this object lives, since it never changes. Bounded by cached().
        self.cache: dict[Any, Any] = {}

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per ``key`` for this history (a few dozen keys at most)."""
        try:
            return self.cache[key]
        except KeyError:
            pass
        value = compute()
        if len(self.cache) >= 64:
            self.cache.clear()
        self.cache[key] = value
        return value

    @classmethod
    def empty(cls) -> History:
        return cls(array("d"), {name: array("d") for name in HISTORY_FIELDS})

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def last_ts(self) -> Optional[float]:
        return self.ts[-1] if self.ts else None

    def column(self, name: str) -> array:
        return self.columns[name]

    def newest(self, count: int) -> History:
        """Only the latest ``count`` points (``self`` when it holds no more)."""
        if len(self.ts) <= count:
            return self
        start = len(self.ts) - count
        return History(self.ts[start:], {k: v[start:] for k, v in self.columns.items()})

    def trimmed(self, oldest: float) -> History:
        """Without the points at or before epoch ``oldest``."""
        start = bisect.bisect_right(self.ts, oldest)
        if start == 0:
            return self
        return History(self.ts[start:], {k: v[start:] for k, v in self.columns.items()})

    def extended(self, points: Iterable[Mapping[str, Any]], oldest: float) -> History:
        """With ``points`` (vitals dicts) appended: only those newer than both ``oldest``
        and our last point, so a repeated or out-of-order reply cannot duplicate data."""
        base = self.trimmed(oldest)
        ts = array("d", base.ts)
        columns = {k: array("d", v) for k, v in base.columns.items()}
        last = ts[-1] if ts else oldest
        for point in points:
            when = vital(point, "ts")
            if when is None or when <= last:
                continue
            last = when
            ts.append(when)
            for name, column in columns.items():
                value = vital(point, name)
                column.append(NAN if value is None else value)
        return History(ts, columns)

    def points(self) -> list[dict[str, Optional[float]]]:
        """The history as JSON-ready dicts, oldest first (NaN becomes None)."""
        names = list(self.columns)
        cols = [self.columns[n] for n in names]
        out = []
        for i, when in enumerate(self.ts):
            point: dict[str, Optional[float]] = {"ts": when}
            for name, col in zip(names, cols):
                value = col[i]
                point[name] = None if math.isnan(value) else value
            out.append(point)
        return out


_EMPTY_HISTORY = History.empty()


@dataclass(frozen=True)
class Snapshot:
    """What the pages show: one consistent view of the cluster, never mutated.

    ``fetched_at`` is our clock at the last successful refresh (None before the
    first); ``clock_offset`` is the master's clock minus ours when the master tells
    its time, so "last seen" ages are right even when the two Pis' clocks differ.
    """

    version: int = 0
    fetched_at: Optional[float] = None
    clock_offset: float = 0.0
    master: Mapping[str, Any] = field(default_factory=dict)
    nodes: tuple[Mapping[str, Any], ...] = ()
    history: Mapping[str, History] = field(default_factory=dict)
    unreachable_since: Optional[float] = None
    last_error: str = ""
    by_id: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def now(self) -> float:
        """Now, on the master's clock (the clock of ``last_seen`` and ``connected_since``)."""
        return time.time() + self.clock_offset

    def node(self, node_id: str) -> Optional[Mapping[str, Any]]:
        return self.by_id.get(node_id)

    def node_history(self, node_id: str) -> History:
        return self.history.get(node_id, _EMPTY_HISTORY)

    def master_unreachable_since(self, stale_after: float) -> Optional[float]:
        """Since when (our clock) the master has not answered, or None if it has lately.

        Either a refresh failed, or none succeeded for ``stale_after`` seconds (the
        role's connection may be down while the base class reconnects).
        """
        if self.unreachable_since is not None:
            return self.unreachable_since
        if self.fetched_at is not None and time.time() - self.fetched_at > stale_after:
            return self.fetched_at
        return None

    def counts(self) -> dict[str, int]:
        """Nodes per state, every documented state present."""
        counts = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        for node in self.nodes:
            state = str(node.get("state"))
            counts[state] = counts.get(state, 0) + 1
        return counts


class ClusterState:
    """Holds the current :class:`Snapshot`; replacing it is one atomic assignment."""

    def __init__(self, history_window: float) -> None:
        if not history_window > 0:
            raise ValueError(f"history_window must be positive, not {history_window!r}")
        self.history_window = float(history_window)
        self._snapshot = Snapshot()
        self._lock = threading.Lock()  # serialises writers only
        self.next_history_index = 0  # where the next refresh starts asking for history

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def replace(
        self,
        *,
        master: Mapping[str, Any],
        nodes: list[Mapping[str, Any]],
        history: Mapping[str, History],
        fetched_at: float,
        clock_offset: float = 0.0,
    ) -> Snapshot:
        """Publish a fresh view (the master answered)."""
        with self._lock:
            old = self._snapshot
            if old.unreachable_since is not None:
                log.info("master reachable again; dashboard state is fresh")
            self._snapshot = Snapshot(
                version=old.version + 1,
                fetched_at=fetched_at,
                clock_offset=clock_offset,
                master=master,
                nodes=tuple(nodes),
                history=history,
                by_id={node["node_id"]: node for node in nodes},
            )
            return self._snapshot

    def mark_unreachable(self, reason: str, when: Optional[float] = None) -> None:
        """Keep the last known view, noting since when the master has not answered."""
        with self._lock:
            old = self._snapshot
            since = old.unreachable_since
            if since is None:
                since = time.time() if when is None else when
                log.warning("master unreachable (%s); serving the last known state", reason)
            self._snapshot = Snapshot(
                version=old.version + 1,
                fetched_at=old.fetched_at,
                clock_offset=old.clock_offset,
                master=old.master,
                nodes=old.nodes,
                history=old.history,
                unreachable_since=since,
                last_error=reason,
                by_id=old.by_id,
            )


# ----------------------------------------------------------------- refreshing


Request = Callable[..., Any]


def fetch_cluster(request: Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The master's info and every node, following ``next_offset`` page by page."""
    master: dict[str, Any] = {}
    nodes: list[dict[str, Any]] = []
    offset: Optional[int] = 0
    for _ in range(MAX_CLUSTER_PAGES):
        data = request("cluster", offset=offset)
        if not isinstance(data, Mapping):
            raise BadReply(f"cluster reply at offset {offset}: data is not an object")
        page = data.get("nodes")
        if not isinstance(page, list):
            raise BadReply(f"cluster reply at offset {offset}: 'nodes' is not a list")
        if isinstance(data.get("master"), Mapping):
            master = dict(data["master"])
        for i, node in enumerate(page):
            if not isinstance(node, Mapping) or not isinstance(node.get("node_id"), str):
                raise BadReply(f"cluster reply at offset {offset}: node {i} has no string node_id")
            nodes.append(dict(node))
        following = data.get("next_offset")
        if following is None:
            break
        if not isinstance(following, int) or isinstance(following, bool) or following <= offset:
            raise BadReply(f"cluster reply at offset {offset}: bad next_offset {following!r}")
        offset = following
    else:
        raise BadReply(f"cluster reply: more than {MAX_CLUSTER_PAGES} pages")
    nodes.sort(key=lambda n: (displayable.node_name(n), n["node_id"]))
    return master, nodes


def fetch_history(request: Request, node_id: str, since: float) -> list[Mapping[str, Any]]:
    """The node's history points after epoch ``since``, oldest first (bounded pages)."""
    points: list[Mapping[str, Any]] = []
    for _ in range(MAX_HISTORY_PAGES):
        data = request("history", node_id=node_id, since=since, limit=HISTORY_PAGE_LIMIT)
        if not isinstance(data, Mapping) or not isinstance(data.get("points"), list):
            raise BadReply(f"history reply for node {node_id!r}: 'points' is not a list")
        page = [p for p in data["points"] if isinstance(p, Mapping)]
        points.extend(page)
        newest = vital(page[-1], "ts") if page else None
        if not data.get("more") or newest is None or newest <= since:
            break
        since = newest
    return points


def master_clock_offset(master: Mapping[str, Any], fetched_at: float) -> float:
    """The master's clock minus ours, when the master's info tells its time."""
    for key in ("now", "time", "wall_time"):
        theirs = number(master.get(key))
        if theirs is not None:
            return theirs - fetched_at
    return 0.0


def refresh(state: ClusterState, request: Request) -> Snapshot:
    """Fetch the cluster and the new history points, then publish a new snapshot.

    ``request(what, **fields)`` is the role thread's :meth:`request`; it raises when
    the master is unreachable, and then nothing is published (the caller marks it).
    """
    fetched_at = time.time()
    master, nodes = fetch_cluster(request)
    offset = master_clock_offset(master, fetched_at)
    oldest = fetched_at + offset - state.history_window
    old = state.snapshot.history
    history: dict[str, History] = {}
    # Bounded work and memory however large the fleet: at most MAX_HISTORY_QUERIES
    # nodes are asked per refresh, starting where the last refresh stopped (the
    # others are asked next time: their vitals stay newer than what we hold), and
    # each node keeps at most its share of MAX_HISTORY_POINTS.
    cap = max(MIN_POINTS_PER_NODE, MAX_HISTORY_POINTS // max(len(nodes), 1))
    count = len(nodes)
    start = state.next_history_index % count if count else 0
    asked = 0
    for k in range(count):
        index = (start + k) % count
        node = nodes[index]
        node_id = node["node_id"]
        held = old.get(node_id, _EMPTY_HISTORY)
        latest = vital(node.get("vitals"), "ts")
        last = held.last_ts
        stale = latest is not None and latest > oldest and (last is None or latest > last)
        if stale and asked < MAX_HISTORY_QUERIES:
            since = oldest if last is None else max(last, oldest)
            held = held.extended(fetch_history(request, node_id, since), oldest)
            asked += 1
            state.next_history_index = index + 1
        else:
            held = held.trimmed(oldest)
        history[node_id] = held.newest(cap)
    log.debug("refreshed %d nodes, asked history of %d", len(nodes), asked)
    return state.replace(
        master=master, nodes=nodes, history=history, fetched_at=fetched_at, clock_offset=offset
    )
