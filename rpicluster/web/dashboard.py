"""The dashboard's cluster page (``/``): one row per node, its latest vitals and small plots.

The pages are shared by four modules: this one renders the cluster page and is
where the web handler (and the tests) find every page and the page constants;
``page.py`` is the frame and the one choke point for node data (:func:`esc`),
``plots.py`` chooses and draws the plots, ``nodepage.py`` renders one node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rpicluster import displayable, humanize
from rpicluster.web.nodepage import render_node
from rpicluster.web.page import (
    FAVICON_SVG,
    RELOAD_SCRIPT,
    RELOAD_SCRIPT_HASH,
    STATE_SYMBOLS,
    banner,
    bounded_list,
    esc,
    footer,
    header,
    health_badges,
    href,
    page,
    refresh_seconds,
    render_not_found,
    short_id,
    state_badge,
)
from rpicluster.web.plots import PLOTS, node_plots, plot_span, span_text
from rpicluster.web.state import Snapshot, number, vital

# What the web handler and the tests use from here, wherever it is defined.
__all__ = [
    "FAVICON_SVG",
    "RELOAD_SCRIPT",
    "RELOAD_SCRIPT_HASH",
    "render_dashboard",
    "render_node",
    "render_not_found",
]


def _roles(node: Mapping[str, Any]) -> str:
    roles = bounded_list(node.get("roles"))
    if not roles:
        return humanize.DASH
    return "".join(f'<span class="role">{esc(r)}</span>' for r in roles)


def _node_row(snap: Snapshot, node: Mapping[str, Any], now: float, window: float) -> str:
    node_id = str(node.get("node_id"))
    state = node.get("state")
    v = node.get("vitals") if isinstance(node.get("vitals"), Mapping) else None
    name = displayable.node_name(node)
    hostname = node.get("hostname")
    also = f" \u00b7 {esc(hostname)}" if isinstance(hostname, str) and hostname != name else ""
    loads = tuple(vital(v, k) for k in ("load_1", "load_5", "load_15"))
    badges = health_badges(node)
    cells = [
        f'<td><a class="host" href="{href(node_id)}">{esc(name)}</a>'
        f'<span class="id" title="{esc(node_id)}">{esc(short_id(node_id))}{also}</span></td>',
        f"<td>{_roles(node)}</td>",
        f"<td>{state_badge(state)}"
        + (f'<span class="badges">{badges}</span>' if badges else "")
        + "</td>",
        f'<td class="seen">{esc(humanize.ago(number(node.get("last_seen")), now))}</td>',
        f'<td class="num">{esc(humanize.duration(vital(v, "uptime")))}</td>',
        f'<td class="num">{esc(humanize.percent(vital(v, "cpu_percent")))}</td>',
        f'<td class="num">{esc(humanize.load(loads))}</td>',
        f'<td class="num">{esc(humanize.size(vital(v, "ram_available")))}</td>',
        f'<td class="num">{esc(humanize.size(vital(v, "disk_free")))}</td>',
        f'<td class="num">{esc(humanize.temperature(vital(v, "temperature")))}</td>',
    ]
    for key, _caption, svg in node_plots(snap, node, window, now, PLOTS):
        cells.append(f'<td class="spark" data-plot="{key}">{svg}</td>')
    state_class = state if state in STATE_SYMBOLS else "unknown"
    return (
        f'<tr class="node {state_class}" data-node-id="{esc(node_id)}" data-state="{esc(state)}">'
        + "".join(cells)
        + "</tr>"
    )


def render_dashboard(
    snap: Snapshot, *, refresh_interval: float, history_window: float, stale_after: float
) -> str:
    """The cluster page: one row per node with its latest vitals and small plots."""
    now = snap.now()
    now_local = now - snap.clock_offset
    window = plot_span(snap, history_window, now)
    span = span_text(window)
    head = (
        "<thead><tr><th>Node</th><th>Roles</th><th>State</th><th>Last seen</th>"
        "<th>Uptime</th><th>CPU</th><th>Load 1/5/15</th><th>RAM free</th><th>Disk free</th>"
        f"<th>Temp</th><th>CPU % ({span})</th><th>Temp ({span})</th><th>RAM used ({span})</th>"
        "</tr></thead>"
    )
    rows = "".join(_node_row(snap, node, now, window) for node in snap.nodes)
    if not snap.nodes:
        rows = '<tr><td colspan="13" class="empty">No node has joined the cluster yet.</td></tr>'
    counts = snap.counts()
    stale = " stale" if snap.master_unreachable_since(stale_after) is not None else ""
    body = (
        header(snap, now_local, "rpicluster <small>dashboard</small>")
        + "<main>"
        + banner(snap, stale_after, now_local)
        + f'<div class="card{stale}"><table id="nodes">{head}<tbody>{rows}</tbody></table></div>'
        + "</main>"
        + footer(snap)
    )
    title = f"rpicluster: {len(snap.nodes)} nodes, {counts.get('alive', 0)} alive"
    return page(title, body, refresh_seconds(refresh_interval), snap.version)
