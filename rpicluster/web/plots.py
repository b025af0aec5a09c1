"""The dashboard's plots: which vitals are drawn, over what span, and each node's SVGs.

Split from ``dashboard.py`` because choosing what to plot is apart from the
page around it: the three small plots of a cluster row and the five large ones
of a node page (colours, y ranges fixed or fitted, formatters), a span that
shrinks while the cluster is young so a minute of history is not a dot, and a
time axis ending on a bucket boundary so each plot is cached and drawn once per
new bucket. :mod:`rpicluster.web.svg` draws them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from typing import Any, Callable, Optional

from rpicluster import humanize
from rpicluster.web.state import Snapshot, ram_total
from rpicluster.web.svg import auto_range, plot
from rpicluster.web.svg import bucket_count as svg_bucket_count

COLORS = {
    "cpu": "#0969da",
    "temp": "#bc4c00",
    "ram": "#8250df",
    "load": "#1a7f37",
    "disk": "#57606a",
}


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
    """The span as people read it: minutes from 90 s on, else seconds."""
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
