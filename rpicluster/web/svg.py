"""Server-side SVG line plots: no JavaScript, no library, no internet on the page.

A plot averages the points into one bucket per couple of pixels, so a day of
readings costs the page no more than a minute of them, and breaks the line where
readings are missing (a dead node shows as a gap, not as a straight line).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from html import escape
from typing import Callable, Optional, Union

Formatter = Callable[[float], str]
YRange = Union[tuple[float, float], Callable[[list[float]], tuple[float, float]]]


def _median_step(ts: Sequence[float]) -> float:
    """The usual time between two readings (from the latest 64, enough and cheap)."""
    tail = ts[-65:]
    steps = sorted(b - a for a, b in zip(tail, tail[1:]) if b > a)
    return steps[len(steps) // 2] if steps else 0.0


def _c(value: float) -> str:
    """A coordinate with at most one decimal and no trailing zeros ("25", "25.3")."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


_X_COORDINATES: dict[tuple[int, int, int], list[str]] = {}


def _x_coordinates(left: int, inner_w: int, count: int) -> list[str]:
    """The x of each bucket's centre, as text; the same for every plot of a size."""
    key = (left, inner_w, count)
    xs = _X_COORDINATES.get(key)
    if xs is None:
        xs = _X_COORDINATES[key] = [_c(left + (i + 0.5) * inner_w / count) for i in range(count)]
    return xs


def bucket_count(width: int, axes: bool) -> int:
    """How many time buckets a plot of ``width`` pixels draws (one per 2 or 3 pixels)."""
    left, right = (44, 8) if axes else (1, 1)
    return max(max(width - left - right, 1) // (3 if axes else 2), 1)


def buckets(
    ts: Sequence[float], values: Sequence[float], start: float, end: float, count: int
) -> list[Optional[float]]:
    """Mean of the finite values in each of ``count`` equal time buckets (None when empty).

    ``ts`` must be ascending (a History is): each bucket is found by bisection and
    summed in C, so a plot costs about ``count`` steps however many points it covers.
    """
    if end <= start or count <= 0:
        return [None] * max(count, 0)
    width = (end - start) / count
    out: list[Optional[float]] = []
    lo = bisect.bisect_left(ts, start)
    for i in range(count):
        hi = (
            bisect.bisect_left(ts, start + (i + 1) * width, lo)
            if i < count - 1
            else (bisect.bisect_right(ts, end, lo))
        )
        if hi <= lo:
            out.append(None)
            continue
        chunk = values[lo:hi]
        total = sum(chunk)
        if math.isfinite(total):
            out.append(total / (hi - lo))
        else:  # some readings unknown (NaN): average the known ones
            known = [v for v in chunk if math.isfinite(v)]
            out.append(sum(known) / len(known) if known else None)
        lo = hi
    return out


def segments(means: Sequence[Optional[float]], max_gap: int) -> list[list[tuple[int, float]]]:
    """Runs of (bucket index, value), split where more than ``max_gap`` buckets are empty."""
    runs: list[list[tuple[int, float]]] = []
    previous = None
    for i, value in enumerate(means):
        if value is None:
            continue
        if previous is None or i - previous > max_gap:
            runs.append([])
        runs[-1].append((i, value))
        previous = i
    return runs


def auto_range(values: Sequence[float], step: float = 10.0) -> tuple[float, float]:
    """A y range on multiples of ``step`` around the finite values (for temperatures)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, step
    lo = math.floor(min(finite) / step) * step
    hi = math.ceil(max(finite) / step) * step
    if hi - lo < step:
        hi = lo + step
    return lo, hi


def plot(
    ts: Sequence[float],
    values: Sequence[float],
    *,
    start: float,
    end: float,
    y_range: YRange,
    title: str,
    color: str,
    fmt: Formatter,
    width: int = 120,
    height: int = 34,
    axes: bool = False,
    css_class: str = "plot",
    transform: Optional[Callable[[float], float]] = None,
) -> str:
    """One SVG line plot of ``values`` at epochs ``ts`` over [start, end].

    Small plots (``axes=False``) are sparklines for the table; large ones get y
    labels and a time axis. ``title`` becomes the SVG's accessible name and tooltip.
    ``y_range`` is fixed (lo, hi) or a function of the plotted bucket means;
    ``transform`` maps each bucket mean (e.g. RAM available to % used), which is
    exact for linear maps and far cheaper than mapping every reading.
    """
    left, bottom, top, right = (44, 18, 8, 8) if axes else (1, 1, 2, 1)
    inner_w = max(width - left - right, 1)
    inner_h = max(height - top - bottom, 1)
    count = bucket_count(width, axes)
    means = buckets(ts, values, start, end, count)
    if transform is not None:
        means = [None if m is None else transform(m) for m in means]
    finite = [v for v in means if v is not None]
    bucket_seconds = (end - start) / count if end > start else 1.0
    max_gap = max(2, math.ceil(3 * _median_step(ts) / bucket_seconds)) if bucket_seconds else 2
    runs = segments(means, max_gap)
    lo, hi = y_range(finite) if callable(y_range) else y_range
    span = (hi - lo) or 1.0
    xs = _x_coordinates(left, inner_w, count)
    scale = inner_h / span
    bottom_y = top + inner_h

    def y(value: float) -> str:
        return _c(bottom_y - (min(max(value, lo), hi) - lo) * scale)

    summary = f"{title}: no data"
    if finite:
        summary = f"{title}: last {fmt(finite[-1])}, min {fmt(min(finite))}, max {fmt(max(finite))}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{width}"'
        f' height="{height}" viewBox="0 0 {width} {height}" role="img"'
        f' aria-label="{escape(summary)}"><title>{escape(summary)}</title>',
        f'<rect class="frame" x="{left}" y="{top}" width="{inner_w}" height="{inner_h}"/>',
    ]
    if axes:
        for frac in (0.0, 0.5, 1.0):
            gy = top + inner_h - frac * inner_h
            parts.append(
                f'<line class="grid" x1="{left}" y1="{gy:.1f}" x2="{left + inner_w}"'
                f' y2="{gy:.1f}"/>'
                f'<text class="label" x="{left - 4}" y="{gy + 3.5:.1f}" text-anchor="end">'
                f"{escape(fmt(lo + frac * span))}</text>"
            )
        minutes = (end - start) / 60
        for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
            ago = minutes * (1 - frac)
            text = (
                "now"
                if frac == 1.0
                else f"\u2212{ago:.0f} min"
                if ago >= 1
                else f"\u2212{ago * 60:.0f} s"
            )
            parts.append(
                f'<text class="label" x="{left + frac * inner_w:.1f}" y="{height - 4}"'
                f' text-anchor="{anchor}">{text}</text>'
            )
    base = top + inner_h
    for run in runs:
        if len(run) == 1:
            i, v = run[0]
            parts.append(f'<circle cx="{xs[i]}" cy="{y(v)}" r="1.6" fill="{color}"/>')
            continue
        line = " ".join([f"{xs[i]},{y(v)}" for i, v in run])
        area = f"{xs[run[0][0]]},{base} {line} {xs[run[-1][0]]},{base}"
        parts.append(
            f'<polygon points="{area}" fill="{color}" fill-opacity="0.15"/>'
            f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.5"'
            ' stroke-linejoin="round"/>'
        )
    if not runs:
        parts.append(
            f'<text class="nodata" x="{left + inner_w / 2:.1f}" y="{top + inner_h / 2 + 4:.1f}"'
            ' text-anchor="middle">no data</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
