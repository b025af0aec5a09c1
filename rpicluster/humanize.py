"""Numbers as people read them, on the dashboard and in ``rpicluster status``: "12 s ago",
"1.2 GiB", "3 d 4 h"."""

from __future__ import annotations

import math
import time
from typing import Optional

DASH = "\u2013"  # shown where a value is unknown


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not (isinstance(value, float) and math.isnan(value))
    )


def duration(seconds: Optional[float]) -> str:
    """A duration in its two largest units: "42 s", "5 min 3 s", "3 h 12 min", "4 d 2 h"."""
    if not _is_number(seconds):
        return DASH
    total = max(0, int(seconds))  # type: ignore[arg-type]
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def ago(when: Optional[float], now: float) -> str:
    """How long ago epoch ``when`` was, from ``now``: "12 s ago", "3 min ago"."""
    if not _is_number(when):
        return "never"
    delta = now - when  # type: ignore[operator]
    if delta < 1:
        return "just now"
    total = int(delta)
    if total < 120:
        return f"{total} s ago"
    if total < 7200:
        return f"{total // 60} min ago"
    if total < 172800:
        return f"{total // 3600} h ago"
    return f"{total // 86400} d ago"


def size(nbytes: Optional[float]) -> str:
    """Bytes in binary units with three significant digits: "512 MiB", "1.23 GiB"."""
    if not _is_number(nbytes):
        return DASH
    value = float(nbytes)  # type: ignore[arg-type]
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"


def percent(value: Optional[float]) -> str:
    return f"{value:.0f} %" if _is_number(value) else DASH


def temperature(value: Optional[float]) -> str:
    return f"{value:.1f} \u00b0C" if _is_number(value) else DASH


def load(values: tuple[Optional[float], ...]) -> str:
    """Load averages as "0.52 0.41 0.30" (unknown ones as a dash)."""
    if not any(_is_number(v) for v in values):
        return DASH
    return " ".join(f"{v:.2f}" if _is_number(v) else DASH for v in values)


def clock(when: Optional[float]) -> str:
    """An epoch as a UTC time of day ("23:41:02 UTC"), with the date if not today."""
    if not _is_number(when):
        return DASH
    stamp = time.gmtime(when)  # type: ignore[arg-type]
    if time.strftime("%Y-%m-%d", stamp) != time.strftime("%Y-%m-%d", time.gmtime()):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", stamp)
    return time.strftime("%H:%M:%S UTC", stamp)
