"""`rpicluster check-role`: a custom role file is imported as the slave would, on the controller."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from rpicluster import cli, rolecheck

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
from rpicluster.slave import RpiBasicSlaveThread


class FanSlave(RpiBasicSlaveThread):
    role = "fan"

    def perform_action(self):
        self.wait(1)
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_good_role_file(tmp_path):
    path = write(tmp_path, "fan.py", GOOD)
    result = rolecheck.check_role(f"{path}:FanSlave")
    assert (result.class_name, result.role, result.stand_ins) == ("FanSlave", "fan", [])
    assert "fan" not in sys.modules  # the check leaves the controller's modules as they were


def test_the_shipped_example():
    result = rolecheck.check_role(f"{ROOT / 'examples' / 'custom_slave.py'}:ProcessCountSlave")
    assert result.role == "processes"


def test_a_syntax_error_names_file_and_line(tmp_path):
    # A missing colon: every Python from 3.9 reports its own line (3.9 reports an
    # unclosed parenthesis at the end of the file instead).
    path = write(
        tmp_path,
        "fan.py",
        GOOD.replace("class FanSlave(RpiBasicSlaveThread):", "class FanSlave(RpiBasicSlaveThread)"),
    )
    with pytest.raises(rolecheck.RoleCheckError) as caught:
        rolecheck.check_role(f"{path}:FanSlave")
    assert str(caught.value).startswith(f"{path}:4: SyntaxError")


def test_a_wrong_class_name_names_file_line_and_the_near_miss(tmp_path):
    path = write(tmp_path, "fan.py", GOOD)
    with pytest.raises(rolecheck.RoleCheckError) as caught:
        rolecheck.check_role(f"{path}:FanSlav")
    message = str(caught.value)
    assert message.startswith(f"{path}:4: no class 'FanSlav'")
    assert "did you mean 'FanSlave'" in message


def test_a_class_that_is_not_a_slave_thread(tmp_path):
    path = write(
        tmp_path, "fan.py", "import threading\n\n\nclass FanSlave(threading.Thread):\n    pass\n"
    )
    with pytest.raises(rolecheck.RoleCheckError, match=r"fan\.py:4: FanSlave is not a subclass"):
        rolecheck.check_role(f"{path}:FanSlave")


def test_an_exception_while_importing_names_the_line(tmp_path):
    path = write(
        tmp_path, "fan.py", "import os\n\nPIN = int(os.environ['NO_SUCH_VARIABLE_HERE'])\n"
    )
    with pytest.raises(rolecheck.RoleCheckError, match=r"fan\.py:3: import failed: KeyError"):
        rolecheck.check_role(f"{path}:FanSlave")


def test_pi_only_libraries_get_stand_ins(tmp_path):
    text = "import gpiozero_not_here\nfrom RPi_not_here import GPIO\n" + GOOD
    path = write(tmp_path, "fan.py", text)
    result = rolecheck.check_role(f"{path}:FanSlave")
    assert sorted(result.stand_ins) == ["RPi_not_here", "gpiozero_not_here"]
    assert "stand-ins for RPi_not_here, gpiozero_not_here" in result.describe()
    assert "gpiozero_not_here" not in sys.modules


def test_rpicluster_modules_are_never_stood_in_for(tmp_path):
    path = write(tmp_path, "fan.py", "from rpicluster.no_such_module import X\n" + GOOD)
    with pytest.raises(rolecheck.RoleCheckError, match=r"fan\.py:1: ModuleNotFoundError"):
        rolecheck.check_role(f"{path}:FanSlave")


def test_a_file_named_like_a_taken_module_is_refused(tmp_path):
    path = write(tmp_path, "rpicluster.py", GOOD)
    with pytest.raises(rolecheck.RoleCheckError, match="is taken by"):
        rolecheck.check_role(f"{path}:FanSlave")


def test_a_module_from_a_wheel(tmp_path):
    wheel = tmp_path / "fanrole-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fanrole/__init__.py", "")
        archive.writestr("fanrole/fan.py", GOOD)
    assert rolecheck.check_role("fanrole.fan:FanSlave", [str(wheel)]).role == "fan"
    with pytest.raises(rolecheck.RoleCheckError, match="no module 'nowhere'"):
        rolecheck.check_role("nowhere:FanSlave", [str(wheel)])


def test_a_module_found_as_a_file_in_a_directory_is_checked_as_that_file(tmp_path):
    path = write(tmp_path, "fan.py", GOOD.replace("RpiBasicSlaveThread):", "RpiBasicSlaveThread)"))
    with pytest.raises(rolecheck.RoleCheckError) as caught:
        rolecheck.check_role("fan:FanSlave", [str(tmp_path)])
    assert str(caught.value).startswith(f"{path}:4: SyntaxError")


@pytest.mark.parametrize("spec", ["fan.py", "fan.py:", "not-a-module:Cls", "fan.py:1x"])
def test_malformed_specs(spec):
    with pytest.raises(ValueError):
        rolecheck.parse_spec(spec)


def test_the_command_exit_codes_and_lines(tmp_path, capsys):
    good = write(tmp_path, "fan.py", GOOD)
    bad = write(tmp_path, "pump.py", "def broken(:\n")
    assert cli.main(["check-role", f"{good}:FanSlave"]) == 0
    assert capsys.readouterr().out.startswith(f"ok {good}:FanSlave:")
    assert cli.main(["check-role", f"{good}:FanSlave", f"{bad}:Pump"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok ") and lines[1].startswith(f"error: {bad}:1: SyntaxError")
    assert cli.main(["check-role", "nonsense"]) == 2


def test_python_dash_m_works_from_the_source_tree(tmp_path):
    good = write(tmp_path, "fan.py", GOOD)
    done = subprocess.run(
        [sys.executable, "-m", "rpicluster", "check-role", f"{good}:FanSlave"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "role 'fan'" in done.stdout
