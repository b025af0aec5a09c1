"""The wire codec, the incremental frame decoder and the HMAC handshake strings."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import struct
import threading

import pytest

from rpicluster import protocol as p


def test_encode_is_length_header_plus_compact_json():
    frame = p.make(p.HEARTBEAT, seq=1, sent_at=2.5)
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert json.loads(frame[4:]) == {"type": "heartbeat", "seq": 1, "sent_at": 2.5}
    assert b" " not in frame[4:]


def test_encode_refuses_nan():
    with pytest.raises(ValueError):
        p.make(p.VITALS, vitals={"cpu": float("nan")})


def test_decode_roundtrip_of_every_schema():
    samples = {
        p.CHALLENGE: {"protocol": 1, "nonce": "ab"},
        p.HELLO: {
            "protocol": 1,
            "kind": "slave",
            "node_id": "n",
            "role": "basic",
            "nonce": "cd",
            "mac": "ef",
        },
        p.WELCOME: {"protocol": 1, "mac": "00", "master": {}},
        p.HEARTBEAT: {"seq": 3, "sent_at": 1},
        p.HEARTBEAT_ACK: {"seq": 3},
        p.VITALS: {"vitals": {"ts": 1.0}},
        p.ACTION_ERROR: {"error": "boom", "count": 2},
        p.REFUSED: {"code": "bad_vitals", "message": "m", "count": 1},
        p.QUERY: {"id": 1, "what": "cluster"},
        p.REPLY: {"id": 1, "ok": True},
        p.GOODBYE: {"reason": "bye"},
        p.ERROR: {"code": "x", "message": "y"},
    }
    assert set(samples) == set(p.SCHEMAS)
    for msg_type, fields in samples.items():
        frame = p.make(msg_type, **fields)
        assert p.decode_body(frame[4:]) == {**fields, "type": msg_type}


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"{not json", p.E_BAD_FRAME, "not UTF-8 JSON"),
        (b"\xff\xfe", p.E_BAD_FRAME, "not UTF-8 JSON"),
        (b'{"type":"vitals","vitals":{"x":NaN}}', p.E_BAD_FRAME, "NaN"),
        (b"[" * 50000 + b"]" * 50000, p.E_BAD_FRAME, "deeper"),
        (b"[1, 2]", p.E_BAD_MESSAGE, "not a JSON object"),
        (b'{"seq": 1}', p.E_BAD_MESSAGE, "'type'"),
        (b'{"type": "teleport"}', p.E_UNKNOWN_TYPE, "teleport"),
        (b'{"type": "heartbeat", "sent_at": 1}', p.E_BAD_MESSAGE, "'seq'"),
        (b'{"type": "heartbeat", "seq": "1", "sent_at": 1}', p.E_BAD_MESSAGE, "'seq'"),
        (b'{"type": "heartbeat", "seq": true, "sent_at": 1}', p.E_BAD_MESSAGE, "'seq'"),
        (b'{"type": "heartbeat", "seq": 1, "sent_at": false}', p.E_BAD_MESSAGE, "'sent_at'"),
    ],
)
def test_decode_names_the_fault(body, code, words):
    with pytest.raises(p.ProtocolError) as info:
        p.decode_body(body)
    assert info.value.code == code
    assert words in info.value.message


def test_frame_decoder_reassembles_split_and_joined_frames():
    frames = [p.make(p.HEARTBEAT, seq=i, sent_at=0) for i in range(5)]
    stream = b"".join(frames)
    decoder = p.FrameDecoder()
    bodies = []
    for i in range(0, len(stream), 3):  # 3-byte chunks split headers and bodies
        bodies += decoder.feed(stream[i : i + 3])
    assert [p.decode_body(b)["seq"] for b in bodies] == list(range(5))
    assert decoder.pending == 0
    assert len(p.FrameDecoder().feed(stream)) == 5


def test_frame_decoder_refuses_oversized_length_before_buffering_the_body():
    decoder = p.FrameDecoder(max_frame_size=1024)
    with pytest.raises(p.ProtocolError) as info:
        decoder.feed(struct.pack(">I", 1025))
    assert info.value.code == p.E_FRAME_TOO_LARGE
    assert "1025" in info.value.message
    with pytest.raises(p.ProtocolError) as info:
        p.FrameDecoder().feed(struct.pack(">I", 0))
    assert info.value.code == p.E_BAD_FRAME


def test_frame_decoder_keeps_a_partial_frame():
    decoder = p.FrameDecoder()
    frame = p.make(p.GOODBYE, reason="x")
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1
    assert decoder.feed(frame[-1:]) == [frame[4:]]


def test_mac_strings_are_the_documented_ones():
    secret = "s" * 16
    text = "12:rpicluster/2,5:hello,2:SN,2:CN,5:slave,4:node,5:basic,"
    expected = hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()
    assert p.hello_mac(secret, "SN", "CN", "slave", "node", "basic") == expected
    # No field boundary is ambiguous: moving a "|" between fields changes the MAC.
    assert p.hello_mac(secret, "SN", "CN", "slave", "a|b", "c") != p.hello_mac(
        secret, "SN", "CN", "slave", "a", "b|c"
    )
    assert p.mac_input("é") == "12:rpicluster/2,2:é,".encode()
    text = "12:rpicluster/2,7:welcome,2:CN,2:SN,"
    expected = hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()
    assert p.welcome_mac(secret, "CN", "SN") == expected
    assert p.macs_equal(expected, expected)
    assert not p.macs_equal(expected, expected[:-1] + "0")
    assert not p.macs_equal("é", expected)


def _fake_master(sock, secret, answer):
    """Serve one handshake on ``sock``: challenge, read hello, then ``answer(hello)``."""
    conn, _ = sock.accept()
    with conn:
        p.send_frame(conn, p.make(p.CHALLENGE, protocol=p.PROTOCOL_VERSION, nonce="SN"))
        hello = p.recv_message(conn)
        p.send_frame(conn, answer(hello))
        conn.recv(1)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (lambda h: p.make(p.ERROR, code=p.E_AUTH_FAILED, message="no"), p.E_AUTH_FAILED),
        (
            lambda h: p.make(p.WELCOME, protocol=p.PROTOCOL_VERSION, mac="0" * 64, master={}),
            p.E_AUTH_FAILED,
        ),
        (lambda h: p.make(p.GOODBYE, reason="x"), p.E_BAD_MESSAGE),
        (
            lambda h: p.make(
                p.WELCOME,
                protocol=p.PROTOCOL_VERSION,
                mac=p.welcome_mac("k" * 16, h["nonce"], "SN"),
                master={},
            ),
            None,
        ),
    ],
)
def test_client_handshake_checks_the_master(answer, code):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        thread = threading.Thread(target=_fake_master, args=(server, "k" * 16, answer))
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if code is None:
                welcome = p.client_handshake(sock, "k" * 16, kind="slave", node_id="n", role="r")
                assert welcome["type"] == p.WELCOME
            else:
                with pytest.raises(p.ProtocolError) as info:
                    p.client_handshake(sock, "k" * 16, kind="slave", node_id="n", role="r")
                assert info.value.code == code
        thread.join(5)
