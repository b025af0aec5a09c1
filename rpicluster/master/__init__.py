"""The rpicluster master: accepts many slaves and knows which are alive.

``Master(config).start()`` listens in a background thread; ``cluster_state()``
returns the registry as the ``cluster`` query does; ``stop()`` says goodbye to
every peer and flushes the SQLite store; ``run_forever()`` serves
``rpicluster-master`` until SIGTERM or SIGINT.
"""

from rpicluster.master.server import Master

__all__ = ["Master"]
