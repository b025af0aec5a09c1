"""The JSON API: ``/api/nodes`` (every node, latest vitals) and ``/api/nodes/<id>``
(one node with its vitals history), from the webserver's cached snapshot.

Nothing secret is served: the master's info is copied without any key that looks
like a credential, whatever a future master might put there. Whatever a node sent
(or an old database kept) is served JSON-safe: see :func:`rpicluster.displayable.tree`
for the bounds (depth, items, string length, finite numbers within +-2^53).

Each node object is served as the master sent it, plus what the webserver derives:
``name`` (the hostname when an older master sent none) and ``health``:
``{"warnings": ["under-voltage now", ...], "conditions": {"under_voltage":
{"now": bool, "since_boot": bool}, ...}}`` decoded by :mod:`rpicluster.pihealth`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Optional

from rpicluster import displayable, pihealth
from rpicluster.web.state import Snapshot

_HIDDEN = ("secret", "password", "passwd", "token", "private_key")


def scrub(value: Any, depth: int = displayable.MAX_TREE_DEPTH) -> Any:
    """``value`` JSON-safe (bounded, finite) and without mapping keys that name a
    credential, at any depth."""
    if isinstance(value, Mapping):
        if depth <= 0:
            return None
        out = {}
        for key, item in value.items():
            name = displayable.tree_key(key)
            if not any(word in name.lower() for word in _HIDDEN):
                out[name] = scrub(item, depth - 1)
                if len(out) >= displayable.MAX_TREE_ITEMS:
                    break
        return out
    if isinstance(value, (list, tuple)):
        if depth <= 0:
            return None
        return [scrub(v, depth - 1) for v in value[: displayable.MAX_TREE_ITEMS]]
    return displayable.tree(value, depth)


def health(node: Mapping[str, Any]) -> dict[str, Any]:
    """The node's power and heat warnings, decoded from its latest vitals."""
    vitals = node.get("vitals")
    vitals = dict(vitals) if isinstance(vitals, Mapping) else None
    return {"warnings": pihealth.warnings(vitals), "conditions": pihealth.conditions(vitals)}


def node_object(node: Mapping[str, Any]) -> dict[str, Any]:
    """One node as the API serves it: scrubbed, with ``name`` and ``health``."""
    doc = scrub(node)
    if not isinstance(doc.get("name"), str) or not doc["name"]:
        doc["name"] = displayable.node_name({**doc, "name": None})
    doc["health"] = health(node)
    return doc


def _freshness(snap: Snapshot, stale_after: float) -> dict[str, Any]:
    since = snap.master_unreachable_since(stale_after)
    return {
        "fetched_at": snap.fetched_at,
        "master_reachable": snap.fetched_at is not None and since is None,
        "master_unreachable_since": since,
    }


def nodes_document(snap: Snapshot, stale_after: float) -> dict[str, Any]:
    """``/api/nodes``: the master's info and counters, every node as the master sent it."""
    doc = _freshness(snap, stale_after)
    doc["master"] = scrub(snap.master)
    doc["counts"] = snap.counts()
    doc["nodes"] = [node_object(node) for node in snap.nodes]
    return doc


def node_document(snap: Snapshot, node_id: str, stale_after: float) -> Optional[dict[str, Any]]:
    """``/api/nodes/<id>``: the node and its history (oldest first), or None if unknown."""
    node = snap.node(node_id)
    if node is None:
        return None
    doc = _freshness(snap, stale_after)
    doc["node"] = node_object(node)
    doc["history"] = snap.node_history(node_id).points()
    return doc


def store_health(master: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The master's ``store`` health (contract 4), JSON-safe, or None from an older master."""
    store = master.get("store")
    if not isinstance(store, Mapping):
        return None
    doc = scrub(store, 2)
    doc["ok"] = store.get("ok") is not False  # only the master's explicit false fails
    return doc


def health_document(snap: Snapshot, stale_after: float) -> dict[str, Any]:
    """``/healthz``: the server answers; says whether its state is fresh and whether
    the master's store saves (``store_ok`` false: the HTTP status is 503)."""
    doc = _freshness(snap, stale_after)
    store = store_health(snap.master)
    doc["store"] = store
    doc["store_ok"] = store is None or store["ok"]
    if not doc["store_ok"]:
        doc["status"] = "store_failing"
    else:
        doc["status"] = "ok" if doc["master_reachable"] else "degraded"
    alerts = snap.master.get("alerts")
    alerts = alerts if isinstance(alerts, Mapping) else {}
    hook = alerts.get("webhook")
    hook = scrub(hook, 2) if isinstance(hook, Mapping) else None
    # A failing receiver shows here (and on the dashboard) but keeps the status
    # 200: restarting the dashboard would not bring a chat server back.
    doc["webhook"] = hook
    doc["webhook_ok"] = hook is None or hook.get("ok") is not False
    count = alerts.get("firing_count")
    doc["alerts_firing"] = count if isinstance(count, int) and not isinstance(count, bool) else 0
    doc["nodes"] = len(snap.nodes)
    doc["version"] = snap.version  # pages reload when it changes
    return doc


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON, strict (no NaN)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
