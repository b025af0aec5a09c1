"""The registry at its edges: sweeps at the exact limits, per-state counts, hostname
fallbacks, forgetting and loading odd rows. An injected clock, no sleeping."""

from __future__ import annotations

import json
import logging

import pytest

from rpicluster.master.registry import ALIVE, DEAD, LEFT, SUSPECT, Registry, node_label
from tests.helpers import Clock

WALL = 1_700_000_000.0


class Conn:
    """Stands in for a server connection: the registry only stores it."""


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    # powers of two: every sum below is exact in binary floating point
    return Registry(suspect_after=2.5, dead_after=5.0, clock=clock, wall=lambda: clock.now + WALL)


def test_sweep_at_exactly_suspect_after_keeps_the_node_alive(registry, clock):
    registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 2.5
    assert registry.sweep() == []
    assert registry.nodes["n1"].state == ALIVE
    clock.now += 0.125
    registry.sweep()
    assert registry.nodes["n1"].state == SUSPECT


def test_sweep_at_exactly_dead_after_keeps_the_connection(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 5.0
    assert registry.sweep() == []
    assert registry.nodes["n1"].state == SUSPECT
    assert registry.nodes["n1"].sessions == {"basic": session}
    clock.now += 0.125
    assert registry.sweep() == [session]
    node = registry.nodes["n1"]
    assert node.state == DEAD and node.connected_at is None
    assert node not in registry.watch


def test_a_suspect_node_going_silent_longer_stays_suspect_until_dead(registry, clock):
    registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 3.0
    registry.sweep()
    registry.dirty.clear()
    clock.now += 1.0
    registry.sweep()
    assert registry.nodes["n1"].state == SUSPECT
    assert registry.dirty == set()  # no state change, nothing to store


def test_one_silent_role_is_dropped_at_dead_after_not_before(registry, clock):
    quiet, _ = registry.register("n1", "basic", "a", {}, Conn())
    chatty, _ = registry.register("n1", "vitals", "a", {}, Conn())
    clock.now += 5.0
    registry.heard(chatty)
    assert registry.sweep() == []
    assert set(registry.nodes["n1"].sessions) == {"basic", "vitals"}
    clock.now += 0.125
    assert registry.sweep() == [quiet]
    assert registry.nodes["n1"].sessions == {"vitals": chatty}
    assert registry.nodes["n1"].state == ALIVE


def test_the_sweep_grace_is_never_negative(registry, clock):
    registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 3.0
    registry.sweep(grace=-10.0)
    assert registry.nodes["n1"].state == SUSPECT
    clock.now += 2.5  # 5.5 s of silence, but the sweep itself ran 1 s late
    assert registry.sweep(grace=1.0) == []
    assert registry.nodes["n1"].state == SUSPECT


def test_a_loaded_node_is_kept_until_exactly_its_grace_ends(registry, clock):
    registry.load([{"node_id": "n1", "state": ALIVE, "last_seen": WALL + 990.0}])
    node = registry.nodes["n1"]
    assert node.grace_until == 1005.0 and node in registry.watch
    clock.now = 1004.875
    registry.sweep()
    assert node.state == ALIVE
    clock.now = 1005.0
    registry.sweep()
    assert node.state == DEAD and node not in registry.watch


def test_a_loaded_suspect_node_is_watched_and_a_dead_one_is_not(registry):
    registry.load(
        [
            {"node_id": "s", "state": SUSPECT},
            {"node_id": "d", "state": DEAD},
            {"node_id": "l", "state": LEFT},
            {"node_id": "x", "state": "confused"},
        ]
    )
    assert {node.node_id for node in registry.watch} == {"s"}
    assert registry.nodes["s"].grace_until == 1005.0
    assert registry.nodes["d"].grace_until is None
    assert registry.nodes["x"].state == DEAD
    assert registry.nodes["l"].state == LEFT


def test_counts_per_state(registry, clock):
    assert registry.counts() == {ALIVE: 0, SUSPECT: 0, DEAD: 0, LEFT: 0}
    sessions = {}
    for name in ("a1", "a2", "s1", "d1", "l1", "l2", "l3"):
        sessions[name], _ = registry.register(name, "basic", "10.0.0.1", {}, Conn())
    registry.disconnect(sessions["d1"], goodbye=False)
    for name in ("l1", "l2", "l3"):
        registry.disconnect(sessions[name], goodbye=True)
    clock.now += 3.0
    registry.heard(sessions["a1"])
    registry.heard(sessions["a2"])
    registry.sweep()
    assert registry.counts() == {ALIVE: 2, SUSPECT: 1, DEAD: 1, LEFT: 3}


@pytest.mark.parametrize("hostname", ["", None, 42, ["pi"]])
def test_an_empty_or_non_string_hostname_falls_back_to_the_address(registry, hostname):
    registry.register("n1", "basic", "10.0.0.7", {"hostname": hostname}, Conn())
    node = registry.nodes["n1"]
    assert node.hostname == "10.0.0.7"
    assert registry.node_dict(node)["hostname"] == "10.0.0.7"
    assert node_label(node) == "10.0.0.7"


def test_a_stored_row_without_a_usable_hostname_shows_the_address(registry):
    registry.load(
        [
            {"node_id": "n1", "address": "10.0.0.8", "details": {"hostname": ""}},
            {"node_id": "n2", "address": "10.0.0.9", "details": {"hostname": "pi-9"}},
            {"node_id": "n3", "address": 17, "details": {}},
        ]
    )
    assert registry.nodes["n1"].hostname == "10.0.0.8"
    assert registry.nodes["n2"].hostname == "pi-9"
    assert registry.nodes["n3"].hostname == "" and registry.nodes["n3"].address == ""


def test_a_rejoin_without_details_keeps_the_known_ones(registry):
    first, _ = registry.register("n1", "basic", "10.0.0.2", {"hostname": "pi"}, Conn())
    registry.disconnect(first, goodbye=True)
    registry.register("n1", "basic", "10.0.0.3", {}, Conn())
    node = registry.nodes["n1"]
    assert node.details == {"hostname": "pi"} and node.hostname == "pi"
    assert node.address == "10.0.0.3"


def test_a_rejoin_after_all_roles_left_starts_a_new_spell(registry, clock):
    first, _ = registry.register("n1", "basic", "a", {}, Conn())
    registry.register("n1", "vitals", "a", {}, Conn())
    assert registry.nodes["n1"].roles == ["basic", "vitals"]
    clock.now += 1.0
    registry.register("n1", "basic", "a", {}, Conn())  # replaces one role: same spell
    assert registry.nodes["n1"].connected_at == 1000.0
    for session in list(registry.nodes["n1"].sessions.values()):
        registry.disconnect(session, goodbye=False)
    clock.now += 1.0
    registry.register("n1", "vitals", "a", {}, Conn())
    node = registry.nodes["n1"]
    assert node.connected_at == 1002.0
    assert node.roles == ["vitals"]
    assert node.state == ALIVE and node.grace_until is None


def test_a_replaced_session_is_returned_and_its_close_changes_nothing(registry):
    old, _ = registry.register("n1", "basic", "a", {}, Conn())
    new, replaced = registry.register("n1", "basic", "a", {}, Conn())
    assert replaced is old
    assert registry.disconnect(old, goodbye=False) is False
    assert registry.nodes["n1"].state == ALIVE
    assert registry.disconnect(new, goodbye=True) is True
    assert registry.nodes["n1"].state == LEFT


def test_closing_one_of_two_roles_leaves_the_node_connected(registry):
    basic, _ = registry.register("n1", "basic", "a", {}, Conn())
    registry.register("n1", "vitals", "a", {}, Conn())
    registry.dirty.clear()
    assert registry.disconnect(basic, goodbye=False) is True
    node = registry.nodes["n1"]
    assert node.state == ALIVE and node.connected_at == 1000.0
    assert registry.dirty == set()


def test_heard_moves_the_clock_of_session_and_node(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    clock.now += 1.5
    registry.dirty.clear()
    registry.heard(session)
    assert session.seen == 1001.5 and registry.nodes["n1"].seen == 1001.5
    assert registry.dirty == set()  # alive stays alive: nothing to write


def test_vitals_without_a_numeric_ts_get_the_wall_time(registry, clock):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    registry.take_vitals()
    clock.now = 1001.25
    for ts in (None, True, "soon"):
        registry.vitals(session, {"cpu": 1.0, "ts": ts})
    registry.vitals(session, {"cpu": 2.0, "ts": 5})
    points = registry.take_vitals()
    assert [point[1] for point in points] == [WALL + 1001.25] * 3 + [5.0]
    assert json.loads(points[0][2]) == {"cpu": 1.0, "ts": WALL + 1001.25}
    assert registry.nodes["n1"].vitals == {"cpu": 2.0, "ts": 5}
    assert registry.take_vitals() == []


def test_action_errors_keep_the_last_per_role(registry):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    registry.dirty.clear()
    registry.action_error(session, "first", 1)
    registry.action_error(session, "second", 2)
    assert registry.nodes["n1"].action_errors == {"basic": {"count": 2, "last": "second"}}
    assert registry.dirty == {"n1"}


def test_find_by_id_then_by_name(registry):
    registry.register("id-1", "basic", "a", {"hostname": "pi"}, Conn())
    registry.register("id-2", "basic", "b", {"hostname": "pi"}, Conn())
    registry.register("id-3", "basic", "c", {"hostname": "other", "node_name": "web"}, Conn())
    assert [node.node_id for node in registry.find("id-1")] == ["id-1"]
    assert sorted(node.node_id for node in registry.find("pi")) == ["id-1", "id-2"]
    assert [node.node_id for node in registry.find("web")] == ["id-3"]
    assert registry.find("nobody") == []


def test_forget_detaches_the_node_and_its_history(registry):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    registry.register("n2", "vitals", "b", {}, Conn())
    registry.vitals(session, {"ts": 1.0})
    registry.vitals(registry.nodes["n2"].sessions["vitals"], {"ts": 2.0})
    assert registry.forget("n1") == [session]
    assert "n1" not in registry.nodes and "n1" not in registry.dirty
    assert all(node.node_id != "n1" for node in registry.watch)
    assert [point[0] for point in registry.take_vitals()] == ["n2"]
    assert registry.disconnect(session, goodbye=False) is False
    assert registry.forget("n1") == []


def test_stale_counts_silence_up_to_exactly_forget_after(registry, clock):
    gone, _ = registry.register("gone", "basic", "a", {}, Conn())
    registry.register("here", "basic", "b", {}, Conn())
    registry.disconnect(gone, goodbye=True)
    registry.load([{"node_id": "old", "state": DEAD}])
    clock.now += 100.0
    assert registry.stale(100.0) == []
    assert registry.stale(0) == [] and registry.stale(-1) == []
    clock.now += 0.125
    assert sorted(registry.stale(100.0)) == ["gone", "old"]


def test_rows_and_dicts_carry_every_field(registry, clock):
    session, _ = registry.register("n1", "vitals", "10.0.0.2", {"hostname": "pi"}, Conn())
    registry.vitals(session, {"ts": 3.0, "cpu": 9})
    registry.action_error(session, "boom", 1)
    clock.now += 1.0
    registry.heard(session)
    node = registry.nodes["n1"]
    row = registry.row(node)
    assert row == (
        "n1",
        "pi",
        "10.0.0.2",
        '["vitals"]',
        ALIVE,
        WALL + 1001.0,
        '{"hostname": "pi"}',
        '{"ts": 3.0, "cpu": 9}',
        '{"vitals": {"count": 1, "last": "boom"}}',
    )
    assert registry.take_dirty_rows() == [row]
    assert registry.take_dirty_rows() == []
    assert registry.last_seen_rows() == [(WALL + 1001.0, "n1")]
    view = registry.node_dict(node)
    expected = {
        "node_id": "n1",
        "hostname": "pi",
        "address": "10.0.0.2",
        "roles": ["vitals"],
        "state": ALIVE,
        "connected": True,
        "last_seen": WALL + 1001.0,
        "connected_since": WALL + 1000.0,
        "details": {"hostname": "pi"},
        "vitals": {"ts": 3.0, "cpu": 9},
        "action_errors": {"vitals": {"count": 1, "last": "boom"}},
    }
    assert {key: view[key] for key in expected} == expected
    registry.disconnect(session, goodbye=True)
    assert registry.last_seen_rows() == []
    assert registry.row(node)[7] == '{"ts": 3.0, "cpu": 9}'
    fresh = registry.nodes.setdefault("n9", type(node)("n9"))
    assert registry.row(fresh) == ("n9", "", "", "[]", DEAD, None, "{}", None, "{}")


def test_wall_times_follow_the_wall_clock_at_each_sweep(clock):
    wall = {"offset": WALL}
    registry = Registry(2.5, 5.0, clock=clock, wall=lambda: clock.now + wall["offset"])
    registry.register("n1", "basic", "a", {}, Conn())
    assert registry.to_wall(1000.0) == WALL + 1000.0
    assert registry.to_wall(None) is None
    wall["offset"] += 60.0  # NTP set the clock a minute forward
    assert registry.to_wall(1000.0) == WALL + 1000.0
    registry.sweep()
    assert registry.to_wall(1000.0) == WALL + 1060.0
    assert registry.to_wall(1000.0004) == WALL + 1060.0
    assert registry.to_wall(1000.25) == WALL + 1060.25


def test_loading_places_last_seen_on_the_monotonic_clock(registry):
    registry.load(
        [
            {"node_id": "n1", "state": DEAD, "last_seen": WALL + 900.0},
            {"node_id": "n2", "state": DEAD, "last_seen": True},
            {"node_id": "n3", "state": DEAD, "last_seen": float("inf")},
            {"node_id": "", "state": DEAD},
            {"node_id": "n4", "roles": ["basic", 7, "vitals"]},
        ]
    )
    assert registry.nodes["n1"].seen == 900.0
    assert registry.nodes["n2"].seen is None and registry.nodes["n3"].seen is None
    assert "" not in registry.nodes
    assert registry.nodes["n4"].roles == ["basic", "vitals"]


def test_loading_skips_rows_of_any_shape_and_says_how_many(registry, caplog):
    caplog.set_level("WARNING", logger="rpicluster.master")
    registry.load([{"node_id": "ok"}, {"node_id": None}, "not a row", {"node_id": "x" * 10_000}])
    assert list(registry.nodes) == ["ok"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["3 stored nodes skipped: no valid node id"]


def test_every_change_of_a_stored_field_marks_the_node_dirty(registry, clock):
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    registry.dirty.clear()
    registry.register("n1", "vitals", "a", {}, Conn())  # a new role: the row's roles change
    assert registry.dirty == {"n1"}
    registry.dirty.clear()
    registry.vitals(session, {"ts": 1.0})
    assert registry.dirty == {"n1"}
    registry.dirty.clear()
    clock.now += 3.0
    registry.sweep()
    assert registry.nodes["n1"].state == SUSPECT and registry.dirty == {"n1"}


def test_vitals_get_the_wall_time_to_the_millisecond(registry, clock):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    clock.now = 1000.0004
    registry.vitals(session, {"cpu": 1})
    assert registry.take_vitals()[0][1] == WALL + 1000.0


def test_one_sweep_handles_every_node_whatever_their_order(registry, clock):
    """Loaded nodes in their grace period and several silent ones: all in one sweep."""
    registry.load([{"node_id": f"loaded-{i}", "state": ALIVE} for i in range(50)])
    for name in ("s1", "s2", "s3"):
        registry.register(name, "basic", "a", {}, Conn())
    clock.now += 5.5
    closed = registry.sweep()
    assert sorted(session.node.node_id for session in closed) == ["s1", "s2", "s3"]
    assert all(registry.nodes[name].state == DEAD for name in ("s1", "s2", "s3"))
    clock.now = 1003.0
    for name in ("s1", "s2", "s3"):
        registry.register(name, "basic", "a", {}, Conn())
    clock.now += 3.0  # past suspect_after, and past the loaded nodes' grace
    registry.sweep()
    assert all(registry.nodes[name].state == SUSPECT for name in ("s1", "s2", "s3"))
    assert all(registry.nodes[f"loaded-{i}"].state == DEAD for i in range(50))


def test_forgetting_a_node_drops_its_pending_points_when_they_are_the_only_ones(registry):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    registry.vitals(session, {"ts": 1.0})
    registry.forget("n1")
    assert registry.take_vitals() == []


def test_stale_counts_from_the_last_message_and_honours_short_limits(registry, clock):
    clock.now = 1050.0
    session, _ = registry.register("n1", "basic", "a", {}, Conn())
    registry.disconnect(session, goodbye=False)
    clock.now = 1051.0
    assert registry.stale(1.0) == []
    clock.now = 1051.125
    assert registry.stale(1.0) == ["n1"]
    clock.now = 1100.0
    assert registry.stale(50.0) == []  # seen at 1050, not at the registry's start (1000)


def test_the_load_skips_are_logged_at_debug_with_the_reason(registry, caplog):
    caplog.set_level(logging.DEBUG, logger="rpicluster.master")
    registry.load(["not a row"])
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug == [
        "stored node row skipped: AttributeError(\"'str' object has no attribute 'get'\")"
    ]


def test_a_node_name_that_is_not_text_is_ignored(registry):
    registry.register("n1", "basic", "a", {"hostname": "pi", "node_name": 5}, Conn())
    assert node_label(registry.nodes["n1"]) == "pi"
    registry.register("n2", "basic", "b", {"hostname": "pi2", "node_name": ""}, Conn())
    assert node_label(registry.nodes["n2"]) == "pi2"


def test_a_stored_address_must_be_short_printable_text(registry):
    from rpicluster import memberdata as md

    longest = "a" * md.MAX_STRING
    registry.load(
        [
            {"node_id": "ok", "address": longest},
            {"node_id": "long", "address": longest + "a"},
            {"node_id": "ctrl", "address": "10.0.0.1\x00"},
            {"node_id": "num", "address": "10.0.0.4", "details": {"hostname": 42}},
        ]
    )
    assert registry.nodes["ok"].address == longest
    assert registry.nodes["long"].address == "" and registry.nodes["long"].hostname == ""
    assert registry.nodes["ctrl"].address == ""
    assert registry.nodes["num"].hostname == "10.0.0.4"


def test_a_node_bound_to_a_certificate_shows_its_days_left(registry, clock):
    not_after = WALL + 1000.0 + 3000.06 * 86400
    details = {"hostname": "pi", "tls": {"name": "pi-cert", "not_after": not_after}}
    registry.register("n1", "basic", "a", details, Conn())
    view = registry.node_dict(registry.nodes["n1"])
    assert view["tls"] == {"name": "pi-cert", "not_after": not_after, "days_left": 3000.1}
    registry.nodes["n1"].details["tls"] = {"name": "pi-cert", "not_after": True}
    assert registry.node_dict(registry.nodes["n1"])["tls"]["days_left"] is None
    registry.nodes["n1"].details["tls"] = "not a record"
    assert "tls" not in registry.node_dict(registry.nodes["n1"])


def test_the_label_is_the_node_name_before_the_hostname(registry):
    registry.register("n1", "basic", "a", {"hostname": "pi", "node_name": "web"}, Conn())
    registry.register("n2", "basic", "b", {"hostname": "pi-2"}, Conn())
    assert node_label(registry.nodes["n1"]) == "web"
    assert node_label(registry.nodes["n2"]) == "pi-2"


def test_the_alert_rules_see_every_node_whose_vitals_changed_or_that_was_forgotten(registry):
    session, _ = registry.register("n1", "vitals", "a", {}, Conn())
    registry.register("n2", "vitals", "b", {}, Conn())
    registry.changed.clear()
    registry.vitals(session, {"ts": 1.0})
    assert registry.changed == {"n1"}
    registry.forget("n2")
    assert registry.changed == {"n1", "n2"}


def test_a_duplicate_id_holds_for_exactly_its_hold_and_logs_every_ten_minutes(registry, clock):
    from rpicluster.master import registry as registry_module

    hold = registry_module.DUPLICATE_ID_HOLD
    every = registry_module.DUPLICATE_ID_LOG_EVERY
    registry.register("n1", "basic", "a", {}, Conn())
    node = registry.nodes["n1"]
    assert registry.duplicate_id(node) is False
    assert registry.flag_duplicate_id(node, "10.0.0.9") is True
    assert registry.duplicate_id(node) is True
    assert registry.node_dict(node)["duplicate_id_address"] == "10.0.0.9"
    clock.now += hold - 0.125
    assert registry.duplicate_id(node) is True
    clock.now += 0.125
    assert registry.duplicate_id(node) is False
    assert "duplicate_id_address" not in registry.node_dict(node)
    clock.now = 1000.0 + every - 0.125
    assert registry.flag_duplicate_id(node, "10.0.0.9") is False
    clock.now = 1000.0 + every
    assert registry.flag_duplicate_id(node, "10.0.0.9") is True


def test_a_state_change_or_a_join_is_seen_by_the_alert_rules(registry, clock):
    registry.register("n1", "basic", "a", {}, Conn())
    assert registry.changed == {"n1"}
    registry.changed.clear()
    clock.now += 3.0
    registry.sweep()
    assert registry.changed == {"n1"}  # alive -> suspect


def test_a_row_loaded_twice_leaves_only_its_last_name(registry):
    registry.load([{"node_id": "n1", "details": {"hostname": "old-name"}}])
    registry.load([{"node_id": "n1", "details": {"hostname": "new-name"}}])
    assert registry.find("old-name") == []
    assert [node.node_id for node in registry.find("new-name")] == ["n1"]


def test_another_process_holds_an_id_until_exactly_suspect_after_of_silence(registry, clock):
    registry.register("n1", "basic", "a", {}, Conn(), instance="first")
    assert registry.holder("n1", "first") is None  # the same process reconnecting
    assert registry.holder("n1", None) is None  # a slave without a token never conflicts
    assert registry.holder("n1", "copy") is registry.nodes["n1"]
    clock.now += 2.5
    assert registry.holder("n1", "copy") is registry.nodes["n1"]
    clock.now += 0.125
    assert registry.holder("n1", "copy") is None  # silent too long: the id is taken back
