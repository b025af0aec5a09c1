"""A custom slave role in ten lines: report how many processes run on the Pi.

Run it with ``roles = basic, custom_slave:ProcessCountSlave`` in ``[slave]`` and
this directory on PYTHONPATH (or install the module next to rpicluster).
"""

import psutil

from rpicluster.slave import RpiBasicSlaveThread


class ProcessCountSlave(RpiBasicSlaveThread):
    role = "processes"

    def perform_action(self):
        self.send("vitals", vitals={"processes": len(psutil.pids())})
        self.wait(5)
