"""A webhook receiver for the Molecule scenario: each POST body becomes one line.

Run in the master's container (prepare.yml) on 127.0.0.1:9199; verify.yml reads
/var/tmp/rpicluster-hooks.jsonl to count the master's alert notifications.
Standard library only, as on a Pi.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

LOG = "/var/tmp/rpicluster-hooks.jsonl"


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with open(LOG, "ab") as out:
            out.write(body.replace(b"\n", b" ") + b"\n")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stderr.write(fmt % args + "\n")


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", 9199), Handler).serve_forever()
