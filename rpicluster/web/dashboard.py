"""The dashboard's HTML: the cluster page (``/``) and one page per node.

Everything that comes from a node (name, hostname, roles, details, errors) goes
through one choke point, :func:`_e`: made displayable first (one bounded line,
control characters and lone surrogates shown as escapes, see
:mod:`rpicluster.displayable`), then HTML-escaped; node ids in links are
URL-quoted. Why not a template engine: the Pi's runtime is stdlib + psutil, and
the stdlib has no autoescaping templates (``string.Template`` escapes nothing);
every node-derived value is interpolated through ``_e`` and the tests render
poisoned nodes through every page. The page refreshes itself: a
ten-line inline script (allowed by its hash in the Content-Security-Policy, no
library) reloads it as soon as the webserver holds a newer snapshot; without
JavaScript a ``<meta http-equiv="refresh">`` reloads it every ``refresh_interval``
rounded up to whole seconds, as browsers read that attribute.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from array import array
from collections.abc import Mapping
from html import escape
from typing import Any, Callable, Optional
from urllib.parse import quote

import rpicluster
from rpicluster import displayable, humanize, pihealth
from rpicluster.web.state import Snapshot, number, ram_total, vital
from rpicluster.web.svg import auto_range, plot
from rpicluster.web.svg import bucket_count as svg_bucket_count

STATE_SYMBOLS = {"alive": "\u25cf", "suspect": "\u25b2", "dead": "\u2716", "left": "\u25cb"}
COLORS = {
    "cpu": "#0969da",
    "temp": "#bc4c00",
    "ram": "#8250df",
    "load": "#1a7f37",
    "disk": "#57606a",
}

CSS = """
:root{--bg:#f4f6f8;--card:#fff;--fg:#1f2328;--muted:#656d76;--line:#d8dee4;--head:#f6f8fa;
--alive:#1a7f37;--alive-bg:#dafbe1;--suspect:#9a6700;--suspect-bg:#fff8c5;--dead:#cf222e;
--dead-bg:#ffebe9;--left:#57606a;--left-bg:#eaeef2;--link:#0969da}
@media (prefers-color-scheme:dark){:root{--bg:#0d1117;--card:#161b22;--fg:#e6edf3;--muted:#8d96a0;
--line:#30363d;--head:#1c2128;--alive:#3fb950;--alive-bg:#12261e;--suspect:#d29922;
--suspect-bg:#272115;--dead:#f85149;--dead-bg:#2d1518;--left:#8d96a0;--left-bg:#21262d;
--link:#4493f8}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}
header{display:flex;flex-wrap:wrap;align-items:center;gap:8px 20px;padding:14px 24px;
background:var(--card);border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0;font-weight:650}
h1 small{font-weight:400;color:var(--muted);font-size:13px}
h2{font-size:16px;margin:22px 0 10px}
main{padding:16px 24px 32px}
.chips{display:flex;gap:8px;flex-wrap:wrap}
.chip{padding:2px 10px;border-radius:999px;background:var(--head);border:1px solid var(--line);
font-size:13px}.chip b{font-variant-numeric:tabular-nums}
.meta{color:var(--muted);font-size:13px;margin-left:auto}
.banner{margin:0 0 14px;padding:10px 14px;border-radius:6px;border:1px solid var(--dead);
background:var(--dead-bg);color:var(--fg)}.banner b{color:var(--dead)}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{padding:7px 10px;text-align:left;border-bottom:1px solid var(--line);white-space:nowrap;
vertical-align:middle}
th{background:var(--head);font-size:12px;font-weight:600;color:var(--muted);
text-transform:uppercase;letter-spacing:.03em}
tbody tr:last-child td{border-bottom:0}tbody tr:hover{background:var(--head)}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.host{font-weight:600}.id{display:block;color:var(--muted);font-size:11px;
font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.role{display:inline-block;padding:0 7px;margin:1px 2px 1px 0;border-radius:4px;font-size:12px;
background:var(--head);border:1px solid var(--line)}
.state{display:inline-block;padding:1px 9px;border-radius:999px;font-size:12px;font-weight:600;
border:1px solid currentColor}
.state.alive{color:var(--alive);background:var(--alive-bg)}
.state.suspect{color:var(--suspect);background:var(--suspect-bg)}
.state.dead{color:var(--dead);background:var(--dead-bg)}
.state.left,.state.unknown{color:var(--left);background:var(--left-bg)}
tr.dead td,tr.left td{color:var(--muted)}
svg.plot,svg.bigplot{display:block;overflow:visible}
svg .frame{fill:var(--head);stroke:var(--line);stroke-width:1}
svg .grid{stroke:var(--line);stroke-width:1;stroke-dasharray:2 3}
svg .label,svg .nodata{fill:var(--muted);font-size:11px}
td.spark{padding:4px 8px}
.plots{display:flex;flex-wrap:wrap;gap:14px}
.plots figure{margin:0;padding:10px 12px;background:var(--card);border:1px solid var(--line);
border-radius:8px}.plots figcaption{font-weight:600;margin-bottom:6px}
.plots svg{max-width:100%;height:auto}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:0 24px;
padding:10px 14px}
.facts div{display:flex;justify-content:space-between;gap:12px;padding:5px 0;
border-bottom:1px solid var(--line)}.facts dt{color:var(--muted)}.facts dd{margin:0;
text-align:right;overflow-wrap:anywhere}
footer{color:var(--muted);font-size:12px;padding:0 24px 24px}
.empty{padding:24px;text-align:center;color:var(--muted)}
.stale tbody{opacity:.6}
.badge{display:inline-block;padding:0 7px;margin:1px 2px 1px 0;border-radius:4px;font-size:12px;
font-weight:600;border:1px solid currentColor;white-space:nowrap}
.badge.warn{color:var(--suspect);background:var(--suspect-bg)}
.badge.bad{color:var(--dead);background:var(--dead-bg)}
.badges{display:block;margin-top:2px}
"""


def _e(value: Any, limit: int = displayable.MAX_TEXT) -> str:
    """Any value as escaped HTML text: the one choke point for node data in HTML."""
    return escape(displayable.text(value, limit), quote=True)


def node_href(node_id: str) -> str:
    """The node page's URL (any id quotes: lone surrogates round-trip as in http._node_id)."""
    return "/nodes/" + quote(node_id, safe="", errors="surrogatepass")


def _href(node_id: str) -> str:
    return escape(node_href(node_id), quote=True)


def health_badges(node: Mapping[str, Any]) -> str:
    """Warning badges: duplicate name or id (contract 1), then power and heat
    (:func:`rpicluster.pihealth.warnings`; "now" is red, "since boot" amber)."""
    badges = []
    if node.get("duplicate_id") is True:
        badges.append(
            '<span class="badge bad" data-flag="duplicate_id" title="two machines claim this '
            'node id (a copied SD card?)">duplicate id</span>'
        )
    if node.get("duplicate_name") is True:
        badges.append(
            '<span class="badge warn" data-flag="duplicate_name" title="another node has this '
            'name">duplicate name</span>'
        )
    vitals = node.get("vitals")
    for warning in pihealth.warnings(dict(vitals) if isinstance(vitals, Mapping) else None):
        level = "bad" if warning.endswith(" now") else "warn"
        badges.append(f'<span class="badge {level}" data-flag="health">{_e(warning)}</span>')
    return "".join(badges)


def short_id(node_id: str) -> str:
    """The first 8 characters of a long node id (the full id is in the tooltip and URL)."""
    return node_id if len(node_id) <= 12 else node_id[:8] + "\u2026"


def state_badge(state: Any) -> str:
    """The node's state as a coloured badge that reads without colour: symbol and word."""
    word = state if state in STATE_SYMBOLS else "unknown"
    symbol = STATE_SYMBOLS.get(word, "?")
    return f'<span class="state {word}" title="state: {_e(state)}">{symbol} {_e(state)}</span>'


# Reload the page as soon as the webserver holds a newer snapshot (it polls the tiny,
# uncached /healthz), so a node's new state shows within about half a second of the
# refresh that brought it, instead of up to a whole meta-refresh period later. At
# most every MAX_AGE ms anyway, so "12 s ago" keeps counting while the master is
# down. Without JavaScript the <noscript> meta refresh does the job.
RELOAD_SCRIPT = (
    "(function(){var v=document.documentElement.getAttribute('data-version'),"
    "t0=Date.now(),MAX_AGE=10000;function poll(){"
    "if(Date.now()-t0>MAX_AGE){location.reload();return}"
    "fetch('/healthz',{cache:'no-store'}).then(function(r){return r.json()})"
    ".then(function(d){if(String(d.version)!==v){location.reload()}else{setTimeout(poll,500)}})"
    ".catch(function(){setTimeout(poll,2000)})}setTimeout(poll,500)})();"
)
RELOAD_SCRIPT_HASH = "sha256-" + base64.b64encode(
    hashlib.sha256(RELOAD_SCRIPT.encode("utf-8")).digest()
).decode("ascii")


# A green node on a dark disc: the tab icon, served at /favicon.svg.
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<circle cx="8" cy="8" r="8" fill="#1f2328"/><circle cx="8" cy="8" r="4" fill="#3fb950"/>'
    "</svg>"
)


def _page(title: str, body: str, refresh_seconds: int, version: int = 0) -> str:
    return (
        f'<!DOCTYPE html><html lang="en" data-version="{version}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="/favicon.svg" type="image/svg+xml">'
        f'<noscript><meta http-equiv="refresh" content="{refresh_seconds}"></noscript>'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>{body}"
        f"<script>{RELOAD_SCRIPT}</script></body></html>"
    )


def refresh_seconds(refresh_interval: float) -> int:
    """Whole seconds for the meta refresh (browsers ignore fractions; 0 would loop)."""
    return max(1, math.ceil(refresh_interval))


# ------------------------------------------------------------------ plot data


def _disk_range(finite: list[float]) -> tuple[float, float]:
    top = max(finite) * 1.1 if finite and max(finite) > 0 else 1.0
    return 0.0, top


def _used_percent(node: Mapping[str, Any]) -> Optional[Callable[[float], float]]:
    """Maps RAM available (bytes) to RAM used (% of the node's RAM), if its size is known."""
    total = ram_total(node)
    if not total or total <= 0:
        return None
    return lambda available: 100.0 * (1.0 - available / total)


# (key, caption, history column, y range: fixed or from the plotted means, formatter)
PlotSpec = tuple[str, str, str, Any, Callable[[float], str]]


def _table_temperature_range(finite: list[float]) -> tuple[float, float]:
    """30-90 °C (a Pi throttles at 80-85), widened for outliers: rows compare at a glance."""
    lo, hi = auto_range(finite)
    return min(lo, 30.0), max(hi, 90.0)


PLOTS: tuple[PlotSpec, ...] = (
    ("cpu", "CPU %", "cpu_percent", (0.0, 100.0), humanize.percent),
    ("temp", "Temperature", "temperature", _table_temperature_range, humanize.temperature),
    ("ram", "RAM used", "ram_available", (0.0, 100.0), humanize.percent),
)
# The node page zooms in: the temperature axis fits that node's readings.
DETAIL_PLOTS: tuple[PlotSpec, ...] = (
    PLOTS[0],
    ("temp", "Temperature", "temperature", auto_range, humanize.temperature),
    PLOTS[2],
    ("load", "Load (1 min)", "load_1", lambda f: auto_range(f, 1.0), lambda v: f"{v:.2f}"),
    ("disk", "Disk free", "disk_free", _disk_range, humanize.size),
)


MIN_PLOT_SPAN = 10.0


def plot_span(snap: Snapshot, window: float, now: float) -> float:
    """Seconds the plots cover: the history window, or less while the cluster is young.

    A fresh cluster has a minute of history; drawn over an hour it would be a dot at
    the right edge. Every node's plot shares this span so rows compare at a glance.
    """
    starts = [h.ts[0] for h in snap.history.values() if len(h)]
    if not starts:
        return window
    held = now - min(starts)
    # Rounded up (10 s steps, then whole minutes) so the span, and with it every
    # cached plot, does not change from one second to the next.
    step = 10.0 if held < 300 else 60.0
    return min(window, max(math.ceil(held / step) * step, min(MIN_PLOT_SPAN, window)))


def span_text(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def node_plots(
    snap: Snapshot,
    node: Mapping[str, Any],
    window: float,
    now: float,
    specs: tuple[PlotSpec, ...],
    **size: Any,
) -> list[tuple[str, str, str]]:
    """(key, caption, svg) for each plot of one node over [now - window, now]."""
    history = snap.node_history(str(node.get("node_id")))
    span = span_text(window)
    width = size.get("width", 120)
    height = size.get("height", 34)
    axes = size.get("axes", False)
    # End the time axis on a bucket boundary: the averages then do not shift between
    # two page loads, and a plot is drawn once per new bucket or new history point.
    bucket = window / svg_bucket_count(width, axes)
    end = math.ceil(now / bucket) * bucket
    out = []
    for key, caption, column, y_range, fmt in specs:
        transform = _used_percent(node) if key == "ram" else None

        def draw(
            key=key, caption=caption, column=column, y_range=y_range, fmt=fmt, transform=transform
        ) -> str:
            values = history.column(column)
            if key == "ram" and transform is None:
                values = array("d")  # RAM size unknown: no percentage to draw
            return plot(
                history.ts,
                values,
                start=end - window,
                end=end,
                y_range=y_range,
                title=f"{caption} over the last {span}",
                color=COLORS[key],
                fmt=fmt,
                transform=transform,
                **size,
            )

        extra = ram_total(node) if key == "ram" else None
        svg = history.cached(("svg", key, end, window, width, height, axes, extra), draw)
        out.append((key, caption, svg))
    return out


# ---------------------------------------------------------------------- pages


def _header(snap: Snapshot, now_local: float, title_html: str) -> str:
    counts = snap.counts()
    chips = [f'<span class="chip"><b>{len(snap.nodes)}</b> nodes</span>']
    chips += [
        f'<span class="chip">{state_badge(state)} <b>{n}</b></span>'
        for state, n in counts.items()
        if n or state in ("alive", "dead")
    ]
    master = snap.master
    host = master.get("hostname") or master.get("address") or ""
    refreshed = humanize.ago(snap.fetched_at, now_local) if snap.fetched_at else "not yet"
    meta = f"master {_e(host)} \u00b7 " if host else ""
    tls = master.get("tls")
    if isinstance(tls, Mapping) and tls.get("enabled") is True:
        days, ca_days = number(tls.get("days_left")), number(tls.get("ca_days_left"))
        if days is not None and ca_days is not None:
            meta += f"TLS: certificate {days:.0f} d, CA {ca_days:.0f} d \u00b7 "
    meta += f"refreshed {_e(refreshed)}"
    return (
        f"<header><h1>{title_html}</h1>"
        f'<div class="chips">{"".join(chips)}</div><div class="meta">{meta}</div></header>'
    )


def _store_banner(snap: Snapshot) -> str:
    """The master's store health (contract 4): a banner when it does not save."""
    store = snap.master.get("store")
    if not isinstance(store, Mapping) or store.get("ok") is not False:
        return ""
    error = store.get("error")
    reason = f": {_e(error)}" if error else ""
    return (
        '<div class="banner" role="alert" id="store-failing"><b>The master\'s store is not '
        f"saving</b>{reason}. Vitals history may be lost.</div>"
    )


ALERTS_SHOWN = 10  # firing alerts listed in the banner; the count says the rest


def _alerts_banner(snap: Snapshot) -> str:
    """Firing alerts of the master (master/alerts.py), and a webhook that fails."""
    alerts = snap.master.get("alerts")
    if not isinstance(alerts, Mapping):
        return ""
    firing = [a for a in alerts.get("firing") or [] if isinstance(a, Mapping)]
    count = alerts.get("firing_count")
    count = count if isinstance(count, int) and not isinstance(count, bool) else len(firing)
    out = ""
    if count:
        items = "".join(
            f"<li><b>{_e(a.get('alert'))}</b> {_e(a.get('summary'))}</li>"
            for a in firing[:ALERTS_SHOWN]
        )
        more = f"<li>and {count - ALERTS_SHOWN} more</li>" if count > ALERTS_SHOWN else ""
        out += (
            f'<div class="banner" role="alert" id="alerts-firing"><b>{count} alert(s) firing'
            f"</b><ul>{items}{more}</ul></div>"
        )
    hook = alerts.get("webhook")
    if isinstance(hook, Mapping) and hook.get("ok") is False:
        error = hook.get("error")
        reason = f": {_e(error)}" if error else ""
        out += (
            '<div class="banner" role="alert" id="webhook-failing"><b>Alert notifications '
            f"are not delivered</b> ({_e(hook.get('target'))}){reason}.</div>"
        )
    return out


def _banner(snap: Snapshot, stale_after: float, now_local: float) -> str:
    return _store_banner(snap) + _alerts_banner(snap) + _master_banner(snap, stale_after, now_local)


def _master_banner(snap: Snapshot, stale_after: float, now_local: float) -> str:
    since = snap.master_unreachable_since(stale_after)
    if since is None:
        if snap.fetched_at is None:
            return (
                '<div class="banner" role="status"><b>Waiting for the master.</b>'
                " No cluster state received yet.</div>"
            )
        return ""
    reason = f" ({_e(snap.last_error)})" if snap.last_error else ""
    return (
        '<div class="banner" role="alert" id="master-unreachable"><b>Master unreachable since '
        f"{_e(humanize.clock(since))}</b> ({_e(humanize.ago(since, now_local))}){reason}: "
        "showing the last known state.</div>"
    )


def _roles(node: Mapping[str, Any]) -> str:
    roles = _list(node.get("roles"))
    if not roles:
        return humanize.DASH
    return "".join(f'<span class="role">{_e(r)}</span>' for r in roles)


def _list(value: Any) -> list[Any]:
    """A list field as a bounded list (anything else is no items)."""
    return list(value[: displayable.MAX_TREE_ITEMS]) if isinstance(value, list) else []


def _node_row(snap: Snapshot, node: Mapping[str, Any], now: float, window: float) -> str:
    node_id = str(node.get("node_id"))
    state = node.get("state")
    v = node.get("vitals") if isinstance(node.get("vitals"), Mapping) else None
    name = displayable.node_name(node)
    hostname = node.get("hostname")
    also = f" \u00b7 {_e(hostname)}" if isinstance(hostname, str) and hostname != name else ""
    loads = tuple(vital(v, k) for k in ("load_1", "load_5", "load_15"))
    badges = health_badges(node)
    cells = [
        f'<td><a class="host" href="{_href(node_id)}">{_e(name)}</a>'
        f'<span class="id" title="{_e(node_id)}">{_e(short_id(node_id))}{also}</span></td>',
        f"<td>{_roles(node)}</td>",
        f"<td>{state_badge(state)}"
        + (f'<span class="badges">{badges}</span>' if badges else "")
        + "</td>",
        f'<td class="seen">{_e(humanize.ago(number(node.get("last_seen")), now))}</td>',
        f'<td class="num">{_e(humanize.duration(vital(v, "uptime")))}</td>',
        f'<td class="num">{_e(humanize.percent(vital(v, "cpu_percent")))}</td>',
        f'<td class="num">{_e(humanize.load(loads))}</td>',
        f'<td class="num">{_e(humanize.size(vital(v, "ram_available")))}</td>',
        f'<td class="num">{_e(humanize.size(vital(v, "disk_free")))}</td>',
        f'<td class="num">{_e(humanize.temperature(vital(v, "temperature")))}</td>',
    ]
    for key, _caption, svg in node_plots(snap, node, window, now, PLOTS):
        cells.append(f'<td class="spark" data-plot="{key}">{svg}</td>')
    state_class = state if state in STATE_SYMBOLS else "unknown"
    return (
        f'<tr class="node {state_class}" data-node-id="{_e(node_id)}" data-state="{_e(state)}">'
        + "".join(cells)
        + "</tr>"
    )


def _footer(snap: Snapshot) -> str:
    counters = snap.master.get("counters")
    parts = [f"rpicluster {_e(rpicluster.__version__)}"]
    if isinstance(counters, Mapping):
        for key, value in sorted(counters.items()):
            n = number(value)
            if n is not None:
                parts.append(f"{_e(str(key).replace('_', ' '))}: {n:g}")
    return "<footer>" + " \u00b7 ".join(parts) + "</footer>"


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
        _header(snap, now_local, "rpicluster <small>dashboard</small>")
        + "<main>"
        + _banner(snap, stale_after, now_local)
        + f'<div class="card{stale}"><table id="nodes">{head}<tbody>{rows}</tbody></table></div>'
        + "</main>"
        + _footer(snap)
    )
    title = f"rpicluster: {len(snap.nodes)} nodes, {counts.get('alive', 0)} alive"
    return _page(title, body, refresh_seconds(refresh_interval), snap.version)


FACT_LIMIT = 1024  # characters of one fact shown on the node page


def _fact(name: Any, value: Any) -> str:
    name = displayable.text(name).replace("_", " ")
    if isinstance(value, bool):
        value = "yes" if value else "no"
    elif isinstance(value, (dict, list)):
        value = json.dumps(displayable.tree(value, 4), sort_keys=True)
    elif value is None:
        value = humanize.DASH
    return f"<div><dt>{_e(name)}</dt><dd>{_e(value, FACT_LIMIT)}</dd></div>"


def _section(title: str, facts_html: str) -> str:
    return f'<h2>{_e(title)}</h2><div class="card"><dl class="facts">{facts_html}</dl></div>'


def _describe(key: str, value: Any) -> Any:
    """A vitals/details value in human units where the key says what it is."""
    n = number(value)
    if n is None:
        return value
    if key.endswith("_bytes_per_s"):
        return humanize.rate(n)
    if key == "cpu_freq_mhz":
        return humanize.frequency(n)
    if key.startswith(("ram_", "mem_", "swap_", "disk_")):
        return humanize.size(n)
    if key == "uptime":
        return humanize.duration(n)
    if key in ("boot_time", "ts"):
        return humanize.clock(n)
    if key in ("temperature", "temperature_c"):
        return humanize.temperature(n)
    if key == "cpu_percent":
        return humanize.percent(n)
    return value


def render_node(
    snap: Snapshot,
    node: Mapping[str, Any],
    *,
    refresh_interval: float,
    history_window: float,
    stale_after: float,
) -> str:
    """One node: its state, large plots, latest vitals, details and action errors."""
    now = snap.now()
    now_local = now - snap.clock_offset
    node_id = str(node.get("node_id"))
    name = displayable.node_name(node)
    facts = [
        _fact("name", name),
        _fact("node id", node_id),
        _fact("hostname", node.get("hostname")),
        _fact("address", node.get("address")),
        _fact("roles", ", ".join(displayable.text(r) for r in _list(node.get("roles"))) or None),
        _fact("groups", ", ".join(displayable.text(g) for g in _list(node.get("groups"))) or None),
        _fact("state", node.get("state")),
        _fact("connected", node.get("connected")),
        _fact("last seen", humanize.ago(number(node.get("last_seen")), now)),
        _fact("connected since", humanize.clock(number(node.get("connected_since")))),
    ]
    tls = node.get("tls")
    if isinstance(tls, Mapping):  # bound to a certificate (docs/protocol.md 13)
        days = number(tls.get("days_left"))
        left = f", {days:.0f} days left" if days is not None else ""
        facts.append(_fact("certificate", f"{displayable.text(tls.get('name'))}{left}"))
    plots = node_plots(
        snap,
        node,
        plot_span(snap, history_window, now),
        now,
        DETAIL_PLOTS,
        width=440,
        height=170,
        axes=True,
        css_class="bigplot",
    )
    figures = "".join(
        f'<figure data-plot="{key}"><figcaption>{_e(caption)}</figcaption>{svg}</figure>'
        for key, caption, svg in plots
    )
    vitals = node.get("vitals") if isinstance(node.get("vitals"), Mapping) else {}
    details = node.get("details") if isinstance(node.get("details"), Mapping) else {}
    vitals_html = "".join(_fact(k, _describe(k, v)) for k, v in _items(vitals))
    details_html = "".join(_fact(k, _describe(k, v)) for k, v in _items(details))
    errors = node.get("action_errors")
    errors_html = ""
    if isinstance(errors, Mapping) and errors:
        errors_html = (
            '<h2>Action errors</h2><div class="card"><dl class="facts">'
            + "".join(
                _fact(
                    role,
                    f"{info.get('count', '?')} \u00d7, last: {info.get('last', '')}"
                    if isinstance(info, Mapping)
                    else info,
                )
                for role, info in sorted(errors.items())
            )
            + "</dl></div>"
        )
    badges = health_badges(node)
    title_html = f'<a href="/">rpicluster</a> / {_e(name)} {state_badge(node.get("state"))}' + (
        f' <span class="badges" id="health">{badges}</span>' if badges else ""
    )
    body = (
        _header(snap, now_local, title_html)
        + "<main>"
        + _banner(snap, stale_after, now_local)
        + f'<div class="card"><dl class="facts">{"".join(facts)}</dl></div>'
        + f'<h2>Vitals history</h2><div class="plots">{figures}</div>'
        + _section("Power, heat and I/O", _pi_health(vitals))
        + _section("Latest vitals", vitals_html or _fact("vitals", None))
        + _section("Details", details_html or _fact("details", None))
        + errors_html
        + "</main>"
        + _footer(snap)
    )
    return _page(f"rpicluster: {name}", body, refresh_seconds(refresh_interval), snap.version)


def _items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A mapping's items sorted by key, at most MAX_TREE_ITEMS of them."""
    items = [(displayable.text(k), v) for k, v in mapping.items()]
    return sorted(items, key=lambda kv: kv[0])[: displayable.MAX_TREE_ITEMS]


# (label, vital, formatter) of the node page's "Power, heat and I/O" section.
PI_HEALTH_FACTS: tuple[tuple[str, str, Callable[[Optional[float]], str]], ...] = (
    ("temperature", "temperature", humanize.temperature),
    ("CPU frequency", "cpu_freq_mhz", humanize.frequency),
    ("network in", "net_rx_bytes_per_s", humanize.rate),
    ("network out", "net_tx_bytes_per_s", humanize.rate),
    ("disk reads", "disk_read_bytes_per_s", humanize.rate),
    ("disk writes", "disk_write_bytes_per_s", humanize.rate),
    ("disk free", "disk_free", humanize.size),
    ("disk size", "disk_total", humanize.size),
)


def _pi_health(vitals: Mapping[str, Any]) -> str:
    """Throttling conditions (now / since boot), clock, temperature and I/O rates."""
    found = pihealth.conditions(dict(vitals))
    facts = []
    for condition in pihealth.CONDITIONS:
        state = found.get(condition.key)
        if state is None:
            value = "unknown"
        elif state["now"]:
            value = "NOW"
        else:
            value = "since boot" if state["since_boot"] else "no"
        facts.append(_fact(condition.label, value))
    facts += [_fact(label, fmt(vital(vitals, key))) for label, key, fmt in PI_HEALTH_FACTS]
    return "".join(facts)


def render_not_found(what: str) -> str:
    body = (
        '<header><h1><a href="/">rpicluster</a></h1></header>'
        f'<main><div class="banner" role="alert"><b>Not found:</b> {_e(what)}</div>'
        '<p><a href="/">Back to the dashboard</a></p></main>'
    )
    return _page("rpicluster: not found", body, 60)
