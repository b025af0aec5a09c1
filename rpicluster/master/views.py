"""What the master tells about itself and its fleet: the master dict and the cluster views.

Split from the master's lifecycle (``server.py``) because these are read-only
views over the registry with their own constraints: a ``cluster`` reply never
overflows a frame however large the fleet (pages of half a frame at most), and
``cluster_state()`` may be called from any thread, so it builds its document on
the event loop that owns the registry. ``ClusterViews`` is a mixin of ``Master``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import __version__
from rpicluster import protocol as p
from rpicluster import tls as tlsmod
from rpicluster.config import Config
from rpicluster.master import upkeep
from rpicluster.master.queries import fit_node

if TYPE_CHECKING:
    from rpicluster.master.admission import Admission
    from rpicluster.master.counters import Counters
    from rpicluster.master.registry import Registry
    from rpicluster.master.store import Store


class ClusterViews:
    """The master's views for ``Master`` (a mixin: the attributes below are the master's)."""

    config: Config
    registry: Registry
    hostname: str
    started_at: float
    admission: Admission
    counters: Counters
    store: Store
    tls_status: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    _thread: Optional[threading.Thread]

    def master_dict(self, full: bool = True) -> dict[str, Any]:
        """The master dict; ``full`` adds counters and node counts (not in ``welcome``)."""
        cluster = self.config.cluster
        info: dict[str, Any] = {
            "hostname": self.hostname,
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
            "started_at": self.started_at,
            "heartbeat_interval": cluster.heartbeat_interval,
            "suspect_after": cluster.suspect_after,
            "dead_after": cluster.dead_after,
            "max_frame_size": cluster.max_frame_size,
        }
        if full and self.config.master is not None:
            info["forget_after"] = self.config.master.forget_after
        if full:
            info["tls"] = self._tls_view()
        if full:
            info["nodes"] = self.registry.counts()
            self.counters.unauthenticated_open = self.admission.pending
            info["counters"] = self.counters.as_dict()
            if self.store is not None:  # whether writes fail or lag (store.py)
                info["store"] = self.store.health()
            info["alerts"] = upkeep.alerts_dict(self)
        return info

    def _tls_view(self) -> dict[str, Any]:
        """The ``tls`` object: days left recomputed from the expiry read at start."""
        view = dict(self.tls_status)
        if "not_after" in view:
            view["days_left"] = tlsmod.days_left(view["not_after"])
        if "ca_not_after" in view:
            view["ca_days_left"] = tlsmod.days_left(view["ca_not_after"])
        return view

    def cluster_page(self, qid: int, offset: int, limit: int) -> bytes:
        """One ``reply`` frame of the cluster query, filled to half a frame at most."""
        registry = self.registry
        nodes = list(registry.nodes.values())
        total = len(nodes)
        budget = self.config.cluster.max_frame_size // 2
        head = json.dumps(self.master_dict())
        size = len(head) + 200
        node_budget = budget - size
        parts: list[str] = []
        index = offset
        while index < total and len(parts) < limit:
            text = fit_node(registry.node_dict(nodes[index]), node_budget)
            if parts and size + len(text) + 1 > budget:
                break
            parts.append(text)
            size += len(text) + 1
            index += 1
        next_offset = index if index < total else None
        body = (
            f'{{"type":"reply","id":{qid},"ok":true,"data":{{"master":{head},'
            f'"nodes":[{",".join(parts)}],"total":{total},'
            f'"next_offset":{"null" if next_offset is None else next_offset}}}}}'
        ).encode()
        return p.HEADER.pack(len(body)) + body

    def cluster_state(self) -> dict[str, Any]:
        """The whole cluster document (all pages), safe to call from any thread."""

        def build() -> dict[str, Any]:
            registry = self.registry
            nodes = [registry.node_dict(node) for node in registry.nodes.values()]
            return {
                "master": self.master_dict(),
                "nodes": json.loads(json.dumps(nodes)),  # a copy the caller may keep
                "total": len(nodes),
                "next_offset": None,
            }

        loop = self.loop
        thread = self._thread
        if loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return build()
        if threading.current_thread() is thread:
            return build()
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(build())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(10.0)
