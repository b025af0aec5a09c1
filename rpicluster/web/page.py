"""What every dashboard page shares: the frame, the one choke point for node data, the banners.

Split from ``dashboard.py`` so the safety of the HTML is in one short module:
everything that comes from a node (name, hostname, roles, details, errors) goes
through :func:`esc`: made displayable first (one bounded line, control
characters and lone surrogates shown as escapes, see
:mod:`rpicluster.displayable`), then HTML-escaped; node ids in links are
URL-quoted. Why not a template engine: the Pi's runtime is stdlib + psutil, and
the stdlib has no autoescaping templates (``string.Template`` escapes nothing);
every node-derived value is interpolated through ``esc`` and the tests render
poisoned nodes through every page. The page refreshes itself: a
ten-line inline script (allowed by its hash in the Content-Security-Policy, no
library) reloads it as soon as the webserver holds a newer snapshot; without
JavaScript a ``<meta http-equiv="refresh">`` reloads it every ``refresh_interval``
rounded up to whole seconds, as browsers read that attribute. Also here: the
header with the state counts, the store, alert and master banners and the
footer that both pages show.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping
from html import escape
from typing import Any
from urllib.parse import quote

import rpicluster
from rpicluster import displayable, humanize, pihealth
from rpicluster.web.state import Snapshot, number

STATE_SYMBOLS = {"alive": "\u25cf", "suspect": "\u25b2", "dead": "\u2716", "left": "\u25cb"}

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


def esc(value: Any, limit: int = displayable.MAX_TEXT) -> str:
    """Any value as escaped HTML text: the one choke point for node data in HTML."""
    return escape(displayable.text(value, limit), quote=True)


def node_href(node_id: str) -> str:
    """The node page's URL (any id quotes: lone surrogates round-trip as in http._node_id)."""
    return "/nodes/" + quote(node_id, safe="", errors="surrogatepass")


def href(node_id: str) -> str:
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
        badges.append(f'<span class="badge {level}" data-flag="health">{esc(warning)}</span>')
    return "".join(badges)


def short_id(node_id: str) -> str:
    """The first 8 characters of a long node id (the full id is in the tooltip and URL)."""
    return node_id if len(node_id) <= 12 else node_id[:8] + "\u2026"


def state_badge(state: Any) -> str:
    """The node's state as a coloured badge that reads without colour: symbol and word."""
    word = state if state in STATE_SYMBOLS else "unknown"
    symbol = STATE_SYMBOLS.get(word, "?")
    return f'<span class="state {word}" title="state: {esc(state)}">{symbol} {esc(state)}</span>'


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


def page(title: str, body: str, refresh_seconds: int, version: int = 0) -> str:
    return (
        f'<!DOCTYPE html><html lang="en" data-version="{version}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="/favicon.svg" type="image/svg+xml">'
        f'<noscript><meta http-equiv="refresh" content="{refresh_seconds}"></noscript>'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>{body}"
        f"<script>{RELOAD_SCRIPT}</script></body></html>"
    )


def refresh_seconds(refresh_interval: float) -> int:
    """Whole seconds for the meta refresh (browsers ignore fractions; 0 would loop)."""
    return max(1, math.ceil(refresh_interval))


def header(snap: Snapshot, now_local: float, title_html: str) -> str:
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
    meta = f"master {esc(host)} \u00b7 " if host else ""
    tls = master.get("tls")
    if isinstance(tls, Mapping) and tls.get("enabled") is True:
        days, ca_days = number(tls.get("days_left")), number(tls.get("ca_days_left"))
        if days is not None and ca_days is not None:
            meta += f"TLS: certificate {days:.0f} d, CA {ca_days:.0f} d \u00b7 "
    meta += f"refreshed {esc(refreshed)}"
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
    reason = f": {esc(error)}" if error else ""
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
            f"<li><b>{esc(a.get('alert'))}</b> {esc(a.get('summary'))}</li>"
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
        reason = f": {esc(error)}" if error else ""
        out += (
            '<div class="banner" role="alert" id="webhook-failing"><b>Alert notifications '
            f"are not delivered</b> ({esc(hook.get('target'))}){reason}.</div>"
        )
    return out


def banner(snap: Snapshot, stale_after: float, now_local: float) -> str:
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
    reason = f" ({esc(snap.last_error)})" if snap.last_error else ""
    return (
        '<div class="banner" role="alert" id="master-unreachable"><b>Master unreachable since '
        f"{esc(humanize.clock(since))}</b> ({esc(humanize.ago(since, now_local))}){reason}: "
        "showing the last known state.</div>"
    )


def bounded_list(value: Any) -> list[Any]:
    """A list field as a bounded list (anything else is no items)."""
    return list(value[: displayable.MAX_TREE_ITEMS]) if isinstance(value, list) else []


def footer(snap: Snapshot) -> str:
    counters = snap.master.get("counters")
    parts = [f"rpicluster {esc(rpicluster.__version__)}"]
    if isinstance(counters, Mapping):
        for key, value in sorted(counters.items()):
            n = number(value)
            if n is not None:
                parts.append(f"{esc(str(key).replace('_', ' '))}: {n:g}")
    return "<footer>" + " \u00b7 ".join(parts) + "</footer>"


def render_not_found(what: str) -> str:
    body = (
        '<header><h1><a href="/">rpicluster</a></h1></header>'
        f'<main><div class="banner" role="alert"><b>Not found:</b> {esc(what)}</div>'
        '<p><a href="/">Back to the dashboard</a></p></main>'
    )
    return page("rpicluster: not found", body, 60)
