"""HTTPS for the dashboard and ``/metrics``: the server's context and its TLS handshake.

Optional (``[webserver] https = yes``). The certificate is the webserver Pi's own
node certificate of the cluster CA (``[tls] cert_file`` and ``key_file``, which
the Ansible roles issue with ``serverAuth`` and the Pi's addresses when HTTPS is
on), or one given with ``https_cert_file`` and ``https_key_file``. Browsers and
Prometheus verify it with the cluster CA (``ca.crt``); no client certificate is
asked for: the optional login (web/auth.py) says who may look.

The handshake runs inside the server's event loop (web/server.py), non-blocking,
under its own deadline and the server's connection cap, so a stranger that
starts a handshake and stalls holds one connection slot for at most
``HANDSHAKE_TIMEOUT`` seconds, never a thread. A client that speaks plain HTTP
to the HTTPS port gets a short plain ``400`` saying so, then the connection closes.
"""

from __future__ import annotations

import os
import selectors
import ssl
from typing import Optional

from rpicluster.tls import file_problem

MIN_VERSION = ssl.TLSVersion.TLSv1_2
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello
PLAIN_HTTP_REASON = "this port speaks HTTPS only: use https://"


class HttpsError(Exception):
    """A certificate or key cannot be served; ``key`` is the ``[webserver]`` key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS 1.2+ server context serving ``cert_file`` (no client certificate asked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSION
    context.load_cert_chain(cert_file, key_file)
    return context


def check_files(cert_file: str, key_file: str, *, cert_key: str, key_key: str) -> None:
    """Both files readable, the key not readable by others, and the pair loadable.

    ``cert_key``/``key_key`` name the config keys the files came from, for the
    error (``https_cert_file``, or ``[tls] cert_file`` when the node's own is used).
    """
    for key, path in ((cert_key, cert_file), (key_key, key_file)):
        problem = file_problem(path, "the rpicluster user must read it")
        if problem:
            raise HttpsError(key, problem)
    mode = os.stat(key_file).st_mode & 0o777
    if mode & 0o007:
        raise HttpsError(
            key_key, f"{key_file} is readable by others (mode {mode:04o}); chmod o-rwx {key_file}"
        )
    try:
        server_context(cert_file, key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(getattr(exc, "reason", "") or exc):
            raise HttpsError(key_key, f"{key_file} is not the key of {cert_file}") from None
        raise HttpsError(
            cert_key, f"{cert_file} / {key_file}: not a PEM certificate and key ({exc})"
        ) from None


def handshake_step(sock: ssl.SSLSocket) -> int:
    """Advance a non-blocking server handshake: 0 when done, else the event to wait for.

    Raises ``ssl.SSLError`` or ``OSError`` when the handshake fails (a client that
    does not trust the CA, garbage, a reset).
    """
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return selectors.EVENT_READ
    except ssl.SSLWantWriteError:
        return selectors.EVENT_WRITE
    return 0


def failure_reason(exc: BaseException) -> str:
    """A short reason for the log: OpenSSL's reason code when there is one."""
    reason: Optional[str] = getattr(exc, "reason", None)
    return reason or exc.__class__.__name__
