"""The role's argument spec, its preflight and the CLI accept the same log levels.

A level the role lets through but ``rpicluster-slave --log-level`` refuses makes
the service exit 2, and the unit's ``RestartPreventExitStatus=2`` then leaves it
down for good (issue 9: ``CRITICAL`` did exactly that).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rpicluster import cli, command

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "roles" / "rpicluster_common"
PREFLIGHT_TASK = "Preflight | the log level is one the services accept"


def load(path: Path):
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def spec_levels() -> list[str]:
    specs = load(COMMON / "meta" / "argument_specs.yml")["argument_specs"]
    return specs["main"]["options"]["rpicluster_log_level"]["choices"]


def preflight_levels() -> list[str]:
    tasks = load(COMMON / "tasks" / "preflight.yml")
    (task,) = [task for task in tasks if task.get("name") == PREFLIGHT_TASK]
    return task["vars"]["rpicluster_log_levels"]


def test_spec_preflight_and_cli_name_the_same_levels():
    assert spec_levels() == preflight_levels() == list(command.LOG_LEVELS)


def test_the_role_default_is_one_of_them():
    defaults = load(COMMON / "defaults" / "main.yml")
    assert defaults["rpicluster_log_level"] in command.LOG_LEVELS


@pytest.mark.parametrize("level", spec_levels())
@pytest.mark.parametrize("prog", ["rpicluster-master", "rpicluster-slave"])
def test_the_service_entry_points_accept_every_spec_level(prog: str, level: str):
    args = cli._single(prog, "test").parse_args(["--log-level", level])
    assert args.log_level == level


def test_a_level_outside_the_set_is_refused_by_all_three(capsys):
    with pytest.raises(SystemExit) as exited:
        cli._single("rpicluster-slave", "test").parse_args(["--log-level", "TRACE"])
    assert exited.value.code == 2 and "--log-level" in capsys.readouterr().err
    assert "TRACE" not in spec_levels() and "TRACE" not in preflight_levels()


def test_critical_runs_a_real_command(tmp_path: Path):
    """The CLI as the unit runs it: CRITICAL gets past argument parsing and logging setup."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there: status exits 1 (unreachable), not 2 (usage)
    config = tmp_path / "rpicluster.cfg"
    config.write_text(
        "[cluster]\nsecret = log-level-test-secret-0123\n"
        f"[slave]\nmaster_ip = 127.0.0.1\nsocket_port = {port}\nstate_dir = {tmp_path}\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "rpicluster", "status", "--config", str(config)]
        + ["--log-level", "CRITICAL", "--timeout", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == command.EXIT_UNREACHABLE, result.stderr
    assert "--log-level" not in result.stderr
