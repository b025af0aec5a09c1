"""The console scripts: ``rpicluster``, ``rpicluster-master``, ``rpicluster-slave``.

All three read ``--config`` (default ``/etc/rpicluster/rpicluster.cfg``) and stop
with exit code 2 and one line naming file, section and key when it is wrong.
Logs go to stderr in one short line each; journald adds the timestamps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import rpicluster

if TYPE_CHECKING:
    from rpicluster.config import Config

# rpicluster.config (and through it rpicluster.protocol) is imported only once a
# command runs, so run_slave() can first decide how lean the process may be.
DEFAULT_CONFIG_PATH = "/etc/rpicluster/rpicluster.cfg"  # = rpicluster.config's
LEAN_ROLES = frozenset(("basic", "vitals"))

logger = logging.getLogger("rpicluster")

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


def _version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {rpicluster.__version__}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"rpicluster.cfg to read (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="how much to log to stderr (default INFO)",
    )
    _version(parser)


def _setup_logging(level: str) -> None:
    """One line per record, whatever a node put in a logged value (see OneLineFormatter)."""
    from rpicluster.displayable import OneLineFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _load(path: str, need: str) -> Optional[Config]:
    """The validated config, or None after printing the one-line error."""
    from rpicluster.config import ConfigError, load_config

    try:
        return load_config(path, need=need)
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------- master


def run_master(args: argparse.Namespace) -> int:
    config = _load(args.config, "master")
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


# -------------------------------------------------------------------------- slave


def _lean_hashing(config_path: str) -> None:
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
    _lean_hashing(args.config)
    config = _load(args.config, "slave")
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


# ------------------------------------------------------------------------- status


def _number(value: Any, fmt: str) -> str:
    from rpicluster.displayable import number

    n = number(value)
    return "-" if n is None else format(n, fmt)


def _warnings(node: dict[str, Any]) -> str:
    """The WARNINGS cell: duplicate id/name flags (contract 1), then power and heat."""
    from rpicluster import pihealth

    found = []
    if node.get("duplicate_id") is True:
        found.append("DUPLICATE ID")
    if node.get("duplicate_name") is True:
        found.append("duplicate name")
    cert = cert_warning(node.get("tls"))
    if cert:
        found.append(cert)
    vitals = node.get("vitals")
    found += pihealth.warnings(vitals if isinstance(vitals, dict) else None)
    return ", ".join(found) or "-"


CERT_WARN_DAYS = 30  # a deploy renews certificates that expire within 30 days


def cert_warning(tls: Any, who: str = "cert") -> str:
    """ "cert expires in 12 d" / "CERT EXPIRED" when a certificate needs a deploy, else ''."""
    days = tls.get("days_left") if isinstance(tls, dict) else None
    if not isinstance(days, (int, float)) or isinstance(days, bool):
        return ""
    if days < 0:
        return f"{who.upper()} EXPIRED"
    return f"{who} expires in {days:.0f} d" if days < CERT_WARN_DAYS else ""


def _tls_summary(master: dict[str, Any]) -> str:
    """ "tls: cert 364 d, CA 3649 d" with TLS, "no tls" without, "" from an older master."""
    tls = master.get("tls")
    if not isinstance(tls, dict):
        return ""
    if tls.get("enabled") is not True:
        return "no tls"
    days, ca_days = tls.get("days_left"), tls.get("ca_days_left")
    if not isinstance(days, (int, float)) or not isinstance(ca_days, (int, float)):
        return "tls: certificates unreadable"
    return f"tls: cert {days:.0f} d, CA {ca_days:.0f} d"


def _store_summary(master: dict[str, Any]) -> str:
    """ "store ok" or "STORE FAILING: <error>" (contract 4); "" from an older master."""
    from rpicluster.displayable import text

    store = master.get("store")
    if not isinstance(store, dict):
        return ""
    if store.get("ok") is not False:  # only the master's explicit false is a failure
        return "store ok"
    return "STORE FAILING" + (f": {text(store.get('error'))}" if store.get("error") else "")


def _alerts_summary(master: dict[str, Any]) -> tuple[str, list[str]]:
    """ "N alert(s) firing" and "WEBHOOK FAILING: ..." for the first line, and one
    line per firing alert (the master's ``alerts`` object; absent from older masters)."""
    from rpicluster.displayable import text

    alerts = master.get("alerts")
    if not isinstance(alerts, dict):
        return "", []
    firing = [a for a in alerts.get("firing") or [] if isinstance(a, dict)]
    count = alerts.get("firing_count")
    count = count if isinstance(count, int) and not isinstance(count, bool) else len(firing)
    words = [f"{count} alert(s) firing"] if count else []
    hook = alerts.get("webhook")
    if isinstance(hook, dict) and hook.get("ok") is False:
        words.append("WEBHOOK FAILING" + (f": {text(hook['error'])}" if hook.get("error") else ""))
    lines = [
        f"ALERT {text(a.get('severity'), 16)} {text(a.get('alert'), 32)}: {text(a.get('summary'))}"
        for a in firing
    ]
    if count > len(firing):
        lines.append(f"... and {count - len(firing)} more alert(s)")
    return "; ".join(words), lines


def format_table(state: dict[str, Any], now: Optional[float] = None) -> str:
    """The cluster as a readable table, one row per node, named by its node name.

    Every cell goes through :func:`rpicluster.displayable.text`: whatever a node
    sent (an old database may hold newlines, terminal escapes, lone surrogates,
    huge numbers) prints as one inert line and never raises.
    """
    from rpicluster import humanize  # not needed by the master or the slaves
    from rpicluster.displayable import node_name, text

    now = time.time() if now is None else now
    header = ("NAME", "NODE", "ROLES", "STATE", "LAST SEEN", "CPU %", "TEMP C", "WARNINGS")
    rows = [header]
    nodes = [n for n in state.get("nodes") or [] if isinstance(n, dict)]
    for node in sorted(nodes, key=lambda n: (node_name(n), str(n.get("node_id")))):
        vitals = node.get("vitals") if isinstance(node.get("vitals"), dict) else {}
        state_word = text(node.get("state", "?"), 16)
        if node.get("connected") is False and state_word in ("alive", "suspect"):
            state_word += " (offline)"
        roles = node.get("roles") if isinstance(node.get("roles"), list) else []
        rows.append(
            (
                text(node_name(node), 64),
                text(node.get("node_id", "?"))[:8],  # tells apart nodes sharing a name
                text(",".join(sorted(text(r, 32) for r in roles[:16])), 64) or "-",
                state_word,
                humanize.ago(node.get("last_seen"), now),
                _number(vitals.get("cpu_percent"), ".1f"),
                _number(vitals.get("temperature"), ".1f"),
                _warnings(node),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    master = state.get("master") if isinstance(state.get("master"), dict) else {}
    summary = f"master {text(master.get('hostname', '?'), 64)}: {len(rows) - 1} node(s)"
    counts: dict[str, int] = {}
    for node in nodes:
        word = text(node.get("state"), 16)
        counts[word] = counts.get(word, 0) + 1
    if counts:
        summary += " (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
    tls = _tls_summary(master)
    if tls:
        summary += f"; {tls}"
    store = _store_summary(master)
    if store:
        summary += f"; {store}"
    alerts, alert_lines = _alerts_summary(master)
    if alerts:
        summary += f"; {alerts}"
    return "\n".join([summary, *lines, *alert_lines])


def run_status(args: argparse.Namespace) -> int:
    config = _load(args.config, "any")
    if config is None:
        return EXIT_CONFIG
    from rpicluster.client import ClientError, MasterClient
    from rpicluster.config import ConfigError

    try:
        host, port = config.master_address()
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with MasterClient(
            host, port, config.cluster.secret, timeout=args.timeout, tls=config.tls
        ) as client:
            state = client.cluster_state()
    except ClientError as exc:
        print(f"rpicluster status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    # A terminal that cannot show a character gets an escape, never a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(format_table(state))
    return EXIT_OK


# ------------------------------------------------------------------------- forget


def run_forget(args: argparse.Namespace) -> int:
    """Remove a node and its history from the master (docs/protocol.md 8.5)."""
    config = _load(args.config, "any")
    if config is None:
        return EXIT_CONFIG
    from rpicluster import protocol
    from rpicluster.client import ClientError, MasterClient, QueryFailed
    from rpicluster.config import ConfigError
    from rpicluster.displayable import text

    try:
        host, port = config.master_address()
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with MasterClient(
            host, port, config.cluster.secret, timeout=args.timeout, tls=config.tls
        ) as client:
            data = client.forget(args.node, force=args.force)
    except QueryFailed as exc:
        print(f"rpicluster forget: {exc}", file=sys.stderr)
        codes = {
            protocol.E_NOT_FOUND: EXIT_NOT_KNOWN,
            protocol.E_CONNECTED: EXIT_CONNECTED,
        }
        return codes.get(exc.code, EXIT_CONFIG)
    except ClientError as exc:
        print(f"rpicluster forget: {exc}", file=sys.stderr)
        return EXIT_NO_MASTER
    closed = data.get("connections_closed")
    extra = f"; {closed} connection(s) closed" if isinstance(closed, int) and closed else ""
    print(
        f"forgot node {text(data.get('name'), 64)} ({text(data.get('node_id'), 128)}),"
        f" was {text(data.get('state'), 16)}{extra}"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- wait


def run_wait(args: argparse.Namespace) -> int:
    """Wait until every node of ``--nodes`` is in ``--state`` (rpicluster/waiting.py)."""
    config = _load(args.config, "any")
    if config is None:
        return EXIT_CONFIG
    from rpicluster.waiting import run

    return run(args, config)


def _node_list(value: str) -> list[str]:
    from rpicluster.waiting import node_list  # not imported by the slave's commands

    return node_list(value)


def _seconds(value: str) -> float:
    from rpicluster.waiting import seconds

    return seconds(value)


# --------------------------------------------------------------------- check-role


def run_check_role(args: argparse.Namespace) -> int:
    """Import each custom slave role as a slave would; one line each, exit 1 if any fails."""
    from rpicluster import rolecheck

    status, lines = rolecheck.run(args.roles, args.path)
    for line in lines:
        print(line)
    return status


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpicluster", description="A Raspberry Pi cluster: one master, many slaves."
    )
    _version(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    status = commands.add_parser("status", help="show every node the master knows")
    _common(status)
    status.add_argument("--json", action="store_true", help="print one JSON document")
    status.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the master (default 5)"
    )
    status.set_defaults(run=run_status)
    forget = commands.add_parser(
        "forget",
        help="remove a retired node and its history from the master",
        description="Remove a node and its history from the master. Exit status: 0 forgotten,"
        " 1 no such node, 2 usage or config error (or a name shared by several nodes),"
        " 3 refused: the node is connected (stop its slave, or --force), 4 master unreachable.",
    )
    _common(forget)
    forget.add_argument("node", metavar="NODE", help="the node's name or node id")
    forget.add_argument(
        "--force",
        action="store_true",
        help="forget a connected node too (its connections are closed; a running slave rejoins)",
    )
    forget.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the master (default 5)"
    )
    forget.set_defaults(run=run_forget)
    wait = commands.add_parser(
        "wait",
        help="wait until named nodes are alive (or left, or gone)",
        description="Poll the master until every node of --nodes (names or node ids) is in"
        " --state. Exit status: 0 all reached it, 1 timeout (one line per missing node with"
        " its state), 2 usage or config error.",
    )
    _common(wait)
    wait.add_argument(
        "--nodes",
        required=True,
        type=_node_list,
        metavar="N1,N2",
        help="comma-separated node names ([slave] node_name) or node ids",
    )
    wait.add_argument(
        "--state",
        default="alive",
        choices=("alive", "left", "gone"),
        help="alive (connected), left (said goodbye), gone (dead, left or unknown); default alive",
    )
    wait.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        help="seconds to wait in all (default 60)",
    )
    wait.add_argument("--query-timeout", type=_seconds, default=5.0, help=argparse.SUPPRESS)
    wait.set_defaults(run=run_wait)
    master = commands.add_parser("master", help="run the master (as rpicluster-master)")
    _common(master)
    master.set_defaults(run=run_master)
    slave = commands.add_parser("slave", help="run this Pi's slave roles (as rpicluster-slave)")
    _common(slave)
    slave.set_defaults(run=run_slave)
    check = commands.add_parser(
        "check-role",
        help="import custom slave roles as a slave would and check their classes",
        description="Exit 0 when every role is a subclass of RpiBasicSlaveThread, 1 when one"
        " is not (each problem names the file and the line), 2 on a malformed ROLE.",
    )
    check.add_argument(
        "roles",
        nargs="+",
        metavar="ROLE",
        help="FILE.py:ClassName (a role file) or module:ClassName (found on --path)",
    )
    check.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="DIR_OR_WHEEL",
        help="searched first for module:ClassName roles (repeatable)",
    )
    check.add_argument(
        "--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS, help=argparse.SUPPRESS
    )
    check.set_defaults(run=run_check_role)
    return parser


def _single(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _common(parser)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `rpicluster status --json | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``rpicluster``: ``status``, ``forget``, ``wait``, ``master``, ``slave``, ``check-role``."""
    args = _parser().parse_args(argv)
    return _dispatch(args)


def master_main(argv: Optional[Sequence[str]] = None) -> int:
    """``rpicluster-master``: run the master until SIGTERM or SIGINT."""
    args = _single("rpicluster-master", "Run the rpicluster master.").parse_args(argv)
    args.run = run_master
    return _dispatch(args)


def slave_main(argv: Optional[Sequence[str]] = None) -> int:
    """``rpicluster-slave``: run this Pi's slave roles until SIGTERM or SIGINT."""
    args = _single("rpicluster-slave", "Run this Pi's rpicluster slave roles.").parse_args(argv)
    args.run = run_slave
    return _dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
