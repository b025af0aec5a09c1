"""The JSON API: ``/api/nodes`` (every node, latest vitals) and ``/api/nodes/<id>``
(one node with its vitals history), from the webserver's cached snapshot.

Nothing secret is served: the master's info is copied without any key that looks
like a credential, whatever a future master might put there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Optional

from rpicluster.web.state import Snapshot

_HIDDEN = ("secret", "password", "passwd", "token", "private_key")


def scrub(value: Any) -> Any:
    """``value`` without mapping keys that name a credential (recursively), NaN as None."""
    if isinstance(value, Mapping):
        return {
            str(k): scrub(v)
            for k, v in value.items()
            if not any(word in str(k).lower() for word in _HIDDEN)
        }
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
    doc["nodes"] = [scrub(node) for node in snap.nodes]
    return doc


def node_document(snap: Snapshot, node_id: str, stale_after: float) -> Optional[dict[str, Any]]:
    """``/api/nodes/<id>``: the node and its history (oldest first), or None if unknown."""
    node = snap.node(node_id)
    if node is None:
        return None
    doc = _freshness(snap, stale_after)
    doc["node"] = scrub(node)
    doc["history"] = snap.node_history(node_id).points()
    return doc


def health_document(snap: Snapshot, stale_after: float) -> dict[str, Any]:
    """``/healthz``: the server answers; says whether its state is fresh."""
    doc = _freshness(snap, stale_after)
    doc["status"] = "ok" if doc["master_reachable"] else "degraded"
    doc["nodes"] = len(snap.nodes)
    doc["version"] = snap.version  # pages reload when it changes
    return doc


def dumps(doc: Any) -> bytes:
    """Compact UTF-8 JSON, strict (no NaN)."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
