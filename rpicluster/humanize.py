"""Numbers as people read them, on the dashboard and in ``rpicluster status``: "12 s ago",
"1.2 GiB", "3 d 4 h".

Every function takes whatever a node sent (or an old database held) and returns
text, never raises: a non-number, NaN, Infinity or a 400-digit integer is a dash.
"""

from __future__ import annotations

import time
from typing import Optional

from rpicluster.displayable import number

DASH = "\u2013"  # shown where a value is unknown


def _is_number(value: object) -> bool:
    """A finite real number that converts to float (bools are not numbers here)."""
    return number(value) is not None


def duration(seconds: Optional[float]) -> str:
    """A duration in its two largest units: "42 s", "5 min 3 s", "3 h 12 min", "4 d 2 h"."""
    if not _is_number(seconds):
        return DASH
    total = max(0, int(number(seconds)))  # type: ignore[arg-type]
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
    delta = now - number(when)  # type: ignore[operator]
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
    value = number(nbytes)
    assert value is not None
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    if abs(value) < 1000:
        return f"{value:.3g} {unit}"
    return f"{value:.0f} {unit}" if abs(value) < 1e6 else f"{value:.3g} {unit}"


def rate(bytes_per_second: Optional[float]) -> str:
    """A byte rate: "512 B/s", "1.23 MiB/s"."""
    return DASH if not _is_number(bytes_per_second) else size(bytes_per_second) + "/s"


def frequency(mhz: Optional[float]) -> str:
    """A CPU frequency given in MHz: "1500 MHz", "1.8 GHz"."""
    value = number(mhz)
    if value is None:
        return DASH
    return f"{value:.0f} MHz" if abs(value) < 1000 else f"{value / 1000:.3g} GHz"


def percent(value: Optional[float]) -> str:
    n = number(value)
    return DASH if n is None else f"{n:.0f} %"


def temperature(value: Optional[float]) -> str:
    n = number(value)
    return DASH if n is None else f"{n:.1f} \u00b0C"


def load(values: tuple[Optional[float], ...]) -> str:
    """Load averages as "0.52 0.41 0.30" (unknown ones as a dash)."""
    if not any(_is_number(v) for v in values):
        return DASH
    return " ".join(f"{number(v):.2f}" if _is_number(v) else DASH for v in values)


def clock(when: Optional[float]) -> str:
    """An epoch as a UTC time of day ("23:41:02 UTC"), with the date if not today."""
    if not _is_number(when):
        return DASH
    try:
        stamp = time.gmtime(number(when))  # type: ignore[arg-type]
    except (OverflowError, OSError, ValueError):  # far outside the platform's time_t
        return DASH
    if time.strftime("%Y-%m-%d", stamp) != time.strftime("%Y-%m-%d", time.gmtime()):
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", stamp)
    return time.strftime("%H:%M:%S UTC", stamp)
