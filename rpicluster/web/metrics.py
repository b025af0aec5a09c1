"""``/metrics``: the cached cluster state as Prometheus text exposition.

Uses ``prometheus_client`` (Debian ships it: 0.16 in bookworm, 0.9 in bullseye;
only APIs present in 0.9 are used) with a custom collector that renders from the
snapshot on each scrape, so a scrape never costs the master a query. Units follow
Prometheus conventions (seconds, bytes, celsius); labels are ``node_id`` (stable)
and ``hostname`` (readable).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Callable

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - depends on the Pi's packages
    raise ImportError(
        f"the webserver role needs prometheus_client ({exc}); on Debian or Raspberry Pi OS:"
        " apt install python3-prometheus-client"
    ) from exc

from rpicluster.web.state import Snapshot, number, ram_total, vital

__all__ = ["CONTENT_TYPE_LATEST", "ClusterCollector", "MetricsRenderer"]

STATES = ("alive", "suspect", "dead", "left")
NODE_LABELS = ["node_id", "hostname"]
_METRIC_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

# (metric suffix, help, vital name) for the per-node gauges read from the latest vitals.
NODE_VITALS = (
    ("cpu_percent", "CPU use in percent of all cores.", "cpu_percent"),
    ("cpu_frequency_mhz", "Current CPU frequency in MHz.", "cpu_freq_mhz"),
    ("load1", "Load average over 1 minute.", "load_1"),
    ("load5", "Load average over 5 minutes.", "load_5"),
    ("load15", "Load average over 15 minutes.", "load_15"),
    (
        "temperature_celsius",
        "CPU temperature (absent where the board has no sensor).",
        "temperature",
    ),
    ("memory_available_bytes", "RAM available to programs.", "ram_available"),
    ("swap_free_bytes", "Free swap space.", "swap_free"),
    ("disk_free_bytes", "Free space on the root file system.", "disk_free"),
    ("disk_total_bytes", "Size of the root file system.", "disk_total"),
    ("uptime_seconds", "Seconds since the node booted.", "uptime"),
)

MASTER_HELP = {
    "connections_total": "Connections the master accepted.",
    "connections_open": "Connections open now.",
    "messages_total": "Messages the master received.",
    "rejected_frames_total": "Frames the master rejected (too large, not JSON).",
    "auth_failures_total": "Handshakes that failed authentication.",
    "bad_messages_total": "Messages that broke the protocol.",
}


class ClusterCollector:
    """A ``prometheus_client`` collector over the latest :class:`Snapshot`."""

    def __init__(self, snapshot: Callable[[], Snapshot], stale_after: float) -> None:
        self._snapshot = snapshot
        self.stale_after = stale_after

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

    def _master(self, master: Mapping[str, Any]) -> Iterator[Metric]:
        counters = master.get("counters")
        if not isinstance(counters, Mapping):
            return
        for key, raw in sorted(counters.items()):
            value = number(raw)
            if value is None or not _METRIC_NAME.match(str(key)):
                continue
            doc = MASTER_HELP.get(key, f"The master's {key.replace('_', ' ')} counter.")
            if key.endswith("_total"):
                # CounterMetricFamily appends _total itself.
                yield CounterMetricFamily(f"rpicluster_master_{key[:-6]}", doc, value=value)
            else:
                yield GaugeMetricFamily(f"rpicluster_master_{key}", doc, value=value)

    def _nodes(self, snap: Snapshot) -> Iterator[Metric]:
        now = snap.now()
        nodes = GaugeMetricFamily("rpicluster_nodes", "Nodes per state.", labels=["state"])
        for state, count in snap.counts().items():
            nodes.add_metric([state], count)
        yield nodes

        info = GaugeMetricFamily(
            "rpicluster_node_info",
            "Constant 1, labelled with what the node told about itself.",
            labels=[*NODE_LABELS, "address", "roles", "architecture", "os", "kernel", "version"],
        )
        up = GaugeMetricFamily(
            "rpicluster_node_up", "1 when the node is alive, else 0.", labels=NODE_LABELS
        )
        state_g = GaugeMetricFamily(
            "rpicluster_node_state",
            "1 for the node's current state (alive, suspect, dead, left), 0 for the others.",
            labels=[*NODE_LABELS, "state"],
        )
        connected = GaugeMetricFamily(
            "rpicluster_node_connected",
            "1 when the node has a connection to the master.",
            labels=NODE_LABELS,
        )
        age = GaugeMetricFamily(
            "rpicluster_node_last_seen_age_seconds",
            "Seconds since the master last heard from the node.",
            labels=NODE_LABELS,
        )
        mem_total = GaugeMetricFamily(
            "rpicluster_node_memory_total_bytes", "RAM size.", labels=NODE_LABELS
        )
        errors = CounterMetricFamily(
            "rpicluster_node_action_errors",
            "Exceptions raised by a role's perform_action().",
            labels=[*NODE_LABELS, "role"],
        )
        vitals_g = {
            suffix: GaugeMetricFamily(f"rpicluster_node_{suffix}", doc, labels=NODE_LABELS)
            for suffix, doc, _ in NODE_VITALS
        }
        for node in snap.nodes:
            labels = [str(node.get("node_id")), str(node.get("hostname") or "")]
            details = node.get("details") if isinstance(node.get("details"), Mapping) else {}
            roles = node.get("roles") if isinstance(node.get("roles"), list) else []
            info.add_metric(
                labels
                + [
                    str(node.get("address") or ""),
                    ",".join(map(str, roles)),
                    str(details.get("architecture") or ""),
                    str(details.get("os") or ""),
                    str(details.get("kernel") or ""),
                    str(details.get("rpicluster_version") or ""),
                ],
                1,
            )
            state = node.get("state")
            up.add_metric(labels, 1 if state == "alive" else 0)
            for name in STATES:
                state_g.add_metric([*labels, name], 1 if state == name else 0)
            connected.add_metric(labels, 1 if node.get("connected") else 0)
            last_seen = number(node.get("last_seen"))
            if last_seen is not None:
                age.add_metric(labels, max(0.0, now - last_seen))
            total = ram_total(node)
            if total is not None:
                mem_total.add_metric(labels, total)
            vitals = node.get("vitals")
            for suffix, _doc, name in NODE_VITALS:
                value = vital(vitals, name)
                if value is not None:
                    vitals_g[suffix].add_metric(labels, value)
            action_errors = node.get("action_errors")
            if isinstance(action_errors, Mapping):
                for role, entry in sorted(action_errors.items()):
                    count = number(entry.get("count")) if isinstance(entry, Mapping) else None
                    if count is not None:
                        errors.add_metric([*labels, str(role)], count)
        yield info
        yield up
        yield state_g
        yield connected
        yield age
        yield mem_total
        yield from vitals_g.values()
        yield errors


class MetricsRenderer:
    """Renders the exposition; one registry holding only our collector."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, snapshot: Callable[[], Snapshot], stale_after: float) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector(snapshot, stale_after))

    def render(self) -> bytes:
        return generate_latest(self.registry)
