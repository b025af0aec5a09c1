"""The queries a member may ask the master: ``cluster``, ``node``, ``history``, ``forget``.

Split from ``connection.py`` because answering is a different job from reading
frames: every reply must fit a frame whatever the fleet holds (``fit_node``,
pages of half a frame), a history read goes to the store's thread and comes back
to the loop, and ``forget`` is an operator's action with its own permissions
(docs/protocol.md section 8). A bad query is refused with a ``reply`` carrying
the error; the connection stays open. ``Queries`` is a mixin of ``Connection``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.master.database import read_history
from rpicluster.master.registry import node_label

if TYPE_CHECKING:
    from rpicluster.master.server import Master

log = logging.getLogger("rpicluster.master")

HISTORY_CAP = 1000  # points per history reply at most; a larger limit is bad_message
_MAX_ID = md.MAX_NODE_ID  # characters of a node_id

_pack = p.HEADER.pack


def fit_node(node: dict[str, Any], budget: int) -> str:
    """The node as JSON of at most ``budget`` bytes: trimmed when the whole does not fit.

    With the member-data limits a node never needs trimming at the default frame
    size; this keeps the promise that no reply overflows a frame whatever is stored
    (an old database, a small max_frame_size). A trimmed node has ``truncated``.
    """
    text = json.dumps(node)
    if len(text) <= budget:
        return text
    stub = {**node, "details": {}, "vitals": None, "action_errors": {}, "truncated": True}
    text = json.dumps(stub)
    if len(text) <= budget:
        return text
    stub["roles"] = []
    return json.dumps(stub)


class Queries:
    """Queries for ``Connection`` (a mixin: the attributes below are the connection's)."""

    master: Master
    kind: str
    name: str
    identity: str
    tls: Optional[tlsmod.ServerTls]

    def _query(self, message: dict[str, Any]) -> None:
        qid = message["id"]
        what = message["what"]
        try:
            if what == "cluster":
                offset = _int_field(message, "offset", 0, 0)
                limit = _int_field(message, "limit", 1 << 30, 1)
                self.send(self.master.cluster_page(qid, offset, limit))
            elif what == "node":
                node_id = message.get("node_id")
                if not isinstance(node_id, str):
                    raise _QueryError(p.E_BAD_MESSAGE, "query node needs a string field 'node_id'")
                node = self.master.registry.nodes.get(node_id)
                if node is None:
                    raise _QueryError(p.E_NOT_FOUND, f"no node {node_id[:_MAX_ID]!r}")
                budget = self.master.config.cluster.max_frame_size // 2
                text = fit_node(self.master.registry.node_dict(node), budget)
                body = f'{{"type":"reply","id":{qid},"ok":true,"data":{text}}}'.encode()
                self.send(_pack(len(body)) + body)
            elif what == "history":
                self._history(message)
            elif what == "forget":
                self._forget(qid, message)
            else:
                raise _QueryError(
                    p.E_BAD_MESSAGE,
                    f"unknown query {what[:40]!r} (known: cluster, node, history, forget)",
                )
        except _QueryError as exc:
            self.master.counters.failed_queries_total += 1
            self.send(
                p.make(p.REPLY, id=qid, ok=False, error={"code": exc.code, "message": exc.message})
            )

    def _forget(self, qid: int, message: dict[str, Any]) -> None:
        """``rpicluster forget``: remove a node and its history (docs/protocol.md 8.5).

        Only a ``client`` connection may ask: a slave role has no business
        removing its peers. A connected node is refused unless ``force`` is true.
        """
        if self.kind != p.KIND_CLIENT:
            raise _QueryError(p.E_BAD_MESSAGE, "only a client connection may ask forget")
        own = self.master.tls_status.get("name")
        if self.tls is not None and self.identity != own:
            # A Pi's credential may read the cluster, not remove its peers.
            raise _QueryError(
                p.E_FORBIDDEN,
                f"forget needs the master's own credential ({own!r}), not {self.identity!r}:"
                " run it on the master",
            )
        wanted = message.get("node")
        force = message.get("force", False)
        if not isinstance(wanted, str) or md.check_name(wanted, md.MAX_STRING):
            raise _QueryError(
                p.E_BAD_MESSAGE, f"query forget needs a field 'node': a name of 1..{md.MAX_STRING}"
            )
        if not isinstance(force, bool):
            raise _QueryError(p.E_BAD_MESSAGE, "query forget field 'force' must be true or false")
        master = self.master
        found = master.registry.find(wanted)
        if not found:
            raise _QueryError(p.E_NOT_FOUND, f"no node {wanted!r}")
        if len(found) > 1:
            ids = ", ".join(sorted(node.node_id for node in found)[:8])
            raise _QueryError(
                p.E_AMBIGUOUS, f"{len(found)} nodes are named {wanted!r} ({ids}): give the node id"
            )
        node = found[0]
        if node.sessions and not force:
            raise _QueryError(
                p.E_CONNECTED,
                f"node {node.node_id} ({wanted}) is connected: stop its slave first, or force",
            )
        data = {
            "node_id": node.node_id,
            "name": node_label(node),
            "state": node.state,
            "connections_closed": master.forget_node(node.node_id, f"forgotten by {self.name}"),
        }
        self.send(p.make(p.REPLY, id=qid, ok=True, data=data))

    def _history(self, message: dict[str, Any]) -> None:
        qid = message["id"]
        node_id = message.get("node_id")
        if not isinstance(node_id, str):
            raise _QueryError(p.E_BAD_MESSAGE, "query history needs a string field 'node_id'")
        if node_id not in self.master.registry.nodes:
            raise _QueryError(p.E_NOT_FOUND, f"no node {node_id[:_MAX_ID]!r}")
        since = message.get("since")
        if since is not None and (not isinstance(since, (int, float)) or isinstance(since, bool)):
            raise _QueryError(p.E_BAD_MESSAGE, "query history field 'since' must be a number")
        limit = _int_field(message, "limit", HISTORY_CAP, 1)
        if limit > HISTORY_CAP:
            raise _QueryError(p.E_BAD_MESSAGE, f"query field 'limit' must be 1..{HISTORY_CAP}")
        master = self.master
        budget = master.config.cluster.max_frame_size // 2
        loop = master.loop

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(self._history_done, qid, node_id, result)

        master._flush()  # the read then sees every point received so far
        master.store.read(lambda conn: read_history(conn, node_id, since, limit, budget), done)

    def _history_done(self, qid: int, node_id: str, result: Any) -> None:
        if isinstance(result, Exception):
            self.master.counters.failed_queries_total += 1
            log.error("history of node %s could not be read: %s", node_id, result)
            self.send(
                p.make(
                    p.REPLY,
                    id=qid,
                    ok=False,
                    error={"code": p.E_INTERNAL, "message": "history could not be read"},
                )
            )
            return
        points, more = result
        body = (
            f'{{"type":"reply","id":{qid},"ok":true,"data":{{"node_id":{json.dumps(node_id)},'
            f'"points":{points},"more":{"true" if more else "false"}}}}}'
        ).encode()
        self.send(_pack(len(body)) + body)


class _QueryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _int_field(message: dict[str, Any], field: str, default: int, minimum: int) -> int:
    value = message.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _QueryError(
            p.E_BAD_MESSAGE, f"query field {field!r} must be a whole number >= {minimum}"
        )
    return value
