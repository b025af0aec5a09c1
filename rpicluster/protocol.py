"""The rpicluster wire protocol, shared by the master, the slaves and the CLI.

``docs/protocol.md`` is the specification; this module is its one implementation
in Python, so that the master, the slave base class, the ``status`` command and
the benchmarks' simulated slaves cannot drift apart.

A frame is a 4-byte unsigned big-endian length followed by that many bytes of a
UTF-8 JSON object with a string ``type``. Membership is proved with an HMAC-SHA256
challenge-response over nonces, so the shared secret never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from typing import Any, Optional

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
NONCE_BYTES = 16

HEADER = struct.Struct(">I")

# Message types. Direction: M = master sends, S = slave (or client) sends.
CHALLENGE = "challenge"  # M, first frame on every connection
HELLO = "hello"  # S, answer to the challenge
WELCOME = "welcome"  # M, the peer is a member
HEARTBEAT = "heartbeat"  # S
HEARTBEAT_ACK = "heartbeat_ack"  # M
VITALS = "vitals"  # S
ACTION_ERROR = "action_error"  # S
QUERY = "query"  # S
REPLY = "reply"  # M
GOODBYE = "goodbye"  # both
ERROR = "error"  # M

KIND_SLAVE = "slave"
KIND_CLIENT = "client"

# Error codes carried by ``error`` frames.
E_AUTH_FAILED = "auth_failed"
E_BAD_VERSION = "bad_protocol_version"
E_BAD_FRAME = "bad_frame"
E_FRAME_TOO_LARGE = "frame_too_large"
E_BAD_MESSAGE = "bad_message"
E_UNKNOWN_TYPE = "unknown_type"
E_HANDSHAKE_TIMEOUT = "handshake_timeout"
E_REPLACED = "replaced"
E_NOT_FOUND = "not_found"

# Required fields and their JSON types, per message type (``type`` itself excluded).
_NUMBER = (int, float)
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    CHALLENGE: {"protocol": (int,), "nonce": (str,)},
    HELLO: {
        "protocol": (int,),
        "kind": (str,),
        "node_id": (str,),
        "role": (str,),
        "nonce": (str,),
        "mac": (str,),
    },
    WELCOME: {"protocol": (int,), "mac": (str,), "master": (dict,)},
    HEARTBEAT: {"seq": (int,), "sent_at": _NUMBER},
    HEARTBEAT_ACK: {"seq": (int,)},
    VITALS: {"vitals": (dict,)},
    ACTION_ERROR: {"error": (str,), "count": (int,)},
    QUERY: {"id": (int,), "what": (str,)},
    REPLY: {"id": (int,), "ok": (bool,)},
    GOODBYE: {"reason": (str,)},
    ERROR: {"code": (str,), "message": (str,)},
}


class ProtocolError(Exception):
    """The peer broke the protocol; ``code`` is the ``error`` frame's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class DisconnectionError(ConnectionError):
    """The connection to the peer ended (closed, reset or timed out)."""


# --------------------------------------------------------------------------- frames


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length header plus compact JSON."""
    body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return HEADER.pack(len(body)) + body


def make(msg_type: str, **fields: Any) -> bytes:
    """Encode a message of ``msg_type`` with ``fields``."""
    fields["type"] = msg_type
    return encode(fields)


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would poison every later reply.
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every frame: json.loads(..., parse_constant=...) would build a new
# one per call, which is most of the cost of a heartbeat on the master.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_body(body: bytes) -> Any:
    """Parse one frame body as strict UTF-8 JSON (no validation); ProtocolError if it is not."""
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(E_BAD_FRAME, f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(E_BAD_FRAME, "frame nests JSON too deeply") from None


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse and validate one frame body; raise :class:`ProtocolError` naming the fault."""
    return validate(parse_body(body))


def validate(message: Any) -> dict[str, Any]:
    """Check a parsed frame against :data:`SCHEMAS`; :class:`ProtocolError` names the fault."""
    if not isinstance(message, dict):
        raise ProtocolError(E_BAD_MESSAGE, "frame is not a JSON object")
    msg_type = message.get("type")
    if not isinstance(msg_type, str):
        raise ProtocolError(E_BAD_MESSAGE, "message has no string field 'type'")
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(E_UNKNOWN_TYPE, f"unknown message type {msg_type[:40]!r}")
    for field, types in schema.items():
        value = message.get(field)
        # bool is an int in Python; a JSON true is never a valid number here.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            raise ProtocolError(
                E_BAD_MESSAGE, f"{msg_type} message needs field {field!r} of type {names}"
            )
    return message


