"""The node page (``/nodes/<id>``): one node's facts, large plots, vitals, details, errors.

Split from ``dashboard.py`` because one node's page has its own job: every fact
bounded (:data:`FACT_LIMIT` characters, nested values as short JSON), values in
human units where the key says what they are, the Pi's power and heat
conditions (now, since boot) and its I/O rates, and the role errors it
reported. Every node-derived value goes through :func:`rpicluster.web.page.esc`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Callable, Optional

from rpicluster import displayable, humanize, pihealth
from rpicluster.web.page import (
    banner,
    bounded_list,
    esc,
    footer,
    header,
    health_badges,
    page,
    refresh_seconds,
    state_badge,
)
from rpicluster.web.plots import DETAIL_PLOTS, node_plots, plot_span
from rpicluster.web.state import Snapshot, number, vital

FACT_LIMIT = 1024  # characters of one fact shown on the node page


def _fact(name: Any, value: Any) -> str:
    name = displayable.text(name).replace("_", " ")
    if isinstance(value, bool):
        value = "yes" if value else "no"
    elif isinstance(value, (dict, list)):
        value = json.dumps(displayable.tree(value, 4), sort_keys=True)
    elif value is None:
        value = humanize.DASH
    return f"<div><dt>{esc(name)}</dt><dd>{esc(value, FACT_LIMIT)}</dd></div>"


def _section(title: str, facts_html: str) -> str:
    return f'<h2>{esc(title)}</h2><div class="card"><dl class="facts">{facts_html}</dl></div>'


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
        _fact(
            "roles", ", ".join(displayable.text(r) for r in bounded_list(node.get("roles"))) or None
        ),
        _fact(
            "groups",
            ", ".join(displayable.text(g) for g in bounded_list(node.get("groups"))) or None,
        ),
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
        f'<figure data-plot="{key}"><figcaption>{esc(caption)}</figcaption>{svg}</figure>'
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
    title_html = f'<a href="/">rpicluster</a> / {esc(name)} {state_badge(node.get("state"))}' + (
        f' <span class="badges" id="health">{badges}</span>' if badges else ""
    )
    body = (
        header(snap, now_local, title_html)
        + "<main>"
        + banner(snap, stale_after, now_local)
        + f'<div class="card"><dl class="facts">{"".join(facts)}</dl></div>'
        + f'<h2>Vitals history</h2><div class="plots">{figures}</div>'
        + _section("Power, heat and I/O", _pi_health(vitals))
        + _section("Latest vitals", vitals_html or _fact("vitals", None))
        + _section("Details", details_html or _fact("details", None))
        + errors_html
        + "</main>"
        + footer(snap)
    )
    return page(f"rpicluster: {name}", body, refresh_seconds(refresh_interval), snap.version)


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
