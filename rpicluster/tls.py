"""TLS with the cluster CA: contexts, the master's per-connection layer, a client socket.

Standard library ``ssl`` only (a Pi needs nothing more). Every connection to the
master is TLS 1.2+ with certificates on both sides, all signed by the cluster CA
(``[tls] ca_file``, which may hold several CAs while one is being rotated):

- the master requires a client certificate (``CERT_REQUIRED``); the peer's
  *identity* is the certificate's subject commonName (else its first DNS name),
  which the Ansible roles set to the Pi's inventory name; docs/protocol.md
  section 13 says how the master binds a node's name and id to it;
- slaves and clients verify the master's certificate *and* that it names the
  address they dialled (``check_hostname``: an IP address must be in its IP
  SANs, a host name in its DNS SANs; ``[tls] master_name`` overrides the name
  checked) before they send a byte of the protocol, so neither a stranger nor
  another Pi of the fleet can pose as the master.

Both sides do TLS over memory BIOs (``ssl.MemoryBIO``) rather than wrapped
sockets. On the master this keeps the accept loop's protections (admission caps,
one handshake timer from accept to a valid hello, no task per connection): the
TLS handshake is just the first bytes of an ordinary connection. On a slave it
lets one link thread read while role threads write, under one lock, which an
``ssl.SSLSocket`` does not allow.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import ssl
import threading
import time
from typing import Any, Optional

from rpicluster.config import TlsSettings

MIN_VERSION = ssl.TLSVersion.TLSv1_2
READ_SIZE = 65536
# A memory BIO keeps the capacity of the largest write it ever held (about 4/3 of
# it) for the life of its connection, and the master keeps two per connection. So
# ciphertext goes in and out of them in slices: one heartbeat is one slice, and a
# large frame or reply leaves at most a slice's worth behind instead of its size
# (bench/results.md, "What limits the TLS figures"; bench.tls_costs measures it).
IN_SLICE = 512  # smaller than a client's handshake flight (about 900 bytes)
OUT_SLICE = 4096  # plaintext per record written; a reply of any size leaves ~5.5 KiB


class TlsError(Exception):
    """A TLS file cannot be used; ``key`` is the ``[tls]`` key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


__all__ = ["TlsSettings", "TlsError", "ServerTls", "TlsSocket"]


# ------------------------------------------------------------------ contexts


def _load(context: ssl.SSLContext, settings: TlsSettings) -> ssl.SSLContext:
    """Load the CA bundle and the credential; TlsError names the file at fault."""
    context.minimum_version = MIN_VERSION
    try:
        context.load_verify_locations(cafile=settings.ca_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsError("ca_file", f"{settings.ca_file}: not a PEM CA certificate ({exc})") from None
    try:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", "") or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason):
            raise TlsError(
                "key_file", f"{settings.key_file} is not the key of {settings.cert_file}"
            ) from None
        raise TlsError(
            "cert_file",
            f"{settings.cert_file} / {settings.key_file}: not a PEM certificate and key ({exc})",
        ) from None
    except OSError as exc:
        raise TlsError("cert_file", f"cannot read {settings.cert_file}: {exc}") from None
    return context


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The master's context: TLS 1.2+, a client certificate of the cluster CA required.

    No TLS 1.3 session tickets: slaves and clients never resume a session (each
    connection is a full handshake, which binds the peer's certificate anew), so
    the two tickets OpenSSL would send after every handshake are wasted: about
    1.2 KB on the wire and two ticket encryptions of the master's CPU each.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.num_tickets = 0
    return _load(context, settings)


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """A slave's or client's context: verifies the master (chain and name), shows our cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    return _load(context, settings)


@functools.lru_cache(maxsize=8)
def cached_client_context(settings: TlsSettings) -> ssl.SSLContext:
    """One client context per credential for the whole process (role threads share it)."""
    return client_context(settings)


def file_problem(path: str, permission_hint: str) -> Optional[str]:
    """Why ``path`` cannot be read, for a config error naming its key; None when it can.

    Opening it is the only check that tells a missing file from one the
    service user may not read, which is the mistake a copied key usually is.
    """
    try:
        with open(path, "rb"):
            return None
    except FileNotFoundError:
        return f"{path}: file not found"
    except PermissionError:
        return f"{path}: permission denied ({permission_hint})"
    except OSError as exc:
        return f"{path}: cannot read: {exc}"


def check_files(settings: TlsSettings) -> None:
    """Each file readable, the key private to its owner, and all of them loadable.

    A key that group or others may read is refused: on a Pi it is the node's
    identity, and the roles install it 0600 owned by the service user.
    """
    for key in ("ca_file", "cert_file", "key_file"):
        problem = file_problem(getattr(settings, key), "run as root or as the rpicluster user")
        if problem:
            raise TlsError(key, problem)
    mode = os.stat(settings.key_file).st_mode & 0o777
    if mode & 0o077:
        raise TlsError(
            "key_file",
            f"{settings.key_file} is readable by group or others (mode {mode:04o});"
            f" chmod 600 {settings.key_file}",
        )
    client_context(settings)


# -------------------------------------------------------------- certificates


def peer_identity(cert: dict[str, Any]) -> str:
    """The name a peer certificate speaks for: subject commonName, else its first DNS SAN."""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str):
                return value
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS" and isinstance(value, str):
            return value
    return ""


def peer_not_after(cert: dict[str, Any]) -> Optional[float]:
    """Epoch seconds the peer certificate expires at (None when unknown)."""
    text = cert.get("notAfter")
    if not isinstance(text, str):
        return None
    try:
        return float(ssl.cert_time_to_seconds(text))
    except ValueError:
        return None


def days_left(not_after: Optional[float], now: Optional[float] = None) -> Optional[float]:
    """Days from now to ``not_after``, to one decimal (negative once expired)."""
    if not_after is None:
        return None
    return round((not_after - (time.time() if now is None else now)) / 86400.0, 1)


def _der_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER item in data[start:end]."""
    items = []
    i = start
    while i < end:
        tag = data[i]
        length = data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i : i + count], "big")
            i += count
        items.append((tag, i, i + length))
        i += length
    return items


