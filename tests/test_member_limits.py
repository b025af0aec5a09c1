"""The limits of docs/protocol.md section 12, unit by unit (no sockets).

The strict parser (finite numbers, integer range, nesting), the member-data
checks and their cleaning of old databases, the admission table's caps and
eviction choice, and a node trimmed to fit a reply.
"""

from __future__ import annotations

import json

import pytest

from rpicluster import memberdata as md
from rpicluster import protocol as p
from rpicluster.master.admission import Admission
from rpicluster.master.queries import fit_node
from rpicluster.master.registry import Registry


@pytest.mark.parametrize(
    "body",
    [
        b'{"type":"vitals","vitals":{"x":1e400}}',  # inf in Python's json
        b'{"type":"vitals","vitals":{"x":-1e400}}',
        b'{"type":"vitals","vitals":{"x":Infinity}}',
        b'{"type":"vitals","vitals":{"x":NaN}}',
        b'{"type":"vitals","vitals":{"x":9007199254740993}}',
        b'{"type":"vitals","vitals":{"x":-9007199254740993}}',
        b'{"type":"vitals","vitals":{"x":' + b"9" * 400 + b"}}",
        b'{"type":"vitals","vitals":{"x":' + b"1" * 100000 + b"}}",
        b'{"a":' * 17 + b"1" + b"}" * 17,  # 17 levels of objects (the body is level 1)
    ],
)
def test_strict_parser_refuses_every_out_of_range_value(body):
    with pytest.raises(p.ProtocolError) as info:
        p.parse_body(body)
    assert info.value.code == p.E_BAD_FRAME


def test_strict_parser_accepts_the_edges():
    assert p.parse_body(b'{"x":9007199254740992,"y":-9007199254740992}')["x"] == 2**53
    assert p.parse_body(b'{"x":1.7976931348623157e308}')["x"] > 1e308
    deep = b'{"a":' * 16 + b"1" + b"}" * 16  # 16 levels: the limit
    assert p.depth(p.parse_body(deep)) == 16
    # Many brackets inside strings are not nesting.
    assert p.parse_body(b'{"s":"' + b"[" * 100 + b'"}')["s"] == "[" * 100


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("rpi-01", True),
        ("Küche Pi ☃", True),
        ("a\nb", False),
        ("\x1b[31mred", False),
        ("tab\there", False),
        ("\x7f", False),
        ("\x85", False),
        ("\u2028", False),
        ("\u202e", False),
        ("\ud800", False),
        (" lead", False),
        ("trail ", False),
        ("", False),
    ],
)
def test_name_policy(text, ok):
    assert (md.check_name(text, 64) == "") is ok


def test_details_limits():
    assert md.check_details({"hostname": "pi", "groups": ["a", "b"], "n": 1, "x": None}) == ""
    assert "8192" in md.check_details({f"k{i}": "x" * 250 for i in range(40)})
    assert "256" in md.check_details({"k": "x" * 257})
    assert "64" in md.check_details({"k": list(range(65))})
    assert "deeper" in md.check_details({"a": {"b": {"c": {"d": {}}}}})  # 5 levels
    assert md.check_details({"a": {"b": {"c": {"d": 1}}}}) == ""  # 4 levels
    assert "name" in md.check_details({"hostname": "evil\nhost"})
    assert md.check_details({"groups": ["ok", "\x1b"]})
    assert md.check_details({"x": "\ud800"})
    assert md.check_details({"x": 2**60})
    assert md.check_details({"x": float("inf")})
    assert md.check_details([1]) == "details must be a JSON object"


def test_vitals_limits():
    assert md.check_vitals({"ts": 1.5, "cpu_percent": 3, "temperature": None}) == ""
    assert md.check_vitals({"CPU": 1})
    assert md.check_vitals({"x" * 65: 1})
    assert md.check_vitals({"a": "3"})
    assert md.check_vitals({"a": True})
    assert md.check_vitals({"a": [1]})
    assert md.check_vitals({"a": float("nan")})
    assert md.check_vitals({"a": 2**54})
    assert md.check_vitals({f"k{i}": 1 for i in range(65)})


