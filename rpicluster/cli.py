"""The console scripts: ``rpicluster``, ``rpicluster-master``, ``rpicluster-slave``.

All three read ``--config`` (default ``/etc/rpicluster/rpicluster.cfg``) and stop
with exit code 2 and one line naming file, section and key when it is wrong.
Logs go to stderr in one short line each; journald adds the timestamps.

This module is the argument wiring and the entry points; each command lives in
its own module: ``runner`` (master, slave), ``status``, ``forgetting``
(forget), ``waiting`` (wait), ``rolecheck`` (check-role), with what they share
in ``command``. Only what a command needs is imported when it runs, so
``rpicluster-slave`` stays lean.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

import rpicluster
from rpicluster.command import (
    DEFAULT_CONFIG_PATH,
    EXIT_CONFIG,
    EXIT_OK,
    LOG_LEVELS,
    load,
    setup_logging,
)
from rpicluster.runner import run_master, run_slave


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


# --------------------------------------------------------------------------- wait


def run_wait(args: argparse.Namespace) -> int:
    """Wait until every node of ``--nodes`` is in ``--state`` (rpicluster/waiting.py)."""
    config = load(args.config, "any")
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
    from rpicluster.forgetting import run_forget  # not imported by rpicluster-slave
    from rpicluster.status import run_status

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
    setup_logging(args.log_level)
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
