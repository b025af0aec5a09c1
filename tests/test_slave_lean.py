"""What a lean slave does not import, and the node id made without ``uuid``.

Every module a slave imports stays in its RSS for its whole life (issue 2 and 8
budget 20 and 22 MB), so modules needed only on a rare path are imported there.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from rpicluster.identity import new_node_id

REPO = Path(__file__).resolve().parent.parent

# A slave's start: read a valid config, create its node id, import its roles.
_START = """
import sys
from rpicluster.config import load_config
from rpicluster.identity import load_or_create_node_id
import rpicluster.cli, rpicluster.slave, rpicluster.roles.vitals
config = load_config(sys.argv[1], need="slave")
load_or_create_node_id(sys.argv[2])
print(" ".join(name for name in ("uuid", "difflib") if name in sys.modules))
"""


def test_a_slave_start_imports_neither_uuid_nor_difflib(tmp_path):
    config = tmp_path / "slave.cfg"
    config.write_text(
        "[cluster]\nsecret = lean-slave-secret-0123456789abcdef\n"
        "[slave]\nmaster_ip = 127.0.0.1\nroles = basic, vitals\n"
        f"state_dir = {tmp_path / 'state'}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", _START, str(config), str(tmp_path / "state")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == ""
    assert (tmp_path / "state" / "node_id").read_text().strip()


def test_a_wrong_key_still_gets_a_suggestion(tmp_path):
    from rpicluster.config import ConfigError, load_config

    config = tmp_path / "slave.cfg"
    config.write_text(
        "[cluster]\nsecret = lean-slave-secret-0123456789abcdef\n"
        "[slave]\nmaster_ip = 127.0.0.1\nrolse = basic\n"
    )
    try:
        load_config(str(config), need="slave")
    except ConfigError as exc:
        assert "did you mean roles?" in str(exc)
    else:
        raise AssertionError("a wrong key was accepted")


def test_new_node_ids_are_version_4_uuids_written_as_uuid_writes_them():
    ids = {new_node_id() for _ in range(200)}
    assert len(ids) == 200
    for node_id in ids:
        parsed = uuid.UUID(node_id)
        assert str(parsed) == node_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_the_slave_unit_runs_with_one_malloc_arena_and_the_bench_with_it():
    from bench.slave_footprint import SLAVE_UNIT, unit_environment

    text = SLAVE_UNIT.read_text(encoding="utf-8")
    service = text.split("[Service]", 1)[1].split("[Install]", 1)[0]
    assert "\nEnvironment=MALLOC_ARENA_MAX=1\n" in service
    assert unit_environment() == {"MALLOC_ARENA_MAX": "1"}  # PYTHONPATH is templated: left out
