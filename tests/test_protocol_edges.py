"""The wire protocol at its edges: frame lengths at 0, at the limit and one past it, the
receive timeout, send errors, the handshake's refusals, number and nesting limits.
Real sockets (socketpair), no sleeping."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from rpicluster import protocol as p

SECRET = "edge-secret-0123456789"


@pytest.fixture
def pair():
    """Two connected blocking sockets: the test writes on ``ours``, the code reads ``theirs``."""
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def body_of(size: int) -> bytes:
    """A valid goodbye frame body of exactly ``size`` bytes."""
    empty = len(json.dumps({"type": "goodbye", "reason": ""}, separators=(",", ":")))
    return json.dumps(
        {"type": "goodbye", "reason": "x" * (size - empty)}, separators=(",", ":")
    ).encode()


def test_recv_message_takes_a_frame_of_exactly_the_limit(pair):
    ours, theirs = pair
    body = body_of(200)
    assert len(body) == 200
    ours.sendall(p.HEADER.pack(200) + body)
    assert p.recv_message(theirs, max_frame_size=200)["type"] == p.GOODBYE


def test_recv_message_refuses_one_byte_over_the_limit_from_the_header(pair):
    ours, theirs = pair
    ours.sendall(p.HEADER.pack(201))  # the body is never sent: the header alone is refused
    with pytest.raises(p.ProtocolError) as info:
        p.recv_message(theirs, max_frame_size=200)
    assert info.value.code == p.E_FRAME_TOO_LARGE
    assert info.value.message == "frame length 201 outside 1..200 bytes"


def test_recv_message_refuses_a_zero_length_frame(pair):
    ours, theirs = pair
    ours.sendall(p.HEADER.pack(0) + p.make(p.GOODBYE, reason="x"))
    with pytest.raises(p.ProtocolError) as info:
        p.recv_message(theirs)
    assert info.value.code == p.E_BAD_FRAME
    assert "frame length 0 outside 1..1048576 bytes" in info.value.message


def test_recv_message_default_limit_is_one_mebibyte(pair):
    ours, theirs = pair
    ours.sendall(p.HEADER.pack(1024 * 1024 + 1))
    with pytest.raises(p.ProtocolError, match="outside 1..1048576"):
        p.recv_message(theirs)


def test_recv_message_reassembles_a_frame_larger_than_one_read(pair):
    ours, theirs = pair
    body = body_of(200_000)
    writer = threading.Thread(target=ours.sendall, args=(p.HEADER.pack(len(body)) + body,))
    writer.start()
    message = p.recv_message(theirs)
    writer.join(5)
    assert json.dumps(message, separators=(",", ":")).encode() == body


def test_a_receive_timeout_is_a_timeout_not_a_disconnection(pair):
    ours, theirs = pair
    theirs.settimeout(0.05)
    with pytest.raises(socket.timeout) as info:
        p.recv_message(theirs)
    assert not isinstance(info.value, p.DisconnectionError)
    # the connection is still usable afterwards
    theirs.settimeout(5)
    p.send_frame(ours, p.make(p.GOODBYE, reason="late"))
    assert p.recv_message(theirs)["reason"] == "late"


def test_a_peer_closing_mid_frame_is_a_disconnection(pair):
    ours, theirs = pair
    ours.sendall(p.HEADER.pack(50) + b'{"type"')
    ours.close()
    with pytest.raises(p.DisconnectionError, match="connection closed by peer"):
        p.recv_message(theirs)


def test_a_reset_connection_is_a_disconnection(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(p.DisconnectionError, match="connection lost") as info:
        p.recv_message(theirs)
    assert isinstance(info.value.__cause__, OSError)


def test_send_errors_are_wrapped_as_disconnections(pair):
    ours, theirs = pair
    theirs.close()
    with pytest.raises(p.DisconnectionError, match="connection lost") as info:
        for _ in range(64):  # the first sends may still fit in the buffer
            p.send_frame(ours, p.make(p.GOODBYE, reason="x" * 65536))
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, ConnectionError)


# --------------------------------------------------------------------- handshake


def serve(sock: socket.socket, *frames: bytes) -> threading.Thread:
    """Write ``frames`` on ``sock``, reading one frame (the hello) after the first."""

    def run() -> None:
        p.send_frame(sock, frames[0])
        if len(frames) > 1:
            p.recv_message(sock)
            for frame in frames[1:]:
                p.send_frame(sock, frame)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def handshake(sock: socket.socket, **kwargs):
    return p.client_handshake(sock, SECRET, kind="slave", node_id="n1", role="basic", **kwargs)


def test_handshake_wants_a_challenge_first(pair):
    ours, theirs = pair
    serve(ours, p.make(p.GOODBYE, reason="hi"))
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    assert info.value.code == p.E_BAD_MESSAGE
    assert info.value.message == "expected challenge, got goodbye"


def test_handshake_reports_the_masters_refusal_instead_of_a_challenge(pair):
    ours, theirs = pair
    serve(ours, p.make(p.ERROR, code=p.E_TOO_MANY_CONNECTIONS, message="full"))
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    assert (info.value.code, info.value.message) == (p.E_TOO_MANY_CONNECTIONS, "full")


@pytest.mark.parametrize("version", [1, 3, 0])
def test_handshake_refuses_another_protocol_version(pair, version):
    ours, theirs = pair
    serve(ours, p.make(p.CHALLENGE, protocol=version, nonce="SN"))
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    assert info.value.code == p.E_BAD_VERSION
    assert info.value.message == f"master speaks protocol {version}, we speak 2"


def test_handshake_sends_a_hello_that_proves_the_secret(pair):
    ours, theirs = pair
    result = {}

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        hello = result["hello"] = p.recv_message(ours)
        mac = p.welcome_mac(SECRET, hello["nonce"], "SN")
        p.send_frame(ours, p.make(p.WELCOME, protocol=2, mac=mac, master={"v": 1}))

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    welcome = handshake(theirs, details={"hostname": "pi", "bad\x00key": 1})
    thread.join(5)
    hello = result["hello"]
    assert welcome["master"] == {"v": 1}
    assert (hello["protocol"], hello["kind"], hello["node_id"], hello["role"]) == (
        2,
        "slave",
        "n1",
        "basic",
    )
    assert len(hello["nonce"]) == 32 and int(hello["nonce"], 16) >= 0
    assert hello["mac"] == p.hello_mac(SECRET, "SN", hello["nonce"], "slave", "n1", "basic")
    assert hello["details"] == {"hostname": "pi"}  # the key the master would refuse is dropped
    assert "instance" not in hello


def test_handshake_sends_the_process_instance_when_given(pair):
    ours, theirs = pair
    result = {}

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        result["hello"] = p.recv_message(ours)
        p.send_frame(ours, p.make(p.ERROR, code=p.E_AUTH_FAILED, message="no"))

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    with pytest.raises(p.ProtocolError):
        handshake(theirs, instance="proc-42")
    thread.join(5)
    assert result["hello"]["instance"] == "proc-42"


def test_handshake_without_details_sends_none(pair):
    ours, theirs = pair
    result = {}

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        result["hello"] = p.recv_message(ours)
        p.send_frame(ours, p.make(p.ERROR, code=p.E_AUTH_FAILED, message="wrong secret"))

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    thread.join(5)
    assert "details" not in result["hello"]
    assert (info.value.code, info.value.message) == (p.E_AUTH_FAILED, "wrong secret")


def test_handshake_wants_a_welcome_after_the_hello(pair):
    ours, theirs = pair
    serve(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"), p.make(p.HEARTBEAT_ACK, seq=1))
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    assert info.value.code == p.E_BAD_MESSAGE
    assert info.value.message == "expected welcome, got heartbeat_ack"


def test_handshake_honours_its_frame_limit(pair):
    ours, theirs = pair
    serve(ours, p.make(p.CHALLENGE, protocol=2, nonce="N" * 100))
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs, max_frame_size=64)
    assert info.value.code == p.E_FRAME_TOO_LARGE


def test_a_welcome_signed_with_another_secret_is_refused(pair):
    ours, theirs = pair

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        hello = p.recv_message(ours)
        mac = p.welcome_mac("another-secret-0123456", hello["nonce"], "SN")
        p.send_frame(ours, p.make(p.WELCOME, protocol=2, mac=mac, master={}))

    threading.Thread(target=master, daemon=True).start()
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs)
    assert info.value.code == p.E_AUTH_FAILED
    assert info.value.message == "master could not prove it knows the cluster secret"


# ------------------------------------------------------------------ frame decoder


def test_frame_decoder_fast_path_takes_a_frame_of_exactly_the_limit():
    decoder = p.FrameDecoder(max_frame_size=200)
    body = body_of(200)
    assert decoder.feed(p.HEADER.pack(200) + body) == [body]
    assert decoder.pending == 0


def test_frame_decoder_refuses_one_over_the_limit_and_a_zero_length():
    with pytest.raises(p.ProtocolError) as info:
        p.FrameDecoder(max_frame_size=200).feed(p.HEADER.pack(201) + body_of(201))
    assert info.value.code == p.E_FRAME_TOO_LARGE
    assert info.value.message == "frame length 201 outside 1..200 bytes"
    with pytest.raises(p.ProtocolError) as info:
        p.FrameDecoder().feed(p.HEADER.pack(0) + b"{}")
    assert info.value.code == p.E_BAD_FRAME
    assert p.FrameDecoder().max_frame_size == 1024 * 1024


def test_frame_decoder_takes_a_header_alone_then_the_body():
    decoder = p.FrameDecoder()
    body = body_of(30)
    assert decoder.feed(p.HEADER.pack(30)) == []
    assert decoder.pending == 4
    assert decoder.feed(body[:10]) == []
    assert decoder.pending == 14
    assert decoder.feed(body[10:] + p.HEADER.pack(30) + body[:1]) == [body]
    assert decoder.pending == 5


def test_frame_decoder_fast_path_leaves_no_state_behind():
    decoder = p.FrameDecoder()
    one, two = body_of(40), body_of(45)
    assert decoder.feed(p.HEADER.pack(40) + one) == [one]
    assert decoder.feed(p.HEADER.pack(45) + two + p.HEADER.pack(40) + one) == [two, one]
    assert decoder.feed(p.HEADER.pack(40)) == []
    assert decoder.feed(one) == [one]
    assert decoder.pending == 0


def test_frame_decoder_one_byte_body():
    decoder = p.FrameDecoder()
    assert decoder.feed(p.HEADER.pack(1) + b"7") == [b"7"]
    assert decoder.feed(p.HEADER.pack(1)) == []
    assert decoder.feed(b"8") == [b"8"]


# ------------------------------------------------------------ numbers and nesting


def test_integers_are_allowed_up_to_exactly_two_to_the_53():
    for value in (2**53, -(2**53), 0):
        body = json.dumps({"type": "heartbeat_ack", "seq": value}).encode()
        assert p.decode_body(body)["seq"] == value
    for value in (2**53 + 1, -(2**53) - 1, 10**16, 10**40):
        body = json.dumps({"type": "heartbeat_ack", "seq": value}).encode()
        with pytest.raises(p.ProtocolError, match="out of range") as info:
            p.decode_body(body)
        assert info.value.code == p.E_BAD_FRAME


def test_a_huge_integer_is_refused_by_its_length():
    body = b'{"type":"heartbeat_ack","seq":' + b"9" * 5000 + b"}"
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(body)
    assert "integer of 5000 digits is out of range" in info.value.message


@pytest.mark.parametrize("number", [b"1e400", b"-1e400"])
def test_a_float_overflowing_to_infinity_is_refused(number):
    body = b'{"type":"heartbeat","seq":1,"sent_at":' + number + b"}"
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(body)
    assert info.value.code == p.E_BAD_FRAME
    assert "not finite" in info.value.message


def test_finite_floats_pass():
    body = b'{"type":"heartbeat","seq":1,"sent_at":1.5e300}'
    assert p.decode_body(body)["sent_at"] == 1.5e300


@pytest.mark.parametrize("constant", [b"Infinity", b"-Infinity", b"NaN"])
def test_json_constants_are_refused(constant):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(b'{"type":"heartbeat","seq":1,"sent_at":' + constant + b"}")
    assert info.value.code == p.E_BAD_FRAME
    assert "is not valid JSON" in info.value.message


def nested(levels: int) -> bytes:
    """A vitals body whose JSON nests ``levels`` deep (the body object is level 1)."""
    inner = "1"
    for level in range(levels - 1):
        inner = f"[{inner}]" if level % 2 else f'{{"k":{inner}}}'
    return f'{{"type":"vitals","vitals":{inner}}}'.encode()


def test_nesting_up_to_the_limit_passes_and_one_more_is_refused():
    assert p.depth(json.loads(nested(16))) == 16
    assert p.decode_body(nested(16))["type"] == "vitals"
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(nested(17))
    assert info.value.code == p.E_BAD_FRAME
    assert info.value.message == "frame nests JSON deeper than 16"


def test_many_flat_brackets_are_not_deep():
    flat = {"type": "vitals", "vitals": {f"k{i}": [i] for i in range(40)}}
    assert p.decode_body(json.dumps(flat).encode())["vitals"]["k3"] == [3]


def test_depth_counts_levels_and_stops_past_its_limit():
    assert p.depth(5) == 0
    assert p.depth({}) == 1 and p.depth([]) == 1
    assert p.depth({"a": [1, {"b": 2}], "c": 2}) == 3
    assert p.depth({"a": [1, {"b": []}], "c": 2}) == 4
    assert p.depth([[[[1]]]], limit=2) == 3
    assert p.depth([[[[1]]]]) == 4


def test_validate_accepts_booleans_only_where_the_schema_does():
    assert p.decode_body(b'{"type":"reply","id":1,"ok":false}')["ok"] is False
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(b'{"type":"reply","id":true,"ok":false}')
    assert info.value.message == "reply message needs field 'id' of type int"
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(b'{"type":"heartbeat","seq":1,"sent_at":"x"}')
    assert info.value.message == "heartbeat message needs field 'sent_at' of type int/float"


def test_an_unknown_type_is_named_but_cut_to_40_characters():
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(json.dumps({"type": "z" * 100}).encode())
    assert info.value.code == p.E_UNKNOWN_TYPE
    assert info.value.message == f"unknown message type {'z' * 40!r}"


def test_protocol_error_carries_code_and_message():
    error = p.ProtocolError("c", "m")
    assert (error.code, error.message, str(error)) == ("c", "m", "m")


def test_nonces_are_fresh_16_byte_hex():
    nonces = {p.new_nonce() for _ in range(50)}
    assert len(nonces) == 50
    assert all(len(bytes.fromhex(nonce)) == 16 for nonce in nonces)


def test_make_adds_the_type_and_keeps_the_fields():
    frame = p.make(p.QUERY, id=7, what="cluster")
    assert p.HEADER.unpack(frame[:4])[0] == len(frame) - 4
    assert frame[4:] == b'{"id":7,"what":"cluster","type":"query"}'
    assert p.decode_body(frame[4:]) == {"id": 7, "what": "cluster", "type": "query"}


# ------------------------------------------------- what the first mutation run found


def test_a_frame_of_exactly_the_limit_is_taken_when_it_arrives_in_pieces():
    decoder = p.FrameDecoder(max_frame_size=200)
    frame = p.HEADER.pack(200) + body_of(200)
    assert decoder.feed(frame[:3]) == []
    assert decoder.feed(frame[3:]) == [frame[4:]]


def test_frame_decoder_fast_path_keeps_the_start_of_the_next_frame():
    decoder = p.FrameDecoder()
    assert decoder.feed(p.HEADER.pack(3) + b"abc" + b"\x00") == [b"abc"]
    assert decoder.pending == 1
    assert decoder.feed(b"\x00\x00\x02xy") == [b"xy"]


def test_frame_decoder_never_takes_the_fast_path_over_pending_bytes():
    """A pending header: the next read is that frame's body even if it looks like a frame."""
    decoder = p.FrameDecoder()
    assert decoder.feed(p.HEADER.pack(8)) == []
    inner = p.HEADER.pack(4) + b"abcd"
    assert decoder.feed(inner) == [inner]


