"""Molecule verify: a rogue master with another CA's certificate, on 127.0.0.1.

Accepts TLS connections for SECONDS seconds and appends every byte of
plaintext it ever receives (there must be none: a slave verifies the master
before it sends anything) to OUT; prints the number of connections.

  python rogue_master.py CERT KEY PORT SECONDS OUT
"""

from __future__ import annotations

import socket
import ssl
import sys
import time

from rpicluster import tls


def main() -> None:
    cert, key, port, seconds, out = sys.argv[1:6]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", int(port)))
    listener.settimeout(0.5)
    deadline = time.monotonic() + float(seconds)
    accepted = 0
    with open(out, "ab") as record:
        while time.monotonic() < deadline:
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            accepted += 1
            sock.settimeout(2)
            server = tls.ServerTls(context)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    record.write(server.feed(data))
                    sock.sendall(server.output())
            except (ssl.SSLError, OSError):
                pass
            finally:
                sock.close()
    print(accepted)


if __name__ == "__main__":
    main()
