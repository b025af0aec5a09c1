"""The registry's state machine, driven by an injected clock (no sleeping)."""

from __future__ import annotations

import pytest

from rpicluster.master.registry import ALIVE, DEAD, LEFT, SUSPECT, Registry
from tests.helpers import Clock


class Conn:
    """Stands in for a server connection: registry only stores it."""


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    return Registry(suspect_after=2.5, dead_after=5.0, clock=clock, wall=lambda: clock.now + 1e9)


def test_join_is_alive_with_details(registry):
    session, old = registry.register("n1", "basic", "10.0.0.2", {"hostname": "pi"}, Conn())
    assert old is None
    node = registry.node_dict(registry.nodes["n1"])
    assert node["state"] == ALIVE and node["connected"] is True
    assert node["hostname"] == "pi" and node["address"] == "10.0.0.2"
    assert node["last_seen"] == pytest.approx(1e9 + 1000.0)
    assert node["connected_since"] == node["last_seen"]
    assert "n1" in registry.dirty


def test_hostname_falls_back_to_address(registry):
    registry.register("n1", "basic", "10.0.0.2", {}, Conn())
    assert registry.nodes["n1"].hostname == "10.0.0.2"


def test_silence_makes_suspect_then_dead_and_closes(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 2.4
    assert registry.sweep() == []
    assert registry.nodes["n1"].state == ALIVE
    clock.now += 0.2
    assert registry.sweep() == []
    assert registry.nodes["n1"].state == SUSPECT
    clock.now += 2.5
    assert registry.sweep() == [session]
    node = registry.nodes["n1"]
    assert node.state == DEAD and not node.sessions
    # The swept connection closing later changes nothing.
    assert registry.disconnect(session, goodbye=False) is False
    assert node.state == DEAD


def test_heartbeat_brings_a_suspect_back(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 3
    registry.sweep()
    assert registry.nodes["n1"].state == SUSPECT
    registry.heard(session)
    assert registry.nodes["n1"].state == ALIVE
    clock.now += 3
    registry.sweep()
    assert registry.nodes["n1"].state == SUSPECT


def test_close_without_goodbye_is_dead_goodbye_is_left(registry):
    s1, _ = registry.register("n1", "basic", "a", {}, Conn())
    s2, _ = registry.register("n2", "basic", "a", {}, Conn())
    assert registry.disconnect(s1, goodbye=False) is True
    assert registry.nodes["n1"].state == DEAD
    assert registry.disconnect(s2, goodbye=True) is True
    assert registry.nodes["n2"].state == LEFT
    assert registry.node_dict(registry.nodes["n2"])["connected_since"] is None


def test_a_node_is_as_alive_as_its_best_role(registry, clock):
    basic, _ = registry.register("n1", "basic", "a", {}, Conn())
    vitals, _ = registry.register("n1", "vitals", "a", {}, Conn())
    assert registry.nodes["n1"].roles == ["basic", "vitals"]
    registry.disconnect(basic, goodbye=False)
    assert registry.nodes["n1"].state == ALIVE
    # One role thread silent while another talks: only its session is dropped.
    basic, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 5.5
    registry.heard(vitals)
    assert registry.sweep() == [basic]
    assert registry.nodes["n1"].state == ALIVE
    assert list(registry.nodes["n1"].sessions) == ["vitals"]


def test_newest_session_for_a_role_wins(registry):
    first, _ = registry.register("n1", "basic", "a", {}, Conn())
    second, old = registry.register("n1", "basic", "b", {}, Conn())
    assert old is first
    assert registry.disconnect(first, goodbye=False) is False
    assert registry.nodes["n1"].state == ALIVE
    assert registry.nodes["n1"].address == "b"


def test_vitals_and_action_errors(registry, clock):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    registry.vitals(session, {"cpu_percent": 5.0})
    registry.vitals(session, {"ts": 5.0, "cpu_percent": 6.0})
    node = registry.nodes["n1"]
    assert node.vitals == {"ts": 5.0, "cpu_percent": 6.0}
    points = registry.take_vitals()
    assert [(nid, ts) for nid, ts, _ in points] == [("n1", pytest.approx(1e9 + 1000)), ("n1", 5.0)]
    assert registry.take_vitals() == []
    registry.action_error(session, "ZeroDivisionError: x", 3)
    assert node.action_errors == {"vitals": {"count": 3, "last": "ZeroDivisionError: x"}}


def test_loaded_nodes_keep_state_for_a_grace_period(registry, clock):
    rows = [
        {
            "node_id": nid,
            "hostname": nid,
            "address": "a",
            "roles": ["basic"],
            "state": state,
            "last_seen": 1e9 + 990,
            "details": {},
            "vitals": None,
            "action_errors": {},
        }
        for nid, state in (("n1", ALIVE), ("n2", LEFT), ("n3", ALIVE))
    ]
    registry.load(rows)
    assert registry.node_dict(registry.nodes["n1"])["connected"] is False
    assert registry.node_dict(registry.nodes["n1"])["last_seen"] == pytest.approx(1e9 + 990)
    clock.now += 4.9
    registry.sweep()
    assert [registry.nodes[n].state for n in ("n1", "n2", "n3")] == [ALIVE, LEFT, ALIVE]
    registry.register("n3", "basic", "a", {}, Conn())
    clock.now += 0.2
    registry.sweep()
    assert [registry.nodes[n].state for n in ("n1", "n2", "n3")] == [DEAD, LEFT, ALIVE]


def test_dirty_rows_and_last_seen_rows(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {"hostname": "pi"}, Conn())
    rows = registry.take_dirty_rows()
    assert [row[0] for row in rows] == ["n1"]
    assert registry.take_dirty_rows() == []
    clock.now += 1
    registry.heard(session)  # heartbeats do not dirty the row ...
    assert registry.take_dirty_rows() == []
    # ... their time is written in batches instead.
    assert registry.last_seen_rows() == [(pytest.approx(1e9 + 1001), "n1")]


def test_a_late_sweep_does_not_blame_nodes_for_the_masters_own_lag(registry, clock):
    # The loop read this heartbeat at the start of an iteration that then took 2 s.
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 5.5
    assert registry.sweep(grace=2.0) == []
    assert registry.nodes["n1"].state == SUSPECT
    assert registry.sweep(grace=0.0) == [session]
    assert registry.nodes["n1"].state == DEAD
