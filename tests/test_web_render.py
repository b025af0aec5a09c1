"""Unit tests of the webserver's rendering parts, from fixture documents.

The documents have the shape the master sends (``query`` cluster/history); the
integration tests in test_web_server.py run the same code against a real master.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rpicluster import humanize
from rpicluster.web import api, dashboard, svg
from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import BadReply, ClusterState, History, Snapshot, refresh

NOW = time.time()


def vitals(ts: float, cpu: float = 12.5, temp: Any = 48.2, **extra: Any) -> dict[str, Any]:
    doc = {
        "ts": ts,
        "cpu_percent": cpu,
        "cpu_freq_mhz": 1500.0,
        "load_1": 0.5,
        "load_5": 0.4,
        "load_15": 0.3,
        "ram_available": 3 * 2**30,
        "ram_total": 4 * 2**30,
        "swap_free": 2**30,
        "disk_free": 20 * 2**30,
        "disk_total": 32 * 2**30,
        "uptime": 3 * 86400 + 4 * 3600,
        "temperature": temp,
    }
    doc.update(extra)
    return doc


def node(node_id: str, hostname: str, state: str = "alive", **extra: Any) -> dict[str, Any]:
    now = time.time()
    doc = {
        "node_id": node_id,
        "hostname": hostname,
        "address": "127.0.0.1",
        "roles": ["basic", "vitals"],
        "state": state,
        "connected": state in ("alive", "suspect"),
        "last_seen": now - 12,
        "connected_since": now - 3600,
        "details": {"hostname": hostname, "ram_total": 4 * 2**30, "os": "Debian 12"},
        "vitals": vitals(now - 1),
        "action_errors": {},
    }
    doc.update(extra)
    return doc


MASTER = {
    "hostname": "rpi-master",
    "version": "0.1.0",
    "counters": {
        "connections_total": 7,
        "connections_open": 3,
        "messages_total": 1234,
        "rejected_frames_total": 2,
        "auth_failures_total": 1,
        "bad_messages_total": 0,
    },
}


class FakeMaster:
    """Answers ``request(what, **fields)`` from documents, recording each query."""

    def __init__(self, nodes: list[dict[str, Any]], history: dict[str, list[dict]], page=2):
        self.nodes = nodes
        self.history = history
        self.page = page
        self.queries: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, what: str, **fields: Any) -> Any:
        self.queries.append((what, fields))
        if what == "cluster":
            offset = fields["offset"]
            end = offset + self.page
            return {
                "master": MASTER,
                "nodes": self.nodes[offset:end],
                "total": len(self.nodes),
                "next_offset": end if end < len(self.nodes) else None,
            }
        assert what == "history"
        since = fields.get("since")
        points = [p for p in self.history[fields["node_id"]] if since is None or p["ts"] > since]
        limit = fields["limit"]
        return {"node_id": fields["node_id"], "points": points[:limit], "more": len(points) > limit}


def snapshot_of(nodes: list[dict[str, Any]], history=None, window: float = 3600) -> Snapshot:
    state = ClusterState(window)
    return state.replace(master=MASTER, nodes=nodes, history=history or {}, fetched_at=time.time())


# ------------------------------------------------------------------ humanize


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0, "0 s"),
        (42.9, "42 s"),
        (303, "5 min 3 s"),
        (3 * 3600 + 720, "3 h 12 min"),
        (4 * 86400 + 7200, "4 d 2 h"),
        (None, humanize.DASH),
        (float("nan"), humanize.DASH),
    ],
)
def test_duration(seconds, text):
    assert humanize.duration(seconds) == text


def test_ago_and_size():
    assert humanize.ago(100.0, 112.4) == "12 s ago"
    assert humanize.ago(100.0, 100.5) == "just now"
    assert humanize.ago(0.0, 600.0) == "10 min ago"
    assert humanize.ago(None, 1.0) == "never"
    assert humanize.size(512) == "512 B"
    assert humanize.size(3 * 2**30) == "3 GiB"
    assert humanize.size(1.5 * 2**20) == "1.5 MiB"
    assert humanize.size(None) == humanize.DASH
    assert humanize.temperature(48.2) == "48.2 \u00b0C"
    assert humanize.load((0.5, None, 0.25)) == f"0.50 {humanize.DASH} 0.25"


# ----------------------------------------------------------------------- svg


def test_buckets_average_and_skip_out_of_window_and_nan():
    ts = [0.5, 1.5, 1.6, 3.2, 5.0, 99.0]
    values = [10.0, 20.0, 40.0, math.nan, 7.0, 1000.0]
    means = svg.buckets(ts, values, 0.0, 10.0, 5)
    assert means[0] == pytest.approx((10 + 20 + 40) / 3)
    assert means[1] is None  # the NaN at 3.2 is not a value
    assert means[2] == 7.0
    assert means[3] is None and means[4] is None


def test_segments_break_at_gaps():
    means = [1.0, 2.0, None, 3.0, None, None, None, None, 4.0, 5.0]
    runs = svg.segments(means, max_gap=2)
    assert runs == [[(0, 1.0), (1, 2.0), (3, 3.0)], [(8, 4.0), (9, 5.0)]]


def test_plot_draws_lines_and_says_what_it_shows():
    ts = [NOW - 60 + i for i in range(60)]
    values = [float(i) for i in range(60)]
    text = svg.plot(
        ts,
        values,
        start=NOW - 60,
        end=NOW,
        y_range=(0, 100),
        title="CPU %",
        color="#0969da",
        fmt=humanize.percent,
    )
    assert text.startswith("<svg") and text.endswith("</svg>")
    assert "<polyline" in text and "no data" not in text
    assert 'aria-label="CPU %: last 59 %, min 0 %, max 59 %"' in text or "CPU %: last" in text
    empty = svg.plot(
        [],
        [],
        start=NOW - 60,
        end=NOW,
        y_range=(0, 100),
        title="CPU %",
        color="#000",
        fmt=humanize.percent,
    )
    assert "no data" in empty and "<polyline" not in empty


def test_plot_shows_a_dead_period_as_a_gap():
    ts = [NOW - 3600 + i * 5 for i in range(200)] + [NOW - 600 + i * 5 for i in range(120)]
    values = [50.0] * len(ts)
    text = svg.plot(
        ts,
        values,
        start=NOW - 3600,
        end=NOW,
        y_range=(0, 100),
        title="CPU %",
        color="#000",
        fmt=humanize.percent,
        width=240,
        height=40,
    )
    assert text.count("<polyline") == 2


def test_plot_transform_and_y_range_function():
    ts = [NOW - 50 + i for i in range(50)]
    avail = [3.0 * 2**30] * 50
    text = svg.plot(
        ts,
        avail,
        start=NOW - 50,
        end=NOW,
        y_range=lambda finite: (0.0, max(finite) * 2),
        title="RAM used",
        color="#000",
        fmt=humanize.percent,
        transform=lambda a: 100.0 * (1 - a / (4.0 * 2**30)),
    )
    assert "last 25 %" in text


def test_auto_range():
    assert svg.auto_range([41.0, 57.5]) == (40.0, 60.0)
    assert svg.auto_range([math.nan]) == (0.0, 10.0)
    assert svg.auto_range([50.0]) == (50.0, 60.0)


# --------------------------------------------------------------------- state


def test_history_extends_trims_and_ignores_duplicates():
    h = History.empty().extended([vitals(10.0), vitals(20.0), vitals(30.0, temp=None)], oldest=0)
    assert list(h.ts) == [10.0, 20.0, 30.0]
    assert math.isnan(h.column("temperature")[2])
    h2 = h.extended([vitals(20.0), vitals(40.0)], oldest=15.0)
    assert list(h2.ts) == [20.0, 30.0, 40.0]
    assert list(h.ts) == [10.0, 20.0, 30.0]  # immutable
    assert h2.trimmed(35.0).points()[0]["ts"] == 40.0
    assert h.points()[2]["temperature"] is None
    assert h.trimmed(0.0) is h


def test_refresh_pages_the_cluster_and_asks_history_incrementally():
    nodes = [node(f"n{i}", f"pi-{i}") for i in range(5)]
    history = {f"n{i}": [vitals(NOW - 30 + k, cpu=float(k)) for k in range(30)] for i in range(5)}
    for n in nodes:
        n["vitals"] = history[n["node_id"]][-1]
    nodes[4]["vitals"] = None  # a basic-only node: never asked for history
    fake = FakeMaster(nodes, history, page=2)
    state = ClusterState(3600)
    snap = refresh(state, fake)
    assert [n["node_id"] for n in snap.nodes] == ["n0", "n1", "n2", "n3", "n4"]
    assert [f["offset"] for w, f in fake.queries if w == "cluster"] == [0, 2, 4]
    assert len(snap.node_history("n1")) == 30
    assert len(snap.node_history("n4")) == 0
    assert sum(1 for w, _ in fake.queries if w == "history") == 4

    # Steady state: nothing new, no history query at all.
    fake.queries.clear()
    refresh(state, fake)
    assert [w for w, _ in fake.queries] == ["cluster"] * 3

    # One new point on n2: one query, since = the last point we hold.
    point = vitals(NOW + 1, cpu=99.0)
    history["n2"].append(point)
    nodes[2]["vitals"] = point
    fake.queries.clear()
    snap = refresh(state, fake)
    asked = [f for w, f in fake.queries if w == "history"]
    assert asked == [{"node_id": "n2", "since": NOW - 1, "limit": 1000}]
    assert len(snap.node_history("n2")) == 31
    assert snap.node_history("n2").column("cpu_percent")[-1] == 99.0


def test_refresh_follows_more_pages_of_history():
    points = [vitals(NOW - 2500 + k) for k in range(2500)]
    n = node("n0", "pi-0", vitals=points[-1])
    fake = FakeMaster([n], {"n0": points})
    snap = refresh(ClusterState(3600), fake)
    assert len(snap.node_history("n0")) == 2500
    assert sum(1 for w, _ in fake.queries if w == "history") == 3


def test_refresh_drops_points_outside_the_window_and_gone_nodes():
    now = time.time()
    points = [vitals(now - 100 + k) for k in range(100)]
    nodes = [node("n0", "pi-0", vitals=points[-1]), node("n1", "pi-1", vitals=points[-1])]
    fake = FakeMaster(nodes, {"n0": points, "n1": points})
    state = ClusterState(30)
    snap = refresh(state, fake)
    assert 28 <= len(snap.node_history("n0")) <= 31
    fake.nodes = nodes[:1]
    snap = refresh(state, fake)
    assert "n1" not in snap.history


def test_refresh_bounds_history_queries_and_points(monkeypatch):
    monkeypatch.setattr("rpicluster.web.state.MAX_HISTORY_QUERIES", 3)
    monkeypatch.setattr("rpicluster.web.state.MAX_HISTORY_POINTS", 100)
    monkeypatch.setattr("rpicluster.web.state.MIN_POINTS_PER_NODE", 10)
    now = time.time()
    points = [vitals(now - 50 + k) for k in range(50)]
    nodes = [node(f"n{i}", f"pi-{i}", vitals=points[-1]) for i in range(7)]
    fake = FakeMaster(nodes, {f"n{i}": points for i in range(7)}, page=100)
    state = ClusterState(3600)
    asked = []
    for _ in range(3):
        fake.queries.clear()
        snap = refresh(state, fake)
        asked.append([f["node_id"] for w, f in fake.queries if w == "history"])
    # 3 per refresh, round robin, until every node has been asked once.
    assert asked == [["n0", "n1", "n2"], ["n3", "n4", "n5"], ["n6"]]
    assert all(len(snap.node_history(f"n{i}")) == 100 // 7 for i in range(7))


@pytest.mark.parametrize(
    "reply, message",
    [
        ([], "data is not an object"),
        ({"nodes": "x"}, "'nodes' is not a list"),
        ({"nodes": [{"hostname": "a"}]}, "node 0 has no string node_id"),
        ({"nodes": [], "next_offset": 0}, "bad next_offset 0"),
    ],
)
def test_refresh_names_a_bad_reply(reply, message):
    with pytest.raises(BadReply, match=re.escape(message)):
        refresh(ClusterState(60), lambda what, **fields: reply)


def test_unreachable_is_marked_and_cleared():
    state = ClusterState(60)
    assert state.snapshot.master_unreachable_since(10) is None
    state.replace(master=MASTER, nodes=[node("a", "pi")], history={}, fetched_at=time.time())
    state.mark_unreachable("connection refused", when=123.0)
    state.mark_unreachable("still refused", when=456.0)
    snap = state.snapshot
    assert snap.master_unreachable_since(10) == 123.0
    assert snap.nodes and snap.last_error == "still refused"
    state.replace(master=MASTER, nodes=[], history={}, fetched_at=time.time() - 100)
    assert state.snapshot.master_unreachable_since(10) == state.snapshot.fetched_at  # stale


# ----------------------------------------------------------------- dashboard

EVIL = '<script>alert("x")</script>'


def test_dashboard_escapes_everything_from_nodes():
    bad = node('id"><b>', EVIL, roles=[EVIL], details={"os": EVIL})
    snap = snapshot_of([bad])
    page = dashboard.render_dashboard(snap, refresh_interval=2, history_window=3600, stale_after=30)
    assert EVIL not in page and page.count("<script>") == 1  # ours only
    assert "&lt;script&gt;" in page
    assert 'href="/nodes/id%22%3E%3Cb%3E"' in page
    node_page = dashboard.render_node(
        snap, bad, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert EVIL not in node_page and node_page.count("<script>") == 1
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in node_page
    assert "id&quot;&gt;&lt;b&gt;" in node_page


def test_dashboard_row_has_every_column_and_state_word():
    nodes = [node("a", "pi-a"), node("b", "pi-b", state="dead"), node("c", "pi-c", "suspect")]
    hist = History.empty().extended([vitals(NOW - 600 + i * 5) for i in range(120)], NOW - 3600)
    page = dashboard.render_dashboard(
        snapshot_of(nodes, {"a": hist}), refresh_interval=2.5, history_window=3600, stale_after=30
    )
    assert '<noscript><meta http-equiv="refresh" content="3"></noscript>' in page
    assert f"<script>{dashboard.RELOAD_SCRIPT}</script>" in page
    row = re.search(r'<tr class="node alive" data-node-id="a".*?</tr>', page).group(0)
    for text in (
        "pi-a",
        "basic",
        "vitals",
        "alive",
        "12 s ago",
        "3 d 4 h",
        "12 %",
        "0.50 0.40 0.30",
        "3 GiB",
        "20 GiB",
        "48.2 \u00b0C",
    ):
        assert text in row, text
    assert row.count("<svg") == 3 and "<polyline" in row
    assert "\u2716 dead" in page and "\u25b2 suspect" in page
    assert "messages total: 1234" in page


def test_dashboard_says_when_the_master_is_unreachable():
    state = ClusterState(3600)
    state.replace(master=MASTER, nodes=[node("a", "pi-a")], history={}, fetched_at=time.time())
    state.mark_unreachable("connection refused")
    page = dashboard.render_dashboard(
        state.snapshot, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert "Master unreachable since" in page and "pi-a" in page
    fresh = dashboard.render_dashboard(
        ClusterState(60).snapshot, refresh_interval=2, history_window=60, stale_after=30
    )
    assert "Waiting for the master" in fresh


def test_node_page_has_large_plots_details_and_errors():
    n = node("a", "pi-a", action_errors={"vitals": {"count": 3, "last": "OSError: boom"}})
    page = dashboard.render_node(
        snapshot_of([n]), n, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert page.count('class="bigplot"') == 5
    assert "Debian 12" in page and "OSError: boom" in page and "4 GiB" in page


# ----------------------------------------------------------------------- api


def test_api_documents_and_scrub():
    doc = api.nodes_document(snapshot_of([node("a", "pi-a")]), stale_after=30)
    assert doc["master_reachable"] is True
    assert doc["counts"] == {"alive": 1, "suspect": 0, "dead": 0, "left": 0}
    assert doc["nodes"][0]["node_id"] == "a"
    assert api.scrub({"secret": "s", "x": {"api_token": 1, "ok": float("nan")}}) == {
        "x": {"ok": None}
    }
    json.loads(api.dumps(doc))
    assert api.node_document(snapshot_of([]), "nope", 30) is None


# ------------------------------------------------------------------- metrics


def parse(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_metrics_parse_and_carry_node_and_master_figures():
    nodes = [node("a", "pi-a"), node("b", 'pi "b"\n', state="dead", vitals=vitals(NOW, temp=None))]
    renderer = MetricsRenderer(lambda: snapshot_of(nodes), stale_after=30)
    families = parse(renderer.render().decode())
    up = {s.labels["node_id"]: s.value for s in families["rpicluster_node_up"]}
    assert up == {"a": 1.0, "b": 0.0}
    states = {
        (s.labels["node_id"], s.labels["state"]): s.value for s in families["rpicluster_node_state"]
    }
    assert states[("b", "dead")] == 1.0 and states[("b", "alive")] == 0.0
    temps = {s.labels["node_id"]: s.value for s in families["rpicluster_node_temperature_celsius"]}
    assert temps == {"a": 48.2}  # no sensor: no sample rather than a made-up value
    names = {s.labels["name"] for s in families["rpicluster_node_up"]}
    assert 'pi "b"\\n' in names  # one line: the newline is shown as an escape
    age = families["rpicluster_node_last_seen_age_seconds"][0].value
    assert 11 < age < 20
    assert families["rpicluster_master_messages"][0].value == 1234
    assert families["rpicluster_master_messages"][0].name == "rpicluster_master_messages_total"
    assert families["rpicluster_master_connections_open"][0].value == 3
    assert families["rpicluster_node_memory_available_bytes"][0].value == 3 * 2**30
    assert families["rpicluster_webserver_master_reachable"][0].value == 1.0
