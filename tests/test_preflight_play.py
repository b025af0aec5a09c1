"""deploy.yml's preflight play on the controller, with inventories a user may write.

The Molecule preflight scenario checks bad settings against containers; these
runs check what needs no Pi at all: the shipped preflight play (deploy.yml's
first play, taken as it is) run with ``ansible_connection=local`` against an
inventory in a temporary directory. Its asserts run on the controller and
change nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK = shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) or shutil.which(
    "ansible-playbook"
)

pytestmark = pytest.mark.skipif(
    PLAYBOOK is None, reason="ansible-playbook is not installed (make venv)"
)


def run_preflight(tmp_path: Path, group_vars: dict) -> subprocess.CompletedProcess:
    """Run deploy.yml's preflight play alone on a one-master, one-slave local inventory."""
    plays = yaml.safe_load((ROOT / "deploy.yml").read_text(encoding="utf-8"))
    preflight = plays[0]
    assert preflight["name"].startswith("Preflight"), preflight["name"]
    (tmp_path / "preflight.yml").write_text(yaml.safe_dump([preflight]), encoding="utf-8")
    local = {"ansible_connection": "local", "ansible_host": "127.0.0.1"}
    hosts = {
        "all": {
            "children": {
                "master": {"hosts": {"pi-master": dict(local)}},
                "slaves": {"hosts": {"pi-one": dict(local)}},
            }
        }
    }
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(yaml.safe_dump(hosts), encoding="utf-8")
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump(group_vars), encoding="utf-8")
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [PLAYBOOK, "-i", str(inventory), str(tmp_path / "preflight.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_an_inventory_that_sets_nothing_passes_on_the_roles_defaults(tmp_path):
    # The master's checks compare with shared settings (dead_after, the port)
    # that only rpicluster_common's defaults give when the inventory is silent.
    result = run_preflight(tmp_path, {})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "failed=0" in result.stdout


def test_forget_after_shorter_than_dead_after_is_refused_naming_both(tmp_path):
    result = run_preflight(tmp_path, {"rpicluster_dead_after": 30, "rpicluster_forget_after": 20})
    assert result.returncode != 0
    assert "rpicluster_forget_after must be 0 (never forget)" in result.stdout
    assert "rpicluster_dead_after (30.0); got 20" in result.stdout


def test_a_metrics_port_equal_to_the_cluster_port_is_refused(tmp_path):
    same = {"rpicluster_port": 5005, "rpicluster_master_metrics_port": 5005}
    result = run_preflight(tmp_path, same)
    assert result.returncode != 0
    assert "metrics_port 0 (off) or a port other than rpicluster_port" in result.stdout
