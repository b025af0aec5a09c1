"""The master's upkeep of its fleet: forgetting retired Pis, evaluating alerts.

Split from ``server.py`` (the lifecycle; the sockets are in ``listening.py``) because these are
policies over the registry, not plumbing; each runs from the master's event
loop, so it may touch the registry without locks, and hands slow work (the
database, the webhook) to threads of their own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rpicluster import protocol as p
from rpicluster.master.registry import node_label
from rpicluster.master.webhook import disabled_health

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

# Nodes forgotten per pass at most: a week-old database of 10,000 dead nodes is
# forgotten over a few minutes, not in one long stall of the event loop.
FORGET_BATCH = 500


def forget_node(master: Master, node_id: str, why: str) -> int:
    """Remove a node from the registry and the store; close its connections.

    Returns how many connections were closed (``error`` ``forgotten``). A slave
    still running reconnects and joins as new: stop it first to retire a Pi.
    """
    sessions = master.registry.forget(node_id)
    for session in sessions:
        conn = session.conn
        conn.session = None  # its closing must not touch the registry again
        conn.close(p.E_FORGOTTEN, "this node was forgotten by the master's operator")
    master.store.forget(node_id)
    master.counters.nodes_forgotten_total += 1
    log.info("node %s forgotten (%s); %d connection(s) closed", node_id, why, len(sessions))
    return len(sessions)


def forget_stale(master: Master) -> None:
    """Forget the nodes dead or left for longer than ``[master] forget_after``."""
    settings = master.config.master
    assert settings is not None
    stale = master.registry.stale(settings.forget_after)
    for node_id in stale[:FORGET_BATCH]:
        forget_node(master, node_id, f"not seen for more than {settings.forget_after:g} s")


def evaluate_alerts(master: Master) -> None:
    """Advance the alert rules (alerts.py); hand what is due to the webhook thread."""
    registry = master.registry
    if master.alerts.first:
        ids: Iterable[str] = list(registry.nodes)
        registry.changed.clear()
    else:
        ids, registry.changed = registry.changed, set()
    changed, gone = [], []
    for node_id in ids:
        node = registry.nodes.get(node_id)
        if node is None:
            gone.append(node_id)
        else:
            changed.append((node_id, node, node.state, node.vitals))
    store = master.store.health() if master.store is not None else None
    now = master.clock()
    for note in master.alerts.evaluate(changed, store, node_label, gone):
        master.log_alerts(now, logging.WARNING, "alert %s: %s", note["status"], note["summary"])
        if master.webhook is not None:
            master.webhook.put(note)


def alerts_dict(master: Master) -> dict[str, Any]:
    """The ``alerts`` object of the master dict (docs/alerts.md).

    At most an eighth of a frame, so a cluster page always has room for nodes.
    """
    alerts = master.alerts.summary()
    alerts["webhook"] = disabled_health() if master.webhook is None else master.webhook.health()
    budget = master.config.cluster.max_frame_size // 8
    while alerts["firing"] and len(json.dumps(alerts)) > budget:
        del alerts["firing"][len(alerts["firing"]) // 2 :]
    return alerts
