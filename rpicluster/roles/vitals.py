"""The ``vitals`` role: report the node's vitals every ``[slave] vitals_interval``."""

from __future__ import annotations

from typing import Any, Optional

from rpicluster import protocol
from rpicluster.slave import RpiBasicSlaveThread
from rpicluster.vitals import VitalsReader

DEFAULT_VITALS_INTERVAL = 5.0


class VitalsSlaveThread(RpiBasicSlaveThread):
    """Sends one ``vitals`` message per interval: CPU, load, memory, disk, temperature,
    the Pi's throttling word and under-voltage alarm, network and disk rates.

    One reader for the thread's life: it finds the sensor files once, and the
    rates are differences to its previous reading.
    """

    role = "vitals"

    def __init__(self, *args: Any, vitals_interval: Optional[float] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if vitals_interval is None:
            slave = self.config.slave if self.config is not None else None
            vitals_interval = slave.vitals_interval if slave else DEFAULT_VITALS_INTERVAL
        if vitals_interval <= 0:
            raise ValueError(f"vitals_interval must be positive, got {vitals_interval}")
        self.vitals_interval = float(vitals_interval)
        self.reader = VitalsReader()

    def perform_action(self) -> None:
        self.send(protocol.VITALS, vitals=self.reader.read())
        self.wait(self.vitals_interval)
