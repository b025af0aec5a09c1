"""Bytes per second from the kernel's ever-growing counters (network, disks).

The kernel counts bytes since boot; what a person wants to see is how busy a
Pi's network and SD card are now. A rate is the difference between two
readings over the time between them, so the first reading has none (None).

Counters are kept per name (an interface, or one total): one that goes back
(a reset, an interface re-created, or a 32-bit counter that wrapped without
psutil noticing) counts its new value as the increase, the way Prometheus'
``rate()`` treats a reset; a name that appears or vanishes between two readings
is left out of that interval instead of making the rate jump.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import psutil

log = logging.getLogger(__name__)

Counters = dict[str, tuple[int, ...]]


class CounterRates:
    """Per-second rates of ``width`` counters summed over names, between two readings."""

    def __init__(
        self,
        read_counters: Callable[[], Optional[Counters]],
        width: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read_counters = read_counters
        self.width = width
        self.clock = clock
        self._previous: Optional[tuple[float, Counters]] = None

    def rates(self) -> tuple[Optional[float], ...]:
        """One rate per counter (rounded to 0.1/s), all None on the first reading.

        Also all None when the counters cannot be read (the next reading then
        starts afresh) or when the clock did not move.
        """
        now = self.clock()
        try:
            counters = self.read_counters()
        except (OSError, ValueError, RuntimeError, NotImplementedError) as error:
            log.debug("counters unreadable: %s", error)
            counters = None
        previous, self._previous = self._previous, None
        nothing: tuple[Optional[float], ...] = (None,) * self.width
        if counters is None:
            return nothing
        self._previous = (now, counters)
        if previous is None:
            return nothing
        then, before = previous
        elapsed = now - then
        if elapsed <= 0:
            return nothing
        totals = [0] * self.width
        for name, values in counters.items():
            old = before.get(name)
            if old is None or len(old) != self.width or len(values) != self.width:
                continue
            for i, (new_value, old_value) in enumerate(zip(values, old)):
                totals[i] += new_value - old_value if new_value >= old_value else new_value
        return tuple(round(total / elapsed, 1) for total in totals)


def network_counters() -> Optional[Counters]:
    """``{interface: (bytes received, bytes sent)}`` without loopback (/proc/net/dev).

    Loopback traffic never leaves the Pi; counting it would show a busy network
    on an idle one (a webserver role talks to its local slave over it).
    """
    per_nic = psutil.net_io_counters(pernic=True)
    return {
        name: (counts.bytes_recv, counts.bytes_sent)
        for name, counts in per_nic.items()
        if name != "lo"
    }


def disk_counters() -> Optional[Counters]:
    """``{"disks": (bytes read, bytes written)}`` over whole disks (/proc/diskstats).

    psutil sums whole disks only (``mmcblk0``, not its partitions too), so
    nothing is counted twice; None where the kernel offers no disk statistics.
    """
    total = psutil.disk_io_counters(perdisk=False)
    if total is None:
        return None
    return {"disks": (total.read_bytes, total.write_bytes)}
