"""The roles' controller-side wheel build (roles/rpicluster_common/files/build_wheel.py).

Deploys rely on it being reproducible: an unchanged source must give a
byte-identical wheel, so the Pis see nothing to reinstall and restart, while a
changed source must give a new wheel.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "roles" / "rpicluster_common" / "files" / "build_wheel.py"


def build(source: Path, cache: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(BUILD), "--source", str(source), "--cache", str(cache)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """A frozen copy of the package, so edits elsewhere in the tree cannot interfere."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "rpicluster", src / "rpicluster", ignore=shutil.ignore_patterns("__pycache__")
    )
    return src


def test_same_source_gives_identical_wheel_and_a_change_a_new_one(source: Path, tmp_path: Path):
    first = build(source, tmp_path / "cache-a")
    assert first["changed"] is True
    wheel = Path(first["wheel"])
    assert wheel.name.startswith("rpicluster-") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "rpicluster/cli.py" in names
        assert not [n for n in names if "__pycache__" in n]
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    first_bytes = wheel.read_bytes()

    # A rebuild elsewhere gives the very same bytes; into the same cache it is "unchanged".
    other = build(source, tmp_path / "cache-b")
    assert Path(other["wheel"]).read_bytes() == first_bytes
    again = build(source, tmp_path / "cache-a")
    assert again == {**first, "changed": False}

    (source / "rpicluster" / "__init__.py").write_text(
        (source / "rpicluster" / "__init__.py").read_text() + "\n# changed\n"
    )
    changed = build(source, tmp_path / "cache-a")
    assert changed["changed"] is True
    assert changed["sha256"] != first["sha256"]


def test_a_source_without_the_package_fails_clearly(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(BUILD), "--source", str(tmp_path), "--cache", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "has no rpicluster/ package directory" in result.stderr
