"""The rpicluster wire protocol, shared by the master, the slaves and the CLI.

``docs/protocol.md`` is the specification; this module is its one implementation
in Python, so that the master, the slave base class, the ``status`` command and
the benchmarks' simulated slaves cannot drift apart.

A frame is a 4-byte unsigned big-endian length followed by that many bytes of a
UTF-8 JSON object with a string ``type``. Membership is proved with an HMAC-SHA256
challenge-response over nonces, so the shared secret never crosses the wire.

Parsing is strict on purpose (docs/protocol.md "Limits"): only finite numbers,
integers within +-2^53, at most :data:`MAX_DEPTH` levels of nesting. A value that
one parser accepts and another turns into Infinity or an exception would be
stored and re-sent to every client, so it is refused where it enters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from typing import Any, Optional

# 2: the MAC input is length-prefixed (netstrings) instead of joined with "|".
PROTOCOL_VERSION = 2
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
# Until the master's welcome a frame may hold at most this many bytes: a hello is
# tiny (its details are at most 8 KiB), so a stranger can make the master buffer
# no more than this per connection.
PREAUTH_MAX_FRAME_SIZE = 16 * 1024
NONCE_BYTES = 16
MAX_DEPTH = 16  # levels of JSON arrays/objects in a body (the body object is level 1)
MAX_INT = 2**53  # integers beyond +-2^53 lose precision in JavaScript and most JSON parsers
_MAX_INT_CHARS = len(str(MAX_INT)) + 1  # a longer digit string cannot be in range

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
ERROR = "error"  # M, then the master closes the connection
REFUSED = "refused"  # M, one message was refused; the connection stays open

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
E_TOO_MANY_CONNECTIONS = "too_many_connections"  # sent instead of a challenge
E_BAD_DETAILS = "bad_details"  # hello details break the member-data limits
E_TOO_MANY_ROLES = "too_many_roles"  # a node may hold at most MAX_ROLES roles
E_SILENT = "silent"  # no message for dead_after seconds
E_RATE_EXCEEDED = "rate_exceeded"  # refused messages kept coming much faster than allowed
E_FORGOTTEN = "forgotten"  # an operator forgot the node (``rpicluster forget --force``)
# Another machine holds this node id now (a copied SD card): the hello is refused
# and the slave retries only every minute, so the two never take turns.
E_DUPLICATE_ID = "duplicate_id"
E_IDENTITY = "identity_mismatch"  # with TLS: the hello speaks for another node than the cert
# Codes of ``refused`` notices (not fatal) and of failed query replies.
E_BAD_VITALS = "bad_vitals"
E_VITALS_RATE = "vitals_rate_limited"
E_BAD_ACTION_ERROR = "bad_action_error"
E_INTERNAL = "internal"
E_CONNECTED = "connected"  # forget refused: the node is connected (ask with force)
E_FORBIDDEN = "forbidden"  # with TLS: forget from a credential other than the master's
E_AMBIGUOUS = "ambiguous"  # forget refused: several nodes have that name (use the node id)

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
    REFUSED: {"code": (str,), "message": (str,), "count": (int,)},
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


class _NumberError(ValueError):
    """A JSON number outside the protocol's range (raised from the parser's hooks)."""


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would poison every later reply.
    raise _NumberError(f"{name} is not valid JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf or nan: 1e400 overflows to inf in Python
        raise _NumberError(f"number {text[:20]}... is out of range (not finite)")
    return value


def _parse_int(text: str) -> int:
    # The length check first: int() of a 100,000-digit string costs real CPU.
    if len(text) > _MAX_INT_CHARS:
        raise _NumberError(f"integer of {len(text)} digits is out of range (+-2^53)")
    value = int(text)
    if not -MAX_INT <= value <= MAX_INT:
        raise _NumberError(f"integer {text} is out of range (+-2^53)")
    return value


# One decoder for every frame: json.loads(..., parse_constant=...) would build a new
# one per call, which is most of the cost of a heartbeat on the master.
_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int
)


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Levels of arrays/objects in ``value`` (a scalar is 0), counting stops past ``limit``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > limit:
                return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_body(body: bytes) -> Any:
    """Parse one frame body as strict UTF-8 JSON (no validation); ProtocolError if it is not.

    Strict: NaN/Infinity, numbers that overflow, integers beyond +-2^53 and nesting
    deeper than :data:`MAX_DEPTH` are ``bad_frame``.
    """
    try:
        value = _DECODER.decode(body.decode("utf-8"))
    except _NumberError as exc:
        raise ProtocolError(E_BAD_FRAME, f"frame is not valid here: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(E_BAD_FRAME, f"frame is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(E_BAD_FRAME, f"frame nests JSON deeper than {MAX_DEPTH}") from None
    # Counting brackets is C-fast; only a body that could nest too deeply is walked.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and depth(value) > MAX_DEPTH:
        raise ProtocolError(E_BAD_FRAME, f"frame nests JSON deeper than {MAX_DEPTH}")
    return value


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


def mac_input(*parts: str) -> bytes:
    """The MAC input: each part as a netstring ``<byte length>:<UTF-8 bytes>,``.

    Length-prefixed, so no field boundary is ambiguous whatever characters a
    node id, role or nonce holds (version 1 joined the parts with ``|``).
    """
    out = bytearray()
    for part in (f"rpicluster/{PROTOCOL_VERSION}",) + parts:
        # surrogatepass: never raise on a lone surrogate (the master refuses those
        # before computing a MAC; this only keeps the function total).
        data = part.encode("utf-8", "surrogatepass")
        out += b"%d:%s," % (len(data), data)
    return bytes(out)


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode("utf-8"), mac_input(*parts), hashlib.sha256).hexdigest()


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
    instance: Optional[str] = None,
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
    if type(challenge["protocol"]) is not int or challenge["protocol"] != PROTOCOL_VERSION:
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
    if instance is not None:
        hello["instance"] = instance  # which process of the node (a copied card is another)
    if details is not None:
        # Limits of docs/protocol.md: the master refuses a hello whose details break
        # them, so drop the offending keys here and still join.
        from rpicluster.memberdata import clean_details

        hello["details"] = clean_details(details, log_drops=True)
    send_frame(sock, make(HELLO, **hello))
    answer = recv_message(sock, max_frame_size)
    if answer["type"] == ERROR:
        raise ProtocolError(answer["code"], answer["message"])
    if answer["type"] != WELCOME:
        raise ProtocolError(E_BAD_MESSAGE, f"expected welcome, got {answer['type']}")
    if not macs_equal(answer["mac"], welcome_mac(secret, nonce, challenge["nonce"])):
        raise ProtocolError(E_AUTH_FAILED, "master could not prove it knows the cluster secret")
    return answer
