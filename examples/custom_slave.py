"""A custom slave role in a few lines: report how many processes run on the Pi.

Deployed as a file: put it in slave_roles/ beside the inventory and add
``custom_slave:ProcessCountSlave`` to a group's ``rpicluster_slave_roles``
(README, "Writing your own slave"). By hand: ``roles = basic,
custom_slave:ProcessCountSlave`` in ``[slave]`` and this directory on PYTHONPATH.
Its own settings come from the ``[processes]`` section (``interval``, seconds).
"""

import psutil

from rpicluster.slave import RpiBasicSlaveThread


class ProcessCountSlave(RpiBasicSlaveThread):
    role = "processes"

    def perform_action(self):
        settings = self.config.section("processes") if self.config else {}
        self.send("vitals", vitals={"processes": len(psutil.pids())})
        self.wait(float(settings.get("interval", 5)))
