"""``rpicluster wait``: block until named nodes reach a state, or say which did not.

Deploys and chores (reboot, shutdown, remove) need "are these Pis back?"
answered by node *name* or node id, never by OS hostname (a fleet flashed with
the Imager's defaults calls every card ``raspberrypi``). The play calls one
command instead of looping over the status JSON in Jinja; scripts use it too.

The master's cluster query is polled until every wanted node is in the state, or
the timeout passes. Exit status (the contract with the playbooks): 0 all reached,
1 timeout (one line per missing node with its state), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from rpicluster import humanize
from rpicluster import memberdata as md
from rpicluster.displayable import node_name, text

if TYPE_CHECKING:
    from rpicluster.config import Config

STATES = ("alive", "left", "gone")
# What each wanted state accepts of a node. ``gone``: stopped one way or another
# (dead, left, or not known at all: forgotten, never joined).
_ACCEPTS = {"alive": ("alive",), "left": ("left",), "gone": ("dead", "left")}
EXIT_OK, EXIT_TIMEOUT, EXIT_CONFIG = 0, 1, 2  # the contract with the playbooks
POLL_INTERVAL = 0.5  # seconds between two questions to the master
MAX_NODES = 10000  # names on one command line at most


@dataclass(frozen=True)
class Verdict:
    """One wanted node: whether it reached the state, and why not, in one line."""

    wanted: str
    reached: bool
    line: str


def parse_nodes(value: str) -> list[str]:
    """``pi-1, pi-2`` -> names in order, each once; ValueError names a bad one."""
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if not name:
            continue
        problem = md.check_name(name, md.MAX_STRING)
        if problem:
            raise ValueError(f"node {name[:40]!r} {problem}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("names no node (give names or node ids, comma-separated)")
    if len(names) > MAX_NODES:
        raise ValueError(f"names {len(names)} nodes, more than {MAX_NODES}")
    return names


def matches(wanted: str, nodes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The nodes ``wanted`` means: the node with that id, else every node of that name."""
    nodes = list(nodes)
    by_id = [n for n in nodes if n.get("node_id") == wanted]
    if by_id:
        return by_id[:1]
    return [n for n in nodes if node_name(n) == wanted]


def _describe(node: Mapping[str, Any], now: float) -> str:
    state = text(node.get("state"), 16)
    if node.get("connected") is False and state in ("alive", "suspect"):
        state += " (offline)"
    seen = humanize.ago(node.get("last_seen"), now)
    return f"{state} (node {text(node.get('node_id'), 128)[:8]}, last seen {seen})"


def judge(wanted: str, nodes: Sequence[Mapping[str, Any]], state: str, now: float) -> Verdict:
    """Whether ``wanted`` is in ``state`` among ``nodes`` (the master's node objects).

    ``alive``: one of its nodes is alive and connected (a re-flashed Pi's old node
    id, dead until forgotten, does not hold it back). ``left``: each of its nodes
    said goodbye. ``gone``: none of its nodes is connected and alive or suspect.
    """
    found = matches(wanted, nodes)
    if not found:
        if state == "gone":
            return Verdict(wanted, True, f"{wanted}: gone (not known to the master)")
        return Verdict(wanted, False, f"{wanted}: unknown (no node of that name or id)")
    accepts = _ACCEPTS[state]

    def reached(node: Mapping[str, Any]) -> bool:
        in_state = node.get("state") in accepts
        if state == "alive":
            return in_state and node.get("connected") is not False
        return in_state

    ok = (any if state == "alive" else all)(reached(n) for n in found)
    described = "; ".join(_describe(n, now) for n in found[:8])
    more = f" and {len(found) - 8} more" if len(found) > 8 else ""
    shared = f" [{len(found)} nodes share this name]" if len(found) > 1 else ""
    return Verdict(wanted, ok, f"{wanted}: {described}{more}{shared}")


def wait(
    fetch: Callable[[], Sequence[Mapping[str, Any]]],
    wanted: Sequence[str],
    state: str,
    timeout: float,
    *,
    interval: float = POLL_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall: Callable[[], float] = time.time,
) -> tuple[bool, list[Verdict], Optional[str]]:
    """Poll ``fetch()`` (the master's nodes) until every wanted node is in ``state``.

    Returns (all reached, the verdicts of the last poll, the last fetch error or
    None). ``fetch`` raising an exception (the master restarting) is retried
    until the timeout, which bounds the whole wait.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}")
    deadline = clock() + max(0.0, timeout)
    verdicts: list[Verdict] = []
    error: Optional[str] = None
    while True:
        try:
            nodes = fetch()
        except Exception as exc:  # any failure to ask is retried until the deadline
            error = str(exc) or type(exc).__name__
        else:
            error = None
            now = wall()
            verdicts = [judge(name, nodes, state, now) for name in wanted]
            if all(v.reached for v in verdicts):
                return True, verdicts, None
        left = deadline - clock()
        if left <= 0:
            break
        sleep(min(interval, left))
    if error is not None and not verdicts:
        verdicts = [Verdict(n, False, f"{n}: unknown (master not reached)") for n in wanted]
    return False, verdicts, error


# ---------------------------------------------------------------------- the command


def node_list(value: str) -> list[str]:
    """argparse type of ``--nodes`` (a bad list is a usage error: exit 2)."""
    try:
        return parse_nodes(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds(value: str) -> float:
    """argparse type of ``--timeout``: more than 0, at most a day."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < number <= 86400:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0 and at most 86400")
    return number


def run(args: argparse.Namespace, config: Config) -> int:
    """``rpicluster wait`` with a loaded config: poll, then print and return the exit code."""
    from rpicluster.client import ClientError, MasterClient
    from rpicluster.config import ConfigError

    try:
        host, port = config.master_address()
    except ConfigError as exc:
        print(f"rpicluster: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    held: list[MasterClient] = []

    def fetch() -> list[dict[str, Any]]:
        if not held:  # (re)connect: the master may be restarting during a deploy
            client = MasterClient(
                host, port, config.cluster.secret, timeout=args.query_timeout, tls=config.tls
            )
            held.append(client.connect())
        try:
            return held[0].cluster_state()["nodes"]
        except ClientError:
            held.pop().close()
            raise

    try:
        ok, verdicts, error = wait(fetch, args.nodes, args.state, args.timeout)
    finally:
        for client in held:
            client.close()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    if ok:
        print(f"{len(verdicts)} node(s) {args.state}: {', '.join(v.wanted for v in verdicts)}")
        return EXIT_OK
    missing = [v for v in verdicts if not v.reached]
    print(
        f"rpicluster wait: {len(missing)} of {len(verdicts)} node(s) not {args.state}"
        f" after {args.timeout:g} s:"
    )
    for verdict in missing:
        print(text(verdict.line, 1024))
    if error is not None:
        print(f"rpicluster wait: the master did not answer: {error}", file=sys.stderr)
    return EXIT_TIMEOUT
