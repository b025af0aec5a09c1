"""Molecule verify: what the master does with a Pi that is not who it says.

Run on a slave Pi with its own credential (/etc/rpicluster/tls) and the
cluster secret, with the Pi's virtualenv. Prints one JSON object: for each
attempt, the master's answer (an error code) or the local failure.

  python tls_probe.py CONFIG OTHER_NAME OTHER_NODE_ID
"""

from __future__ import annotations

import json
import socket
import ssl
import sys

from rpicluster import protocol as p
from rpicluster import tls
from rpicluster.config import load_config


def attempt(config, context, node_id, details, secret=None):
    host, port = config.slave.master_ip, config.slave.socket_port
    sock = socket.create_connection((host, port), timeout=10)
    try:
        wrapped = tls.connect(sock, context, config.tls.master_name or host)
        p.client_handshake(
            wrapped,
            secret or config.cluster.secret,
            kind=p.KIND_SLAVE,
            node_id=node_id,
            role="basic",
            details=details,
        )
        return "welcome"
    except p.ProtocolError as exc:
        return exc.code
    except (ssl.SSLError, OSError, p.DisconnectionError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        return "tls: " + tls.explain(cause) if isinstance(cause, ssl.SSLError) else f"io: {exc}"
    finally:
        sock.close()


def main() -> None:
    config = load_config(sys.argv[1], need="slave")
    other_name, other_id = sys.argv[2], sys.argv[3]
    mine = tls.client_context(config.tls)
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the master, shows no certificate
    bare.load_verify_locations(config.tls.ca_file)
    print(
        json.dumps(
            {
                "other_name": attempt(config, mine, "probe-name", {"node_name": other_name}),
                "other_id": attempt(config, mine, other_id, {}),
                "no_certificate": attempt(config, bare, "probe-bare", {}),
                "wrong_secret": attempt(config, mine, "probe-secret", {}, "w" * 32),
            }
        )
    )


if __name__ == "__main__":
    main()