class FrameDecoder:
    """Incremental decoder for a byte stream (used by the asyncio master).

    ``feed()`` returns the complete frame bodies received so far. A length over
    ``max_frame_size`` (or zero) raises :class:`ProtocolError` at once, before the
    body is buffered, so an oversized frame costs the master no memory.
    """

    __slots__ = ("_buf", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._buf = bytearray()
        self.max_frame_size = max_frame_size

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and len(data) > 4:
            # Fast path: one whole frame in one read, the usual case for a heartbeat.
            (length,) = HEADER.unpack_from(data)
            if length == len(data) - 4 and length <= self.max_frame_size:
                return [data[4:]]
        buf += data
        bodies: list[bytes] = []
        offset = 0
        end = len(buf)
        while end - offset >= 4:
            (length,) = HEADER.unpack_from(buf, offset)
            if length == 0 or length > self.max_frame_size:
                raise ProtocolError(
                    E_FRAME_TOO_LARGE if length else E_BAD_FRAME,
                    f"frame length {length} outside 1..{self.max_frame_size} bytes",
                )
            if end - offset - 4 < length:
                break
            bodies.append(bytes(buf[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        if offset:
            del buf[:offset]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._buf)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        try:
            chunk = sock.recv(min(n, 65536))
        except socket.timeout:
            raise
        except OSError as exc:
            raise DisconnectionError(f"connection lost: {exc}") from exc
        if not chunk:
            raise DisconnectionError("connection closed by peer")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(
    sock: socket.socket, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> dict[str, Any]:
    """Read one frame from a blocking socket and return the validated message."""
    (length,) = HEADER.unpack(_recv_exactly(sock, 4))
    if length == 0 or length > max_frame_size:
        raise ProtocolError(
            E_FRAME_TOO_LARGE if length else E_BAD_FRAME,
            f"frame length {length} outside 1..{max_frame_size} bytes",
        )
    return decode_body(_recv_exactly(sock, length))


def send_frame(sock: socket.socket, frame: bytes) -> None:
    """Write one encoded frame to a blocking socket."""
    try:
        sock.sendall(frame)
    except OSError as exc:
        raise DisconnectionError(f"connection lost: {exc}") from exc


# ------------------------------------------------------------------- authentication


def new_nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def _mac(secret: str, *parts: str) -> str:
    text = "|".join((f"rpicluster/{PROTOCOL_VERSION}",) + parts)
    return hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def hello_mac(
    secret: str, server_nonce: str, client_nonce: str, kind: str, node_id: str, role: str
) -> str:
    """The slave's proof of the secret, bound to both nonces and its identity."""
    return _mac(secret, HELLO, server_nonce, client_nonce, kind, node_id, role)


def welcome_mac(secret: str, client_nonce: str, server_nonce: str) -> str:
    """The master's proof of the secret, so a slave never talks to an impostor."""
    return _mac(secret, WELCOME, client_nonce, server_nonce)


def macs_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))


def client_handshake(
    sock: socket.socket,
    secret: str,
    *,
    kind: str,
    node_id: str,
    role: str,
    details: Optional[dict[str, Any]] = None,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> dict[str, Any]:
    """Run the client side of the handshake on a connected blocking socket.

    Returns the ``welcome`` message. Raises :class:`ProtocolError` when the master
    refuses us (its ``error`` frame) or cannot prove it knows the secret, and
    :class:`DisconnectionError` when the connection ends.
    """
    challenge = recv_message(sock, max_frame_size)
    if challenge["type"] == ERROR:
        raise ProtocolError(challenge["code"], challenge["message"])
    if challenge["type"] != CHALLENGE:
        raise ProtocolError(E_BAD_MESSAGE, f"expected challenge, got {challenge['type']}")
    if challenge["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(
            E_BAD_VERSION,
            f"master speaks protocol {challenge['protocol']}, we speak {PROTOCOL_VERSION}",
        )
    nonce = new_nonce()
    hello: dict[str, Any] = {
        "protocol": PROTOCOL_VERSION,
        "kind": kind,
        "node_id": node_id,
        "role": role,
        "nonce": nonce,
        "mac": hello_mac(secret, challenge["nonce"], nonce, kind, node_id, role),
    }
    if details is not None:
        hello["details"] = details
    send_frame(sock, make(HELLO, **hello))
    answer = recv_message(sock, max_frame_size)
    if answer["type"] == ERROR:
        raise ProtocolError(answer["code"], answer["message"])
    if answer["type"] != WELCOME:
        raise ProtocolError(E_BAD_MESSAGE, f"expected welcome, got {answer['type']}")
    if not macs_equal(answer["mac"], welcome_mac(secret, nonce, challenge["nonce"])):
        raise ProtocolError(E_AUTH_FAILED, "master could not prove it knows the cluster secret")
    return answer
