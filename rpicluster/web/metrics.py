"""``/metrics``: the cached cluster state as Prometheus text exposition.

Uses ``prometheus_client`` (Debian ships it: 0.16 in bookworm, 0.9 in bullseye;
only APIs present in 0.9 are used) with a custom collector that renders from the
snapshot on each scrape, so a scrape never costs the master a query.

Naming follows the Prometheus conventions (checked by ``promtool check metrics``
in tests/test_web_metrics.py): base units (ratios, not percent; hertz, not MHz;
bytes; seconds; celsius), ``_total`` for counters, one ``rpicluster_node_info``
carrying what a node told about itself as labels. Every per-node series has the
labels ``node_id`` (stable) and ``name`` (the node name of contract 1, else the
hostname). A node that is dead or has left exports ``rpicluster_node_up 0``, its
state and last-seen age, but none of its last readings: a frozen temperature
would read as a live one. Throttling is one gauge per condition and time frame
(``rpicluster_node_throttled_now`` / ``..._since_boot``, label ``condition``),
decoded by :mod:`rpicluster.pihealth`. Every label value goes through
:func:`rpicluster.displayable.text` (one bounded line, valid UTF-8).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - depends on the Pi's packages
    raise ImportError(
        f"the webserver role needs prometheus_client ({exc}); on Debian or Raspberry Pi OS:"
        " apt install python3-prometheus-client"
    ) from exc

from rpicluster import displayable, pihealth
from rpicluster.web.state import Snapshot, number, ram_total, vital

__all__ = ["CONTENT_TYPE_LATEST", "ClusterCollector", "MetricsRenderer"]

STATES = ("alive", "suspect", "dead", "left")
NODE_LABELS = ["node_id", "name"]
INFO_LABELS = [
    "hostname",
    "address",
    "roles",
    "groups",
    "model",
    "os",
    "os_codename",
    "architecture",
    "kernel",
    "python_version",
    "version",
]
_METRIC_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
LABEL_LIMIT = 128  # characters of one label value

# (metric suffix, help, vital name, factor to the base unit) per latest-vitals gauge.
NODE_VITALS: tuple[tuple[str, str, str, float], ...] = (
    ("cpu_usage_ratio", "CPU use as a ratio of all cores (0-1).", "cpu_percent", 0.01),
    ("cpu_frequency_hertz", "Current CPU frequency.", "cpu_freq_mhz", 1e6),
    ("load1", "Load average over 1 minute.", "load_1", 1.0),
    ("load5", "Load average over 5 minutes.", "load_5", 1.0),
    ("load15", "Load average over 15 minutes.", "load_15", 1.0),
    (
        "temperature_celsius",
        "SoC temperature (absent where the board has no sensor).",
        "temperature",
        1.0,
    ),
    ("memory_available_bytes", "RAM available to programs.", "ram_available", 1.0),
    ("swap_free_bytes", "Free swap space.", "swap_free", 1.0),
    ("disk_free_bytes", "Free space on the root file system.", "disk_free", 1.0),
    ("disk_total_bytes", "Size of the root file system.", "disk_total", 1.0),
    ("uptime_seconds", "Seconds since the node booted.", "uptime", 1.0),
    (
        "network_receive_bytes_per_second",
        "Bytes received per second over all interfaces but loopback (slave-side rate).",
        "net_rx_bytes_per_s",
        1.0,
    ),
    (
        "network_transmit_bytes_per_second",
        "Bytes sent per second over all interfaces but loopback (slave-side rate).",
        "net_tx_bytes_per_s",
        1.0,
    ),
    (
        "disk_read_bytes_per_second",
        "Bytes read per second from the block devices (slave-side rate).",
        "disk_read_bytes_per_s",
        1.0,
    ),
    (
        "disk_written_bytes_per_second",
        "Bytes written per second to the block devices (slave-side rate).",
        "disk_write_bytes_per_s",
        1.0,
    ),
)

MASTER_HELP = {
    "connections_total": "Connections the master accepted.",
    "connections_open": "Connections open now.",
    "messages_total": "Messages the master received.",
    "rejected_frames_total": "Frames the master rejected (too large, not JSON).",
    "auth_failures_total": "Handshakes that failed authentication.",
    "bad_messages_total": "Messages that broke the protocol.",
    "duplicate_ids_total": "Hellos refused: another machine holds the node id (a copied card).",
}


def label(value: Any) -> str:
    """A label value: one bounded, printable line (see :mod:`rpicluster.displayable`)."""
    return displayable.text(value, LABEL_LIMIT)


def _joined(value: Any) -> str:
    items = value[: displayable.MAX_TREE_ITEMS] if isinstance(value, list) else []
    return label(",".join(sorted(displayable.text(item, 64) for item in items)))


class ClusterCollector:
    """A ``prometheus_client`` collector over the latest :class:`Snapshot`.

    ``server_stats`` (optional) returns the HTTP server's own gauges and counters
    (``{"connections_open": n, ...}``), exported as ``rpicluster_webserver_*``.
    """

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        stale_after: float,
        server_stats: Optional[Callable[[], Mapping[str, float]]] = None,
    ) -> None:
        self._snapshot = snapshot
        self.stale_after = stale_after
        self._server_stats = server_stats

    def describe(self) -> list[Metric]:
        # Names depend on the master's counters; nothing to check at registration.
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._webserver(snap)
        yield from self._master(snap.master)
        yield from self._nodes(snap)

    def _webserver(self, snap: Snapshot) -> Iterator[Metric]:
        reachable = snap.fetched_at is not None and (
            snap.master_unreachable_since(self.stale_after) is None
        )
        yield GaugeMetricFamily(
            "rpicluster_webserver_master_reachable",
            "1 when the webserver's last refresh from the master succeeded recently.",
            value=1 if reachable else 0,
        )
        if snap.fetched_at is not None:
            yield GaugeMetricFamily(
                "rpicluster_webserver_last_refresh_timestamp_seconds",
                "When the webserver last refreshed the cluster state (epoch seconds).",
                value=snap.fetched_at,
            )
        stats = self._server_stats() if self._server_stats is not None else {}
        for key, value in sorted(stats.items()):
            doc = f"The dashboard server's {key.replace('_', ' ')}."
            if key.endswith("_total"):
                yield CounterMetricFamily(f"rpicluster_webserver_{key[:-6]}", doc, value=value)
            else:
                yield GaugeMetricFamily(f"rpicluster_webserver_{key}", doc, value=value)

    def _master(self, master: Mapping[str, Any]) -> Iterator[Metric]:
        counters = master.get("counters")
        if isinstance(counters, Mapping):
            for key, raw in sorted(counters.items(), key=lambda kv: str(kv[0])):
                value = number(raw)
                if value is None or not _METRIC_NAME.match(str(key)) or len(str(key)) > 64:
                    continue
                doc = MASTER_HELP.get(key, f"The master's {key.replace('_', ' ')} counter.")
                if key.endswith("_total"):
                    # CounterMetricFamily appends _total itself.
                    yield CounterMetricFamily(f"rpicluster_master_{key[:-6]}", doc, value=value)
                else:
                    yield GaugeMetricFamily(f"rpicluster_master_{key}", doc, value=value)
        yield from self._store(master.get("store"))
        yield from self._alerts(master.get("alerts"))

    def _alerts(self, alerts: Any) -> Iterator[Metric]:
        """The master's firing alerts and webhook health (docs/alerts.md), when reported."""
        if not isinstance(alerts, Mapping):
            return
        firing = number(alerts.get("firing_count"))
        if firing is not None:
            yield GaugeMetricFamily(
                "rpicluster_master_alerts_firing", "Alerts firing at the master.", value=firing
            )
        hook = alerts.get("webhook")
        if isinstance(hook, Mapping) and hook.get("enabled") is True:
            yield GaugeMetricFamily(
                "rpicluster_master_webhook_ok",
                "1 while the master's alert webhook delivers, 0 when it fails.",
                value=0 if hook.get("ok") is False else 1,
            )

    def _store(self, store: Any) -> Iterator[Metric]:
        """The master's store health (contract 4), when the master reports it."""
        if not isinstance(store, Mapping):
            return
        yield GaugeMetricFamily(
            "rpicluster_master_store_ok",
            "1 while the master's store saves, 0 when writes fail.",
            value=0 if store.get("ok") is False else 1,
        )
        for key, doc in (
            ("queue", "Writes waiting in the master's store queue."),
            ("queue_limit", "Capacity of the master's store queue."),
            ("lag_seconds", "Age of the oldest write waiting in the master's store queue."),
        ):
            value = number(store.get(key))
            if value is not None:
                yield GaugeMetricFamily(f"rpicluster_master_store_{key}", doc, value=value)
        dropped = number(store.get("dropped_total"))
        if dropped is not None:
            yield CounterMetricFamily(
                "rpicluster_master_store_dropped",
                "Writes the master's store dropped (queue full or refused).",
                value=dropped,
            )

    def _nodes(self, snap: Snapshot) -> Iterator[Metric]:
        now = snap.now()
        nodes = GaugeMetricFamily("rpicluster_nodes", "Nodes per state.", labels=["state"])
        for state, count in snap.counts().items():
            nodes.add_metric([label(state)], count)
        yield nodes

        def gauge(suffix: str, doc: str, extra: Optional[list[str]] = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(
                f"rpicluster_node_{suffix}", doc, labels=[*NODE_LABELS, *(extra or [])]
            )

        info = GaugeMetricFamily(
            "rpicluster_node_info",
            "Constant 1, labelled with what the node told about itself.",
            labels=[*NODE_LABELS, *INFO_LABELS],
        )
        up = gauge("up", "1 when the node is alive, else 0.")
        state_g = gauge(
            "state",
            "1 for the node's current state (alive, suspect, dead, left), 0 for the others.",
            ["state"],
        )
        connected = gauge("connected", "1 when the node has a connection to the master.")
        dup_name = gauge("duplicate_name", "1 when another node id uses the same node name.")
        dup_id = gauge("duplicate_id", "1 when two machines claim this node id at once.")
        age = gauge("last_seen_age_seconds", "Seconds since the master last heard from the node.")
        mem_total = gauge("memory_total_bytes", "RAM size.")
        throttled_now = gauge(
            "throttled_now",
            "1 while the firmware reports the condition (under_voltage, frequency_capped,"
            " throttled, soft_temperature_limit).",
            ["condition"],
        )
        throttled_boot = gauge(
            "throttled_since_boot",
            "1 when the firmware reports the condition has occurred since boot.",
            ["condition"],
        )
        errors = CounterMetricFamily(
            "rpicluster_node_action_errors",
            "Exceptions raised by a role's perform_action().",
            labels=[*NODE_LABELS, "role"],
        )
        vitals_g = {suffix: gauge(suffix, doc) for suffix, doc, _name, _factor in NODE_VITALS}
        seen: set[str] = set()
        for node in snap.nodes:
            node_id = label(node.get("node_id"))
            if node_id in seen:  # one series per node id, whatever the master sent
                continue
            seen.add(node_id)
            labels = [node_id, label(displayable.node_name(node))]
            details = node.get("details") if isinstance(node.get("details"), Mapping) else {}
            info.add_metric(
                labels
                + [
                    label(node.get("hostname")),
                    label(node.get("address")),
                    _joined(node.get("roles")),
                    _joined(details.get("groups")),
                    label(details.get("model")),
                    label(details.get("os")),
                    label(details.get("os_codename")),
                    label(details.get("architecture")),
                    label(details.get("kernel")),
                    label(details.get("python_version")),
                    label(details.get("rpicluster_version")),
                ],
                1,
            )
            state = node.get("state")
            up.add_metric(labels, 1 if state == "alive" else 0)
            for name in STATES:
                state_g.add_metric([*labels, name], 1 if state == name else 0)
            connected.add_metric(labels, 1 if node.get("connected") is True else 0)
            dup_name.add_metric(labels, 1 if node.get("duplicate_name") is True else 0)
            dup_id.add_metric(labels, 1 if node.get("duplicate_id") is True else 0)
            last_seen = number(node.get("last_seen"))
            if last_seen is not None:
                age.add_metric(labels, max(0.0, now - last_seen))
            action_errors = node.get("action_errors")
            if isinstance(action_errors, Mapping):
                for role, entry in sorted(action_errors.items(), key=lambda kv: str(kv[0])):
                    count = number(entry.get("count")) if isinstance(entry, Mapping) else None
                    if count is not None and count >= 0:
                        errors.add_metric([*labels, label(role)], count)
            if state in ("dead", "left"):
                continue  # no frozen readings from a node that is gone
            total = ram_total(node)
            if total is not None:
                mem_total.add_metric(labels, total)
            vitals = node.get("vitals") if isinstance(node.get("vitals"), Mapping) else None
            for suffix, _doc, name, factor in NODE_VITALS:
                value = vital(vitals, name)
                if value is not None:
                    vitals_g[suffix].add_metric(labels, value * factor)
            found = pihealth.conditions(dict(vitals) if vitals is not None else None)
            for key, flags in found.items():
                throttled_now.add_metric([*labels, key], 1 if flags["now"] else 0)
                throttled_boot.add_metric([*labels, key], 1 if flags["since_boot"] else 0)
        yield info
        yield up
        yield state_g
        yield connected
        yield dup_name
        yield dup_id
        yield age
        yield mem_total
        yield from vitals_g.values()
        yield throttled_now
        yield throttled_boot
        yield errors


class MetricsRenderer:
    """Renders the exposition; one registry holding only our collector."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        stale_after: float,
        server_stats: Optional[Callable[[], Mapping[str, float]]] = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector(snapshot, stale_after, server_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
