"""Issue 9 on every page: node names first, duplicate flags, Pi health badges, store health.

Built against contracts 1, 2 and 4 of the helpers' coordination notes: node
objects carry ``name``, ``duplicate_name`` and ``duplicate_id``; vitals carry
``throttled`` (the firmware word), ``under_voltage_alarm`` and the net/disk
rates; the master dict carries ``store``. The node dicts here are crafted in
those shapes; decoding is rpicluster.pihealth's.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from rpicluster.status import format_table
from rpicluster.web import api, dashboard
from rpicluster.web.state import ClusterState, Snapshot

NOW = time.time()
UNDER_VOLTAGE_NOW = 0x1 | 0x10000
THROTTLED_SINCE_BOOT = 0x40000


def node(node_id: str, hostname: str = "raspberrypi", **extra: Any) -> dict[str, Any]:
    doc = {
        "node_id": node_id,
        "hostname": hostname,
        "address": "10.0.0.7",
        "roles": ["basic", "vitals"],
        "state": "alive",
        "connected": True,
        "last_seen": NOW - 3,
        "details": {"hostname": hostname, "model": "Raspberry Pi 4 Model B Rev 1.4"},
        "vitals": {
            "ts": NOW - 1,
            "cpu_percent": 10.0,
            "temperature": 51.5,
            "cpu_freq_mhz": 1800.0,
            "net_rx_bytes_per_s": 1536.0,
            "net_tx_bytes_per_s": 3 * 2**20,
            "disk_read_bytes_per_s": 0.0,
            "disk_write_bytes_per_s": 2048.0,
            "disk_free": 20 * 2**30,
            "disk_total": 32 * 2**30,
        },
    }
    doc.update(extra)
    return doc


def fleet() -> list[dict[str, Any]]:
    """Three Pis with the Imager's default hostname, told apart by name; one older node."""
    a = node("aaaaaaaa-1", name="pi-rack-1")
    a["vitals"]["throttled"] = UNDER_VOLTAGE_NOW
    b = node("bbbbbbbb-2", name="pi-rack-2", duplicate_name=True)
    b["vitals"]["throttled"] = THROTTLED_SINCE_BOOT
    c = node("cccccccc-3", name="pi-rack-2", duplicate_name=True, duplicate_id=True)
    old = node("dddddddd-4", hostname="old-master-node")  # no name: an older master
    old["vitals"]["under_voltage_alarm"] = 1
    return [a, b, c, old]


STORE_OK = {"ok": True, "error": None, "queue": 0, "queue_limit": 10000, "lag_seconds": 0.0}
STORE_FAILING = {**STORE_OK, "ok": False, "error": "disk I/O error"}


def snap(master_store: Any = STORE_OK, nodes: Any = None) -> Snapshot:
    state = ClusterState(3600)
    master = {"hostname": "rpi-master", "store": master_store}
    return state.replace(master=master, nodes=nodes or fleet(), history={}, fetched_at=time.time())


def test_status_table_shows_name_first_duplicates_and_health():
    table = format_table({"master": {"hostname": "m", "store": STORE_OK}, "nodes": fleet()}, NOW)
    lines = table.splitlines()
    assert lines[0].endswith("; store ok")
    assert lines[1].split()[:2] == ["NAME", "NODE"] and lines[1].split()[-1] == "WARNINGS"
    rows = {line.split()[1]: line for line in lines[2:]}
    assert rows["aaaaaaaa"].startswith("pi-rack-1 ")
    assert rows["aaaaaaaa"].endswith("under-voltage now")
    assert rows["bbbbbbbb"].endswith("duplicate name, throttled since boot")
    assert rows["cccccccc"].endswith("DUPLICATE ID, duplicate name")
    assert rows["dddddddd"].startswith("old-master-node ")  # hostname when no name
    assert rows["dddddddd"].endswith("under-voltage now")
    failing = format_table({"master": {"hostname": "m", "store": STORE_FAILING}, "nodes": []})
    assert failing.splitlines()[0].endswith("; STORE FAILING: disk I/O error")
    older = format_table({"master": {"hostname": "m"}, "nodes": []})
    assert "store" not in older


