"""What every ``rpicluster`` command shares: exit codes, log lines, the config or one error.

Split from ``cli.py`` so the command modules (``runner``, ``status``,
``forgetting``, ``waiting``) and the argument wiring all read the same exit
codes and load the config the same way, without importing one another: a wrong
setting stops any command with exit code 2 and one line naming file, section
and key; logs go to stderr in one short line each (journald adds the
timestamps). Small on purpose: ``rpicluster-slave`` imports it.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from rpicluster.client import MasterClient
    from rpicluster.config import Config

# rpicluster.config (and through it rpicluster.protocol) is imported only once a
# command runs, so run_slave() can first decide how lean the process may be.
DEFAULT_CONFIG_PATH = "/etc/rpicluster/rpicluster.cfg"  # = rpicluster.config's

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
# `rpicluster forget` (contract with playbooks/remove.yml): 0 forgotten, 1 not
# known (already forgotten: nothing to do), 2 usage/config error or an ambiguous
# name, 3 refused because the node is connected, 4 the master could not be asked.
EXIT_NOT_KNOWN = 1
EXIT_CONNECTED = 3
EXIT_NO_MASTER = 4
LOG_FORMAT = "%(levelname)s %(threadName)s %(name)s: %(message)s"
# The role's argument spec and preflight accept exactly these (tests/test_log_levels.py):
# a level the role lets through but the CLI refused would exit 2, and the unit's
# RestartPreventExitStatus=2 would leave the service down for good.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def setup_logging(level: str) -> None:
    """One line per record, whatever a node put in a logged value (see OneLineFormatter)."""
    from rpicluster.displayable import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def load(path: str, need: str) -> Optional[Config]:
    """The validated config, or None after printing the one-line error."""
    from rpicluster.config import ConfigError, load_config

    try:
        return load_config(path, need=need)
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return None


def master_client(path: str, timeout: float) -> Optional[MasterClient]:
    """A client for the master that the config at ``path`` names, or None after the error.

    The commands that ask the master something (``status``, ``forget``) share it
    so a config that cannot name the master stops each the same way, exit 2.
    ``load(..., "any")`` has checked that the file has a ``[master]`` or a
    ``[slave]`` section, so the master's address is known.
    """
    config = load(path, "any")
    if config is None:
        return None
    from rpicluster.client import MasterClient

    return MasterClient.from_config(config, timeout=timeout)
