"""``/metrics`` follows the Prometheus conventions, checked by ``promtool check metrics``.

promtool comes from Debian's ``prometheus`` package, installed by
molecule/resources/promtool.sh (``make pytest`` runs it first). Without promtool
these tests fail rather than skip: a silent skip would let the conventions rot.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rpicluster.web.metrics import MetricsRenderer
from rpicluster.web.state import ClusterState, Snapshot

NOW = time.time()


def node(node_id: str, name: str, state: str = "alive", **vitals: Any) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "name": name,
        "hostname": "raspberrypi",
        "address": "10.0.0.9",
        "roles": ["vitals", "basic"],
        "state": state,
        "connected": state == "alive",
        "last_seen": NOW - 5,
        "details": {
            "model": "Raspberry Pi 5 Model B Rev 1.0",
            "os": "Debian GNU/Linux 13 (trixie)",
            "os_codename": "trixie",
            "architecture": "aarch64",
            "kernel": "6.12.25+rpt-rpi-2712",
            "python_version": "3.13.5",
            "rpicluster_version": "0.1.0",
            "groups": ["slaves", "rack1"],
            "ram_total": 8 * 2**30,
        },
        "vitals": {
            "ts": NOW - 1,
            "cpu_percent": 25.0,
            "cpu_freq_mhz": 2400.0,
            "temperature": 61.5,
            "ram_available": 6 * 2**30,
            "disk_free": 40 * 2**30,
            "disk_total": 64 * 2**30,
            "uptime": 3600.0,
            "net_rx_bytes_per_s": 1000.0,
            "net_tx_bytes_per_s": 2000.0,
            "disk_read_bytes_per_s": 0.0,
            "disk_write_bytes_per_s": 4096.0,
            **vitals,
        },
        "action_errors": {"vitals": {"count": 2, "last": "OSError"}},
    }


MASTER = {
    "hostname": "rpi-master",
    "counters": {"messages_total": 10, "connections_open": 3, "auth_failures_total": 0},
    "store": {
        "ok": True,
        "error": None,
        "queue": 4,
        "queue_limit": 10000,
        "lag_seconds": 0.2,
        "dropped_total": 0,
    },
}


def snapshot() -> Snapshot:
    nodes = [
        node("id-1", "pi-1", throttled=0x50005),  # under-voltage and throttled, now and since boot
        node("id-2", "pi-2", state="dead"),
        node("id-3", "pi-3", state="left"),
        node("id-4", "pi-4", state="suspect", under_voltage_alarm=0, throttled=0),
    ]
    state = ClusterState(3600)
    return state.replace(master=MASTER, nodes=nodes, history={}, fetched_at=time.time())


def render(stats: Any = None) -> str:
    return MetricsRenderer(snapshot, stale_after=30, server_stats=stats).render().decode()


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is missing: run `bash molecule/resources/promtool.sh` (as root), "
            "which installs Debian's prometheus package"
        )
    return path


def test_promtool_check_metrics_finds_no_problem():
    text = render(lambda: {"connections_open": 3, "requests_total": 17})
    done = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    problems = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not problems.strip(), problems


def test_promtool_catches_a_bad_name():
    """The check is real: promtool flags what the conventions forbid."""
    bad = "# HELP x_percent a percentage\n# TYPE x_percent counter\nx_percent 1\n"
    done = subprocess.run(
        [promtool(), "check", "metrics"], input=bad.encode(), capture_output=True, timeout=60
    )
    assert done.returncode != 0 and b"_total" in done.stdout + done.stderr


def families() -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(render())}


def by_node(family: Any, **match: str) -> dict[str, float]:
    return {
        s.labels["node_id"]: s.value
        for s in family.samples
        if all(s.labels.get(k) == v for k, v in match.items())
    }


def test_base_units_and_name_labels():
    f = families()
    assert by_node(f["rpicluster_node_cpu_usage_ratio"]) == {"id-1": 0.25, "id-4": 0.25}
    assert by_node(f["rpicluster_node_cpu_frequency_hertz"])["id-1"] == 2.4e9
    assert by_node(f["rpicluster_node_network_transmit_bytes_per_second"])["id-1"] == 2000.0
    assert by_node(f["rpicluster_node_disk_written_bytes_per_second"])["id-1"] == 4096.0
    assert by_node(f["rpicluster_node_temperature_celsius"])["id-1"] == 61.5
    names = {s.labels["node_id"]: s.labels["name"] for s in f["rpicluster_node_up"].samples}
    assert names == {"id-1": "pi-1", "id-2": "pi-2", "id-3": "pi-3", "id-4": "pi-4"}
    assert f["rpicluster_node_action_errors"].samples[0].name.endswith("_total")
    assert f["rpicluster_master_messages"].samples[0].name == "rpicluster_master_messages_total"
    assert f["rpicluster_master_store_ok"].samples[0].value == 1
    assert f["rpicluster_master_store_queue_limit"].samples[0].value == 10000
    assert not [name for name in f if "percent" in name or "mhz" in name]


def test_info_metric_carries_model_os_version_groups():
    info = families()["rpicluster_node_info"].samples
    one = next(s for s in info if s.labels["node_id"] == "id-1")
    assert one.value == 1
    assert one.labels["model"] == "Raspberry Pi 5 Model B Rev 1.0"
    assert one.labels["os_codename"] == "trixie"
    assert one.labels["version"] == "0.1.0"
    assert one.labels["groups"] == "rack1,slaves"
    assert one.labels["roles"] == "basic,vitals"
    assert one.labels["hostname"] == "raspberrypi"


def test_throttling_gauges_per_condition_now_and_since_boot():
    f = families()
    now = by_node(f["rpicluster_node_throttled_now"], condition="under_voltage")
    boot = by_node(f["rpicluster_node_throttled_since_boot"], condition="throttled")
    assert now == {"id-1": 1, "id-4": 0}
    assert boot == {"id-1": 1, "id-4": 0}
    capped = by_node(f["rpicluster_node_throttled_now"], condition="frequency_capped")
    assert capped == {"id-1": 0, "id-4": 0}


def test_dead_and_departed_nodes_export_up_0_and_no_frozen_readings():
    f = families()
    up = by_node(f["rpicluster_node_up"])
    assert up == {"id-1": 1, "id-2": 0, "id-3": 0, "id-4": 0}
    for name, family in f.items():
        if name in (
            "rpicluster_node_up",
            "rpicluster_node_state",
            "rpicluster_node_info",
            "rpicluster_node_connected",
            "rpicluster_node_duplicate_name",
            "rpicluster_node_duplicate_id",
            "rpicluster_node_last_seen_age_seconds",
            "rpicluster_node_action_errors",
        ):
            continue
        ids = {s.labels.get("node_id") for s in family.samples}
        assert not ids & {"id-2", "id-3"}, name
