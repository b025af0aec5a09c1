"""``/api/http_sd``: the fleet as a Prometheus HTTP service-discovery target list.

Prometheus users scrape each Pi with an exporter of their own (node_exporter on
port 9100 by default); this endpoint tells their Prometheus which Pis exist, so a
Pi added to the cluster is scraped without editing ``prometheus.yml``. The
format is Prometheus' ``http_sd_configs`` one (docs/prometheus.md): a JSON list
of ``{"targets": ["<host>:<port>"], "labels": {"<name>": "<value>"}}``, served
200 with ``Content-Type: application/json`` (``[]`` when there is no node).

One target group per node, each with its own labels: ``name``, ``node_id``,
``hostname``, ``groups`` and ``roles`` (comma-separated with a comma at both
ends, ``,a,b,``, so a relabel regex ``.*,a,.*`` matches one), and two meta
labels (dropped after relabelling unless kept): ``__meta_rpicluster_state``
(it changes, so it must not become a series label) and
``__meta_rpicluster_address``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rpicluster import displayable
from rpicluster.web.state import Snapshot

DEFAULT_PORT = 9100  # node_exporter's
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")  # Prometheus' label name syntax


def _list(value: Any) -> str:
    """``,a,b,``: sorted, each item one inert line without commas; ``""`` when empty."""
    items = value[: displayable.MAX_TREE_ITEMS] if isinstance(value, list) else []
    names = sorted({displayable.text(item, 64).replace(",", "_") for item in items})
    return f",{','.join(names)}," if names else ""


def target(address: str, port: int) -> str:
    """``host:port``; an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def targets_document(snap: Snapshot, port: int = DEFAULT_PORT) -> list[dict[str, Any]]:
    """Every node the master knows that has an address, one target group each."""
    groups: list[dict[str, Any]] = []
    seen: set[str] = set()
    for node in snap.nodes:
        node_id = displayable.text(node.get("node_id"), 128)
        address = node.get("address")
        if node_id in seen or not isinstance(address, str) or not address:
            continue
        seen.add(node_id)
        details = node.get("details") if isinstance(node.get("details"), Mapping) else {}
        node_groups = node.get("groups")
        if not isinstance(node_groups, list):
            node_groups = details.get("groups")
        labels = {
            "name": displayable.text(displayable.node_name(node), 256),
            "node_id": node_id,
            "hostname": displayable.text(node.get("hostname"), 256),
            "groups": _list(node_groups),
            "roles": _list(node.get("roles")),
            "__meta_rpicluster_state": displayable.text(node.get("state"), 16),
            "__meta_rpicluster_address": displayable.text(address, 256),
        }
        groups.append({"targets": [target(displayable.text(address, 256), port)], "labels": labels})
    return groups