def _der_time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii").rstrip("Z")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSS: 50..99 are 19xx (RFC 5280)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    parsed = time.strptime(text[:14], "%Y%m%d%H%M%S")
    return float(_timegm(parsed))


def _timegm(parsed: time.struct_time) -> int:
    import calendar

    return calendar.timegm(parsed)


def certificate_info(path: str) -> list[dict[str, Any]]:
    """``{"name", "not_after"}`` of each certificate in a PEM file, in file order.

    A minimal DER walk of TBSCertificate (the stdlib has no public parser of a
    certificate file): version, serial, signature, issuer, validity, subject.
    """
    with open(path, encoding="ascii", errors="replace") as handle:
        text = handle.read()
    out = []
    marker = "-----BEGIN CERTIFICATE-----"
    for block in text.split(marker)[1:]:
        pem = marker + block.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
        der = ssl.PEM_cert_to_DER_cert(pem)
        (_, cert_start, cert_end), *_ = _der_items(der, 0, len(der))
        (_, tbs_start, tbs_end), *_ = _der_items(der, cert_start, cert_end)
        fields = _der_items(der, tbs_start, tbs_end)
        if fields and fields[0][0] == 0xA0:  # explicit version
            fields = fields[1:]
        _, v_start, v_end = fields[3]
        (_, _, _), (na_tag, na_start, na_end) = _der_items(der, v_start, v_end)[:2]
        name = ""
        _, s_start, s_end = fields[4]
        for _, rdn_start, rdn_end in _der_items(der, s_start, s_end):
            for _, atv_start, atv_end in _der_items(der, rdn_start, rdn_end):
                (_, oid_start, oid_end), (_, val_start, val_end) = _der_items(
                    der, atv_start, atv_end
                )[:2]
                if der[oid_start:oid_end] == b"\x55\x04\x03":  # 2.5.4.3 commonName
                    name = der[val_start:val_end].decode("utf-8", "replace")
        out.append({"name": name, "not_after": _der_time(na_tag, der[na_start:na_end])})
    return out


def own_status(settings: TlsSettings) -> dict[str, Any]:
    """The ``tls`` object of the master dict: this side's certificate and the CA(s)."""
    now = time.time()
    status: dict[str, Any] = {"enabled": True}
    try:
        mine = certificate_info(settings.cert_file)[0]
        status.update(
            name=mine["name"],
            not_after=mine["not_after"],
            days_left=days_left(mine["not_after"], now),
        )
        cas = certificate_info(settings.ca_file)
        soonest = min(ca["not_after"] for ca in cas)
        status.update(ca_count=len(cas), ca_not_after=soonest, ca_days_left=days_left(soonest, now))
    except (OSError, ValueError, IndexError) as exc:
        status["error"] = f"cannot read the certificates: {exc}"
    return status