def test_cleaning_keeps_the_good_and_drops_the_bad():
    details = {"hostname": "pi\x1b", "os": "trixie", "big": 10**400, "deep": [[[[1]]]]}
    assert md.clean_details(details) == {"os": "trixie"}
    assert md.clean_details({f"k{i}": "x" * 250 for i in range(40)}) == {}
    assert md.clean_details("nope") == {}
    assert md.clean_vitals({"a": float("inf"), "b": 1, "C": 2}) == {"b": 1}
    assert md.clean_vitals({"a": "x"}) is None
    errors = {"basic": {"count": -3, "last": "a\nb\ud800"}, "\x00": {"count": 1, "last": ""}}
    assert md.clean_action_errors(errors) == {"basic": {"count": 0, "last": "a\ufffdb\ufffd"}}
    assert md.clean_text("x" * 5000) == "x" * 2000


def test_registry_loads_a_poisoned_database_without_failing():
    registry = Registry(2.5, 5.0)
    rows = [
        {
            "node_id": "good",
            "hostname": "h\nforged log line",
            "address": "10.0.0.1",
            "roles": ["basic", "\x1b[2J", 5],
            "state": "alive",
            "last_seen": float("inf"),
            "details": {"hostname": "\ud800", "boot_time": -1e300, "n": 10**400},
            "vitals": {"load_1": float("nan"), "ts": 1.0},
            "action_errors": {"basic": {"count": "many", "last": 7}},
        },
        {"node_id": "bad\nid", "state": "alive"},
        {"node_id": None},
        "not even a dict",
        {"node_id": "sparse"},
    ]
    registry.load(rows)  # type: ignore[arg-type]
    assert sorted(registry.nodes) == ["good", "sparse"]
    node = registry.nodes["good"]
    assert node.hostname == "10.0.0.1"  # the stored hostname was bad
    assert node.roles == ["basic"]
    assert node.details == {"boot_time": -1e300}
    assert node.vitals == {"ts": 1.0}
    assert node.action_errors == {"basic": {"count": 0, "last": "7"}}
    assert node.seen is None
    for node in registry.nodes.values():
        json.dumps(registry.node_dict(node), allow_nan=False)  # every view is valid JSON


def test_admission_caps_and_eviction_choice():
    class Conn:
        def __init__(self, address):
            self.address = address

    table = Admission(max_connections=20, max_pending=4, max_pending_per_address=3)
    attacker = [Conn("10.0.0.66") for _ in range(3)]
    for conn in attacker:
        assert table.refuse_reason(conn.address) == ""
        assert table.admit(conn, conn.address) is None
    assert "10.0.0.66" in table.refuse_reason("10.0.0.66")  # per-address cap
    other = Conn("10.0.0.7")
    assert table.admit(other, other.address) is None
    client = Conn("10.0.0.8")
    # Full: the oldest pending connection of the biggest holder goes, not the others.
    assert table.admit(client, client.address) is attacker[0]
    assert table.pending == 4 and table.open == 5
    table.authenticated(client)
    assert table.pending == 3
    table.release(attacker[0])
    table.release(client)
    assert table.open == 3
    for conn in attacker[1:] + [other]:
        table.release(conn)
    assert table.open == 0 and table.pending == 0 and table.by_address == {}
    table.open = 20
    assert "20 connections open" in table.refuse_reason("10.0.0.9")


def test_a_node_too_big_for_a_reply_is_trimmed():
    node = {
        "node_id": "n",
        "roles": ["r" * 200] * 32,
        "details": {"k": "x" * 9000},
        "vitals": {"a": 1},
        "action_errors": {},
    }
    assert json.loads(fit_node(node, 100000)) == node
    trimmed = json.loads(fit_node(node, 8000))
    assert trimmed["truncated"] is True and trimmed["details"] == {}
    assert len(trimmed["roles"]) == 32
    smaller = json.loads(fit_node(node, 1000))
    assert smaller["roles"] == [] and smaller["vitals"] is None
