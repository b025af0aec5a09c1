"""``rpicluster status``: the cluster as a table for people, or one JSON document for scripts.

Split from ``cli.py`` because the table is a renderer of its own: one row per
node named by its node name, its state (``offline`` when a loaded node has not
reconnected), CPU, temperature and warnings (duplicate id or name, certificate
expiry, power and heat), a first line with the master's TLS, store and alert
health, and one line per firing alert. Every cell is made displayable, so
whatever a node sent prints as one inert line and never raises.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from rpicluster.command import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE, master_client


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
    """Ask the master for the cluster and print it; exit 1 when it did not answer."""
    client = master_client(args.config, args.timeout)
    if client is None:
        return EXIT_CONFIG
    from rpicluster.client import ClientError

    try:
        with client:
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
