"""Every renderer against whatever an old database may hold (issue 7, renderer safety).

The master now refuses such member data, but a database written by an older master
still holds it: Infinity and NaN, 400-digit integers, 600-level nesting, a
``boot_time`` of -1e300, strings with newlines, ANSI escapes and lone surrogates,
huge strings. Each renderer (status table, dashboard, node page, JSON API,
``/metrics``, ``/healthz``, log lines) must answer, and must not pass the poison on.
"""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rpicluster import displayable, humanize
from rpicluster.status import format_table
from rpicluster.web import api, dashboard
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState, History, Snapshot

NOW = time.time()
ESC = "\x1b[2J\x1b]0;owned\x07"
SURROGATE = "\ud800"
FORGED = "pi\nERROR rpicluster.master: node evil joined"
HUGE_INT = int("9" * 400)
INF = float("inf")
NAN = float("nan")


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"x": [value]}
    return value


def poisoned_nodes() -> list[dict[str, Any]]:
    """One node per poison, each otherwise ordinary."""
    base_vitals = {"ts": NOW - 1, "cpu_percent": 12.0, "temperature": 48.0}

    def make(node_id: str, **fields: Any) -> dict[str, Any]:
        doc = {
            "node_id": node_id,
            "name": node_id,
            "hostname": node_id,
            "address": "10.0.0.1",
            "roles": ["basic", "vitals"],
            "state": "alive",
            "connected": True,
            "last_seen": NOW - 2,
            "connected_since": NOW - 60,
            "details": {"os": "Debian 12"},
            "vitals": dict(base_vitals),
            "action_errors": {},
        }
        doc.update(fields)
        return doc

    return [
        make("inf", vitals={**base_vitals, "cpu_percent": INF, "temperature": -INF, "uptime": NAN}),
        make("bigint", vitals={**base_vitals, "ram_available": HUGE_INT, "uptime": HUGE_INT}),
        make("bigint-details", details={"ram_total": HUGE_INT, "boot_time": HUGE_INT}),
        make("deep", details={"deep": nested(600)}, vitals={**base_vitals, "deep": nested(600)}),
        make("boot", details={"boot_time": -1e300}, vitals={**base_vitals, "boot_time": -1e300}),
        make("negative", last_seen=-1e300, connected_since=1e300),
        make("newline", name=FORGED, hostname=FORGED, roles=[FORGED]),
        make("ansi", name=ESC, hostname=ESC, details={"os": ESC}, roles=[ESC]),
        make("surrogate", name="pi" + SURROGATE, hostname=SURROGATE, roles=[SURROGATE]),
        make("huge", name="h" * 1_000_000, details={"os": "o" * 1_000_000}),
        make("types", roles="basic", vitals=[1, 2], details="x", action_errors={"r": 5}),
        make("counts", action_errors={"vitals": {"count": HUGE_INT, "last": ESC + FORGED}}),
        make("surrogate-id" + SURROGATE),
        make("throttle", vitals={**base_vitals, "throttled": HUGE_INT, "under_voltage_alarm": INF}),
    ]


POISONED_MASTER = {
    "hostname": ESC + SURROGATE,
    "counters": {"messages_total": HUGE_INT, "weird\nkey_total": 1, "bad_messages_total": INF},
    "store": {"ok": False, "error": FORGED + SURROGATE, "queue": HUGE_INT, "lag_seconds": NAN},
}


def snapshot() -> Snapshot:
    state = ClusterState(3600)
    nodes = poisoned_nodes()
    history = {
        "inf": History.empty().extended(
            [{"ts": NOW - 20, "cpu_percent": INF}, {"ts": NOW - 10, "ram_available": HUGE_INT}],
            NOW - 3600,
        )
    }
    return state.replace(
        master=POISONED_MASTER, nodes=nodes, history=history, fetched_at=time.time()
    )


def assert_inert(text: str) -> None:
    """No terminal escape, no lone surrogate, no forged line start."""
    assert "\x1b" not in text and "\x07" not in text
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    text.encode("utf-8")  # strict: valid UTF-8
    assert "\nERROR rpicluster.master" not in text


def test_displayable_text_is_one_inert_bounded_line():
    assert displayable.text(FORGED) == "pi\\nERROR rpicluster.master: node evil joined"
    assert displayable.text(ESC).startswith("\\x1b[2J")
    assert displayable.text("pi" + SURROGATE) == "pi\\ud800"
    assert len(displayable.text("x" * 10_000_000)) == displayable.MAX_TEXT + 1
    assert displayable.text(HUGE_INT * HUGE_INT * HUGE_INT * 10**4000).endswith("-bit integer>")
    assert displayable.text("\u202eevil") == "\\u202eevil"  # bidi override shown, not obeyed
    assert displayable.number(HUGE_INT) is None and displayable.number(INF) is None
    assert displayable.number(True) is None and displayable.number(3) == 3.0


def test_displayable_tree_is_json_safe_and_bounded():
    doc = displayable.tree(
        {"a": [INF, NAN, HUGE_INT, 2**53, SURROGATE], "deep": nested(600), "s": "x" * 10**6}
    )
    assert doc["a"] == [None, None, None, 2**53, "\ufffd"]
    assert len(doc["s"]) < displayable.MAX_TREE_TEXT + 20
    text = json.dumps(doc, allow_nan=False)
    assert text.count("[") < 2 * displayable.MAX_TREE_DEPTH
    many = displayable.tree(list(range(100_000)))
    assert len(many) == displayable.MAX_TREE_ITEMS