def explain(exc: BaseException) -> str:
    """One line a person can act on, for a failed TLS handshake (either side)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if "Hostname mismatch" in message or "IP address mismatch" in message:
            return f"certificate does not name the master's address ({message})"
        if "unable to get local issuer" in message or "self-signed" in message:
            return f"certificate not signed by the cluster CA ({message})"
        return f"certificate refused: {message}"
    reason = str(getattr(exc, "reason", "") or "")
    table = {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no certificate ([tls] missing on it?)",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the master wants a certificate and we sent none",
        "TLSV1_ALERT_UNKNOWN_CA": "the other side does not trust our CA (not the cluster CA)",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the other side refused our certificate",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the other side says our certificate expired",
        "WRONG_VERSION_NUMBER": "not TLS: the peer speaks the plain protocol ([tls] missing?)",
        "HTTP_REQUEST": "not TLS: an HTTP request",
        "UNSUPPORTED_PROTOCOL": "the peer offers only TLS older than 1.2",
        "NO_SHARED_CIPHER": "no cipher in common",
    }
    for key, text in table.items():
        if key in reason or key.lower().replace("_", " ") in str(exc).lower():
            return text
    return f"TLS handshake failed: {exc}"


# ------------------------------------------------------- the master's layer


class ServerTls:
    """TLS of one accepted connection on the master, over memory BIOs.

    ``feed(ciphertext)`` returns the plaintext now readable (``b""`` during the
    handshake) and raises ``ssl.SSLError`` when the handshake fails;
    ``output()`` is what must go to the peer after every call (handshake records,
    alerts); ``encrypt(plaintext)`` returns the records for it.
    """

    __slots__ = ("incoming", "outgoing", "obj", "ready")

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False

    def feed(self, data: bytes) -> bytes:
        # Slice by slice (IN_SLICE), each consumed before the next is written, so the
        # incoming BIO never grows past a slice whatever size the peer's records are.
        if len(data) <= IN_SLICE:
            return self._feed_slice(data)
        view = memoryview(data)
        plain = [self._feed_slice(view[i : i + IN_SLICE]) for i in range(0, len(view), IN_SLICE)]
        return b"".join(plain)

    def _feed_slice(self, data: Any) -> bytes:
        self.incoming.write(data)
        obj = self.obj
        if not self.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.ready = True
        chunks = []
        while True:
            try:
                chunk = obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify: the peer ends cleanly
                break
            if not chunk:
                break
            chunks.append(chunk)
            # Stop without the exception when nothing is left (a heartbeat is one record).
            if not self.incoming.pending and not obj.pending():
                break
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def output(self) -> bytes:
        return self.outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        # A record per OUT_SLICE, each read out at once: the outgoing BIO never holds
        # a whole large reply (a dashboard's cluster query), only one record of it.
        if len(data) <= OUT_SLICE:
            self.obj.write(data)
            return self.outgoing.read()
        view = memoryview(data)
        records = []
        for start in range(0, len(view), OUT_SLICE):
            self.obj.write(view[start : start + OUT_SLICE])
            records.append(self.outgoing.read())
        return b"".join(records)

    def peer_cert(self) -> dict[str, Any]:
        return self.obj.getpeercert() or {}


# --------------------------------------------------------- a client socket


class TlsSocket:
    """A connected blocking socket speaking TLS; duck-types what the protocol needs.

    ``recv``/``sendall``/``settimeout``/``fileno``/``shutdown``/``close``, so
    ``rpicluster.protocol`` frames work over it unchanged. One thread reads, any
    thread writes: encryption and decryption share one lock (an SSL object must
    not be used by two threads at once), socket reads happen outside it.
    ``pending()`` is plaintext already decrypted: check it before ``select()``.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str):
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=False, server_hostname=server_hostname
        )
        self.lock = threading.Lock()
        self.plain = bytearray()
        self.eof = False

    def handshake(self) -> None:
        """Run the TLS handshake; raises ssl.SSLError (verification) or OSError."""
        while True:
            with self.lock:
                try:
                    self.obj.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
                except ssl.SSLError:
                    with contextlib.suppress(OSError):
                        self._flush()  # the alert says why to the other side
                    raise
            data = self.sock.recv(READ_SIZE)
            if not data:
                raise ConnectionResetError("connection closed during the TLS handshake")
            self.incoming.write(data)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        with self.lock:
            self.obj.write(data)
            self._flush()

    def _decrypt(self) -> None:
        while True:
            try:
                chunk = self.obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.plain += chunk
        self._flush()  # post-handshake messages may need an answer

    def recv(self, size: int) -> bytes:
        while not self.plain and not self.eof:
            data = self.sock.recv(READ_SIZE)
            with self.lock:
                if not data:
                    self.eof = True
                    break
                self.incoming.write(data)
                self._decrypt()
        out = bytes(self.plain[:size])
        del self.plain[:size]
        return out

    def pending(self) -> int:
        return len(self.plain)

    def getpeercert(self) -> dict[str, Any]:
        return self.obj.getpeercert() or {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, value: Optional[float]) -> None:
        self.sock.settimeout(value)

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect(sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> TlsSocket:
    """Wrap a connected socket and complete the handshake (the socket's timeout bounds it)."""
    wrapped = TlsSocket(sock, context, server_hostname)
    wrapped.handshake()
    return wrapped