def test_nesting_of_exactly_the_limit_passes_among_many_brackets():
    """More than MAX_DEPTH brackets make the parser walk the value: 16 levels still pass."""
    deep = json.loads(nested(16))
    deep["vitals"]["flat"] = [[1], [2], [3]]
    body = json.dumps(deep).encode()
    assert body.count(b"[") + body.count(b"{") > p.MAX_DEPTH
    assert p.decode_body(body)["vitals"]["flat"] == [[1], [2], [3]]


def test_a_long_infinite_number_is_cut_to_20_characters_in_the_message():
    digits = "1" + "0" * 400
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(f'{{"type":"heartbeat","seq":1,"sent_at":{digits}.5}}'.encode())
    assert info.value.message == (
        f"frame is not valid here: number {digits[:20]}... is out of range (not finite)"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "frame is not a JSON object"),
        (b'{"type": 1}', "message has no string field 'type'"),
    ],
)
def test_validate_names_the_fault_exactly(body, message):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(body)
    assert (info.value.code, info.value.message) == (p.E_BAD_MESSAGE, message)


def test_a_peer_closing_is_named_exactly(pair):
    ours, theirs = pair
    ours.close()
    with pytest.raises(p.DisconnectionError) as info:
        p.recv_message(theirs)
    assert str(info.value) == "connection closed by peer"


