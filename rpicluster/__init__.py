"""rpicluster: one master Pi, many slave Pis.

A slave is a :class:`threading.Thread` subclass of :class:`RpiBasicSlaveThread`
that overrides ``perform_action()``; the master keeps a registry of every node.
"""

__version__ = "0.1.0"