@pytest.mark.parametrize("value", [None, INF, -INF, NAN, HUGE_INT, -1e300, 1e300, "x", True])
def test_humanize_never_raises(value):
    for fn in (
        humanize.duration,
        humanize.size,
        humanize.percent,
        humanize.temperature,
        humanize.clock,
        humanize.rate,
        humanize.frequency,
    ):
        assert isinstance(fn(value), str)
    assert isinstance(humanize.ago(value, NOW), str)
    assert isinstance(humanize.load((value, value, value)), str)


def test_status_table_survives_and_passes_no_escape():
    state = {"master": dict(POISONED_MASTER), "nodes": poisoned_nodes()}
    table = format_table(state, now=NOW)
    assert_inert(table)
    assert "pi\\nERROR" in table  # the forged line is visibly one cell
    assert "STORE FAILING: pi\\nERROR" in table.splitlines()[0]
    for line in table.splitlines():
        assert len(line) < 1000  # a megabyte name does not make a megabyte line
    # through a terminal that cannot encode: no traceback either
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="backslashreplace")
    print(table, file=out)


def test_dashboard_and_every_node_page_render():
    snap = snapshot()
    page = dashboard.render_dashboard(snap, refresh_interval=2, history_window=3600, stale_after=30)
    assert_inert(page)
    assert page.count("<tr class=") == len(poisoned_nodes())
    assert len(page) < 2_000_000
    assert "store is not saving</b>: pi\\nERROR" in page
    for node in snap.nodes:
        node_page = dashboard.render_node(
            snap, node, refresh_interval=2, history_window=3600, stale_after=30
        )
        assert_inert(node_page)
        assert len(node_page) < 500_000


def test_json_api_is_strict_json():
    snap = snapshot()
    body = api.dumps(api.nodes_document(snap, 30))
    doc = json.loads(body.decode("utf-8", errors="strict"))
    assert len(doc["nodes"]) == len(poisoned_nodes())
    for node in snap.nodes:
        one = api.node_document(snap, node["node_id"], 30)
        json.loads(api.dumps(one).decode("utf-8", errors="strict"))
    health = api.health_document(snap, 30)
    assert health["store_ok"] is False and health["status"] == "store_failing"
    json.loads(api.dumps(health))


def test_metrics_render_and_parse():
    text = MetricsRenderer(snapshot, stale_after=30).render().decode("utf-8")
    assert_inert(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ids = {s.labels["node_id"] for s in families["rpicluster_node_up"].samples}
    assert len(ids) == len(poisoned_nodes())
    assert "rpicluster_master_bad_messages" not in families  # Infinity is no reading
    cpu = {s.labels["node_id"] for s in families["rpicluster_node_cpu_usage_ratio"].samples}
    assert "inf" not in cpu


def test_log_lines_cannot_be_forged():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(displayable.OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("rpicluster.test_poisoned")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("node %s joined", FORGED + ESC + SURROGATE)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("node %s failed", FORGED)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    lines = out.splitlines()
    assert lines[0].startswith("WARNING rpicluster.test_poisoned: node pi\\nERROR")
    assert_inert(lines[0])
    assert lines[1].startswith("ERROR rpicluster.test_poisoned: node pi\\nERROR")
    assert "Traceback" in lines[2]  # the traceback, from our own code, stays readable
    assert not any(line.startswith("ERROR rpicluster.master") for line in lines)


XSS = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


def test_html_injection_in_every_string_field_stays_text():
    """Every string a node or the master can set, on every page: never live markup."""
    evil = {
        "node_id": "x" + XSS,
        "name": XSS,
        "hostname": XSS,
        "address": XSS,
        "roles": [XSS],
        "state": XSS,
        "connected": True,
        "last_seen": NOW,
        "details": {XSS: XSS, "os": XSS, "groups": [XSS], "nested": {XSS: [XSS]}},
        "vitals": {"ts": NOW, XSS: XSS, "throttled": 0x10001},
        "action_errors": {XSS: {"count": 1, "last": XSS}, "other": XSS},
        "duplicate_name": True,
        "duplicate_id": True,
    }
    state = ClusterState(3600)
    master = {"hostname": XSS, "counters": {XSS: 1}, "store": {"ok": False, "error": XSS}}
    snap = state.replace(master=master, nodes=[evil], history={}, fetched_at=time.time())
    pages = [
        dashboard.render_dashboard(snap, refresh_interval=2, history_window=3600, stale_after=30),
        dashboard.render_node(snap, evil, refresh_interval=2, history_window=3600, stale_after=30),
        dashboard.render_not_found(XSS),
    ]
    for page in pages:
        assert "<img" not in page and "<script>alert" not in page
        assert page.count("<script>") == 1  # the reload poller, allowed by its hash
        assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_the_console_scripts_log_one_line_per_record(capsys):
    """rpicluster, rpicluster-master and rpicluster-slave set up OneLineFormatter."""
    from rpicluster import command

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        command.setup_logging("INFO")
        logging.getLogger("rpicluster.master").warning("node %s joined", FORGED + ESC)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("WARNING MainThread rpicluster.master: node pi\\nERROR")
    assert_inert(err)