def test_mac_input_never_raises_on_a_lone_surrogate():
    assert p.mac_input("\ud800") == b"12:rpicluster/2,3:\xed\xa0\x80,"


def test_macs_equal_never_raises_on_non_ascii():
    mac = p.welcome_mac(SECRET, "CN", "SN")
    assert p.macs_equal(mac, "é" * 64) is False


def test_handshake_logs_the_details_it_drops(pair, caplog):
    ours, theirs = pair
    caplog.set_level("WARNING", logger="rpicluster")

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        p.recv_message(ours)
        p.send_frame(ours, p.make(p.ERROR, code=p.E_AUTH_FAILED, message="no"))

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    with pytest.raises(p.ProtocolError):
        handshake(theirs, details={"hostname": "pi", "bad\x00key": 1})
    thread.join(5)
    assert any("details key 'bad\\x00key' dropped" in r.getMessage() for r in caplog.records)


def test_handshake_applies_its_frame_limit_to_the_welcome_too(pair):
    ours, theirs = pair

    def master() -> None:
        p.send_frame(ours, p.make(p.CHALLENGE, protocol=2, nonce="SN"))
        hello = p.recv_message(ours)
        mac = p.welcome_mac(SECRET, hello["nonce"], "SN")
        p.send_frame(ours, p.make(p.WELCOME, protocol=2, mac=mac, master={"pad": "x" * 100}))

    thread = threading.Thread(target=master, daemon=True)
    thread.start()
    with pytest.raises(p.ProtocolError) as info:
        handshake(theirs, max_frame_size=100)
    thread.join(5)
    assert info.value.code == p.E_FRAME_TOO_LARGE
