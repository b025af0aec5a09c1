"""``rpicluster-master`` and ``rpicluster-slave``: the long-running processes.

Split from ``cli.py`` because running is not asking: the master runs until a
signal; the slave process first decides how lean it may be (a Pi that runs only
the built-in lean roles never maps OpenSSL's libcrypto), builds one thread per
role from the config, starts them, and on SIGTERM or SIGINT stops them all
with a goodbye so the master records ``left``, not ``dead``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from typing import Any

import rpicluster
from rpicluster.command import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE, load

LEAN_ROLES = frozenset(("basic", "vitals"))

# The processes' one logger (as before the split): their lines name it.
logger = logging.getLogger("rpicluster")


def run_master(args: argparse.Namespace) -> int:
    """Run the master until SIGTERM or SIGINT; exit 2 on a config error, 1 if it cannot start."""
    config = load(args.config, "master")
    if config is None:
        return EXIT_CONFIG
    import sqlite3  # here, not at the top: rpicluster-slave never needs it

    from rpicluster.config import ConfigError
    from rpicluster.master import Master

    try:
        Master(config).run_forever()
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, sqlite3.Error) as exc:  # the port is taken, state_dir not writable...
        print(f"rpicluster-master: cannot start: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def lean_hashing(config_path: str) -> None:
    """Keep OpenSSL's libcrypto out of a slave that runs only built-in lean roles.

    The slave's one use of a hash is a single HMAC-SHA256 per connection;
    ``hashlib`` and ``hmac`` fall back to Python's built-in SHA-256 when
    ``_hashlib`` is unavailable, and not mapping libcrypto saves about 3.5 MB of
    RSS (issue 2's budget is 20 MB). A custom or webserver role may need all of
    OpenSSL's algorithms, so then nothing changes.
    """
    import configparser

    if "_hashlib" in sys.modules:
        return
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(config_path, encoding="utf-8")
        roles = parser.get("slave", "roles", fallback="basic, vitals")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return  # load_config() reports the problem properly
    names = {part.strip() for part in roles.split(",") if part.strip()}
    if names and names <= LEAN_ROLES:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]


def run_slave(args: argparse.Namespace) -> int:
    """One thread per role; SIGTERM or SIGINT stops them all with a goodbye, exit 0."""
    lean_hashing(args.config)
    config = load(args.config, "slave")
    if config is None:
        return EXIT_CONFIG
    assert config.slave is not None
    from rpicluster.config import ConfigError
    from rpicluster.roles import resolve

    try:
        threads = [resolve(role, config.path).from_config(config) for role in config.slave.roles]
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (TypeError, ValueError) as exc:  # a custom role's constructor refused the config
        print(f"rpicluster: config error: {config.path}: [slave] roles: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    done = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("received %s; stopping %d role(s)", signal.Signals(signum).name, len(threads))
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info(
        "rpicluster-slave %s: node %s, roles %s, master %s:%d",
        rpicluster.__version__,
        threads[0].node_id,
        ", ".join(config.slave.roles),
        config.slave.master_ip,
        config.slave.socket_port,
    )
    for thread in threads:
        thread.start()
    while not done.is_set():
        done.wait(60.0)
        if not any(thread.is_alive() for thread in threads):
            logger.error("every role thread has ended; exiting")
            return EXIT_UNREACHABLE
    for thread in threads:
        thread.stop()
    deadline = time.monotonic() + 5.0
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.role_name() for thread in threads if thread.is_alive()]
    if stuck:
        logger.warning("role(s) %s still inside perform_action(); exiting anyway", ", ".join(stuck))
    return EXIT_OK
