"""The alert rules of the master (rpicluster/master/alerts.py), driven by a fake clock.

Each rule fires once after ``hold`` seconds and resolves once after ``hold``
seconds clear; flapping inside the hold makes no notification at all.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest

from rpicluster.config import AlertSettings, ConfigError, parse_config
from rpicluster.master import alerts as a
from tests.helpers import Clock


def engine(**over: Any) -> tuple[a.AlertEngine, Clock]:
    clock = Clock()
    settings = dataclasses.replace(AlertSettings(hold=10.0), **over)
    return a.AlertEngine(settings, "master-pi", clock=clock, wall=lambda: clock.now + 1e9), clock


def node(state: str = "alive", vitals: Optional[dict] = None, node_id: str = "n1"):
    return (node_id, f"pi-{node_id}", state, vitals)


def run(
    eng: a.AlertEngine, clock: Clock, nodes: list, seconds: float, store=None, gone=()
) -> list[dict]:
    """Evaluate every second for ``seconds``, ``nodes`` changed at the first; every
    notification made meanwhile."""
    out = []
    for second in range(int(seconds)):
        clock.now += 1
        out += eng.evaluate(list(nodes) if second == 0 else [], store, gone=gone)
    return out


def test_dead_fires_once_after_hold_and_resolves_once():
    eng, clock = engine()
    assert run(eng, clock, [node("alive")], 3) == []
    notes = run(eng, clock, [node("dead")], 30)
    assert [(n["status"], n["alert"]) for n in notes] == [("firing", "node_dead")]
    fired = notes[0]
    assert fired["node_id"] == "n1" and fired["name"] == "pi-n1"
    assert fired["severity"] == "critical" and fired["schema"] == "rpicluster.alert/1"
    assert fired["resolved_at"] is None and fired["master"] == "master-pi"
    assert eng.summary()["firing_count"] == 1
    notes = run(eng, clock, [node("alive")], 30)
    assert [(n["status"], n["alert"]) for n in notes] == [("resolved", "node_dead")]
    assert notes[0]["started_at"] == fired["started_at"] and notes[0]["resolved_at"] is not None
    assert eng.summary() == {"firing": [], "firing_count": 0, "fired_total": 1, "resolved_total": 1}


def test_flapping_inside_the_hold_makes_no_notification():
    eng, clock = engine()
    run(eng, clock, [node("alive")], 1)
    out = []
    for _ in range(10):  # dead 5 s, alive 5 s: never dead for the 10 s hold
        out += run(eng, clock, [node("dead")], 5) + run(eng, clock, [node("alive")], 5)
    assert out == []
    out = run(eng, clock, [node("dead")], 12)
    assert len(out) == 1
    for _ in range(10):  # firing, flapping back to alive for less than the hold
        out += run(eng, clock, [node("alive")], 5) + run(eng, clock, [node("dead")], 5)
    assert [n["status"] for n in out] == ["firing"]


def test_left_is_not_dead_and_suspect_needs_suspect_for():
    eng, clock = engine(suspect_for=60.0)
    assert run(eng, clock, [node("left")], 30) == []
    assert run(eng, clock, [node("suspect")], 59) == []
    notes = run(eng, clock, [node("suspect")], 2)
    assert [n["alert"] for n in notes] == ["node_suspect"] and notes[0]["threshold"] == 60.0


def test_vitals_rules_with_their_thresholds():
    eng, clock = engine(temperature=70.0, disk_free_percent=10.0)
    hot = {"temperature": 71.5, "disk_free": 5, "disk_total": 100, "throttled": 0x50005}
    notes = run(eng, clock, [node("alive", hot)], 11)
    found = {n["alert"]: n for n in notes}
    assert sorted(found) == ["disk_low", "temperature_high", "throttled", "under_voltage"]
    assert found["temperature_high"]["value"] == 71.5
    assert found["temperature_high"]["threshold"] == 70.0
    assert found["disk_low"]["value"] == 5.0
    assert "throttled now" in found["throttled"]["summary"]
    cool = {"temperature": 50.0, "disk_free": 50, "disk_total": 100, "throttled": 0x50000}
    notes = run(eng, clock, [node("alive", cool)], 11)
    assert sorted(n["alert"] for n in notes if n["status"] == "resolved") == sorted(found)


def test_rules_can_be_turned_off_and_junk_vitals_are_ignored():
    eng, clock = engine(temperature=0, disk_free_percent=0, power=False, dead=False)
    bad = {"temperature": 99.0, "disk_free": 0, "disk_total": 100, "under_voltage_alarm": 1}
    assert run(eng, clock, [node("alive", bad), node("dead", node_id="n2")], 30) == []
    eng, clock = engine()
    junk = {"temperature": "hot", "disk_free": True, "disk_total": 0, "throttled": -1}
    assert run(eng, clock, [node("alive", junk)], 30) == []


def test_a_dead_nodes_stale_vitals_neither_fire_nor_resolve():
    eng, clock = engine()
    hot = {"temperature": 95.0}
    assert [n["alert"] for n in run(eng, clock, [node("alive", hot)], 11)] == ["temperature_high"]
    notes = run(eng, clock, [node("dead", hot)], 30)
    assert [(n["status"], n["alert"]) for n in notes] == [("firing", "node_dead")]
    assert eng.summary()["firing_count"] == 2  # the temperature alert is kept, not resolved


def test_a_forgotten_node_resolves_at_once():
    eng, clock = engine()
    run(eng, clock, [node("alive")], 1)
    run(eng, clock, [node("dead")], 11)
    notes = run(eng, clock, [], 1, gone=["n1"])
    assert [(n["status"], n["alert"]) for n in notes] == [("resolved", "node_dead")]
    assert notes[0]["summary"].endswith("(node forgotten)")


def test_nodes_dead_when_the_master_starts_are_shown_but_not_sent():
    eng, clock = engine()
    assert run(eng, clock, [node("dead")], 30) == []
    assert [f["alert"] for f in eng.summary()["firing"]] == ["node_dead"]
    assert run(eng, clock, [node("alive")], 30) == []  # never told, so no resolved either
    assert run(eng, clock, [node("dead")], 11)[0]["status"] == "firing"


def test_only_changed_nodes_are_looked_at_again():
    eng, clock = engine()
    run(eng, clock, [node("alive", node_id="n1"), node("alive", node_id="n2")], 1)
    run(eng, clock, [node("alive", {"temperature": 99.0}, "n1")], 11)
    # n1 is not passed again: its condition still holds until it changes.
    assert run(eng, clock, [], 30) == []
    assert [f["node_id"] for f in eng.firing()] == ["n1"]
    notes = run(eng, clock, [node("alive", {"temperature": 40.0}, "n1")], 11)
    assert [(n["status"], n["node_id"]) for n in notes] == [("resolved", "n1")]


def test_store_failing():
    eng, clock = engine()
    bad = {"ok": False, "error": "database or disk is full"}
    notes = run(eng, clock, [], 11, store=bad)
    assert [n["alert"] for n in notes] == ["store_failing"]
    assert notes[0]["node_id"] is None and "disk is full" in notes[0]["summary"]
    notes = run(eng, clock, [], 11, store={"ok": True})
    assert [n["status"] for n in notes] == ["resolved"]


def test_firing_list_puts_critical_first():
    eng, clock = engine()
    run(eng, clock, [node("alive", {"temperature": 99.0}, "n1")], 20)
    run(eng, clock, [node("dead", None, "n2")], 11)
    assert [f["alert"] for f in eng.firing()] == ["node_dead", "temperature_high"]


def test_alerts_section_is_validated():
    base = f"[cluster]\nsecret = {'s' * 16}\n[master]\n[alerts]\n"
    config = parse_config(base + "webhook_url = https://ntfy.sh/topic\nwebhook_format = text\n")
    assert config.alerts.webhook_url == "https://ntfy.sh/topic"
    assert config.alerts.webhook_format == "text" and config.alerts.hold == 10.0
    assert parse_config(base).alerts == AlertSettings()
    for line, key in [
        ("webhook_url = ftp://x/", "webhook_url"),
        ("webhook_url = http://", "webhook_url"),
        ("webhook_url = http://h:99999/", "webhook_url"),
        ("webhook_format = xml", "webhook_format"),
        ("hold = -1", "hold"),
        ("dead = maybe", "dead"),
        ("temperature = 500", "temperature"),
        ("webhok_url = http://h/", "webhok_url"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config(base + line + "\n", "m.cfg")
        assert f"[alerts] {key}" in str(caught.value)


# ------------------------------------------------------------------ shown


def _master_with_alerts() -> dict[str, Any]:
    eng, clock = engine()
    run(eng, clock, [node("alive", node_id="n1"), node("alive", node_id="n2")], 1)
    run(eng, clock, [node("dead", node_id="n1"), node("alive", {"temperature": 99.0}, "n2")], 11)
    alerts = eng.summary()
    alerts["webhook"] = {"enabled": True, "ok": False, "error": "HTTP 502 Bad Gateway",
                         "target": "https://ntfy.example"}  # fmt: skip
    return {"hostname": "m", "alerts": alerts}


def test_status_table_shows_firing_alerts_and_a_failing_webhook():
    from rpicluster.status import format_table

    lines = format_table({"master": _master_with_alerts(), "nodes": []}).splitlines()
    assert lines[0].endswith("; 2 alert(s) firing; WEBHOOK FAILING: HTTP 502 Bad Gateway")
    assert lines[-2] == "ALERT critical node_dead: node pi-n1 is dead (silent or disconnected)"
    assert lines[-1].startswith("ALERT warning temperature_high: node pi-n2 SoC at 99.0 C")
    older = format_table({"master": {"hostname": "m"}, "nodes": []})
    assert "alert" not in older.lower()


def test_dashboard_banner_and_healthz_show_alerts_and_webhook():
    import time

    from rpicluster.web import api, dashboard
    from rpicluster.web.state import ClusterState

    state = ClusterState(3600)
    snap = state.replace(master=_master_with_alerts(), nodes=[], history={}, fetched_at=time.time())
    page = dashboard.render_dashboard(snap, refresh_interval=2, history_window=3600, stale_after=30)
    assert 'id="alerts-firing"' in page and "2 alert(s) firing" in page
    assert "node_dead" in page and 'id="webhook-failing"' in page and "ntfy.example" in page
    doc = api.health_document(snap, 30)
    assert doc["alerts_firing"] == 2 and doc["webhook_ok"] is False
    assert doc["webhook"]["error"] == "HTTP 502 Bad Gateway"
    quiet = state.replace(master={"hostname": "m"}, nodes=[], history={}, fetched_at=time.time())
    doc = api.health_document(quiet, 30)
    assert doc["webhook_ok"] is True and doc["alerts_firing"] == 0
    page = dashboard.render_dashboard(
        quiet, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert "alerts-firing" not in page and "webhook-failing" not in page
