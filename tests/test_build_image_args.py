"""molecule/resources/build-image.sh refuses a suite or architecture it cannot build.

It takes the Debian suite (bookworm, trixie) and the architecture (amd64, arm64,
armhf) of a Raspberry Pi OS it stands in for; anything else must stop it at
once with exit 2 and a message naming the choices, before it installs,
debootstraps or talks to Docker.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "molecule" / "resources" / "build-image.sh"


def build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("sid",), "bookworm or trixie"),
        (("bullseye", "amd64"), "bookworm or trixie"),
        (("trixie", "mips64el"), "amd64, arm64 or armhf"),
        (("bookworm", "i386"), "amd64, arm64 or armhf"),
    ],
)
def test_an_unknown_suite_or_architecture_is_refused(args: tuple[str, ...], named: str):
    result = build(*args)
    assert result.returncode == 2
    assert named in result.stderr and result.stdout == ""
