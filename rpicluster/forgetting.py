"""``rpicluster forget``: remove a retired node and its history from the master.

Split from ``cli.py``, beside ``waiting.py``, because its exit status is a
contract with ``playbooks/remove.yml``: 0 forgotten, 1 not known (already
forgotten: nothing to do), 2 usage or config error (or a name several nodes
share), 3 refused because the node is connected (without ``--force``), 4 the
master could not be asked.
"""

from __future__ import annotations

import argparse
import sys

from rpicluster.command import (
    EXIT_CONFIG,
    EXIT_CONNECTED,
    EXIT_NO_MASTER,
    EXIT_NOT_KNOWN,
    EXIT_OK,
    master_client,
)


def run_forget(args: argparse.Namespace) -> int:
    """Remove a node and its history from the master (docs/protocol.md 8.5)."""
    client = master_client(args.config, args.timeout)
    if client is None:
        return EXIT_CONFIG
    from rpicluster import protocol
    from rpicluster.client import ClientError, QueryFailed
    from rpicluster.displayable import text

    try:
        with client:
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