def test_dashboard_rows_show_name_hostname_and_badges():
    page = dashboard.render_dashboard(
        snap(), refresh_interval=2, history_window=3600, stale_after=30
    )
    rows = dict(re.findall(r'<tr class="node [a-z]+" data-node-id="([^"]+)"(.*?)</tr>', page))
    assert ">pi-rack-1</a>" in rows["aaaaaaaa-1"] and "raspberrypi" in rows["aaaaaaaa-1"]
    assert (
        '<span class="badge bad" data-flag="health">under-voltage now</span>' in rows["aaaaaaaa-1"]
    )
    assert "throttled since boot" in rows["bbbbbbbb-2"]
    assert 'data-flag="duplicate_name"' in rows["bbbbbbbb-2"]
    assert 'data-flag="duplicate_id"' in rows["cccccccc-3"]
    assert "data-flag" not in rows["dddddddd-4"].replace('data-flag="health"', "")
    assert ">old-master-node</a>" in rows["dddddddd-4"]
    assert "store-failing" not in page


def test_node_page_shows_badges_rates_and_conditions():
    s = snap()
    page = dashboard.render_node(
        s, s.node("aaaaaaaa-1"), refresh_interval=2, history_window=3600, stale_after=30
    )
    assert "<title>rpicluster: pi-rack-1</title>" in page
    assert 'id="health"' in page and "under-voltage now" in page
    for text in (
        "<dt>network in</dt><dd>1.5 KiB/s</dd>",
        "<dt>network out</dt><dd>3 MiB/s</dd>",
        "<dt>disk writes</dt><dd>2 KiB/s</dd>",
        "<dt>disk reads</dt><dd>0 B/s</dd>",
        "<dt>CPU frequency</dt><dd>1.8 GHz</dd>",
        "<dt>under-voltage</dt><dd>NOW</dd>",
        "<dt>throttled</dt><dd>no</dd>",
        "<dt>hostname</dt><dd>raspberrypi</dd>",
    ):
        assert text in page, text
    plain = node("eeeeeeee-5", name="x86-box")
    plain_page = dashboard.render_node(
        snap(nodes=[plain]), plain, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert "<dt>under-voltage</dt><dd>unknown</dd>" in plain_page  # no firmware word: unknown
    assert 'id="health"' not in plain_page


def test_store_failing_banner_and_healthz_503_document():
    failing = snap(STORE_FAILING)
    page = dashboard.render_dashboard(
        failing, refresh_interval=2, history_window=3600, stale_after=30
    )
    assert 'id="store-failing"' in page and "disk I/O error" in page
    doc = api.health_document(failing, 30)
    assert doc["store_ok"] is False and doc["store"]["error"] == "disk I/O error"
    assert api.health_document(snap(), 30)["store_ok"] is True
    assert api.health_document(snap(master_store=None), 30)["store_ok"] is True  # older master


def test_api_nodes_carry_name_and_decoded_health():
    doc = json.loads(api.dumps(api.nodes_document(snap(), 30)))
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert sorted(n["name"] for n in doc["nodes"]) == [
        "old-master-node",
        "pi-rack-1",
        "pi-rack-2",
        "pi-rack-2",
    ]
    assert nodes["aaaaaaaa-1"]["health"]["warnings"] == ["under-voltage now"]
    assert nodes["aaaaaaaa-1"]["health"]["conditions"]["under_voltage"] == {
        "now": True,
        "since_boot": True,
    }
    assert nodes["bbbbbbbb-2"]["health"]["warnings"] == ["throttled since boot"]
    assert nodes["cccccccc-3"]["duplicate_id"] is True
    assert nodes["dddddddd-4"]["name"] == "old-master-node"
    assert nodes["dddddddd-4"]["health"]["warnings"] == ["under-voltage now"]
