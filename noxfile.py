"""The unit and integration tests on every Python the README claims (3.9 to 3.13).

``make nox`` runs them all; ``make test`` runs the versions other than the one of
``.venv`` (its own ``make pytest`` covers that one) alongside Molecule. Molecule,
Ansible and the linters stay on the system Python of ``.venv``.

Interpreters are looked up on PATH and then under pyenv
(``$PYENV_ROOT/versions/3.X.*/bin``), which carries CPython 3.9 to 3.13 on the
project's machines. Nothing is downloaded: a version that is missing fails its
session with a message naming the version and how to install it, because a
claimed Python that is never tested is how support silently rots.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]

nox.options.envdir = ".cache/nox"  # .cache/ is ignored by git, ruff, yamllint, ansible-lint
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True


def _pyenv_bin(version: str) -> Optional[str]:
    """The bin directory of the newest pyenv CPython ``version`` (e.g. 3.9 -> 3.9.18)."""
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    found = []
    for path in glob.glob(os.path.join(root, "versions", f"{version}.*", "bin")):
        patch = Path(path).parent.name[len(version) + 1 :]
        if patch.isdigit() and os.access(os.path.join(path, f"python{version}"), os.X_OK):
            found.append((int(patch), path))
    return max(found)[1] if found else None


def _add_interpreters_to_path() -> None:
    """Put pyenv's versions on PATH for nox (pyenv's shims refuse inactive versions).

    A version found nowhere is named on stderr with the way to install it; nox
    then fails its session ("interpreter not found").
    """
    extra = []
    for version in PYTHONS:
        if _real_python_on_path(version):
            continue
        path = _pyenv_bin(version)
        if path:
            extra.append(path)
        else:
            print(
                f"noxfile: Python {version} is neither on PATH nor under pyenv"
                f" ($PYENV_ROOT/versions/{version}.*): install it (`pyenv install {version}`);"
                f" the README claims it, so its tests-{version} session fails",
                file=sys.stderr,
            )
    if extra:
        os.environ["PATH"] = os.pathsep.join([*extra, os.environ.get("PATH", "")])


def _real_python_on_path(version: str) -> bool:
    """A ``python3.X`` on PATH that is not a pyenv shim (a shim fails unless activated)."""
    found = shutil.which(f"python{version}")
    return bool(found) and "/shims/" not in found


_add_interpreters_to_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """pytest with the test requirements on one Python version."""
    session.install("-r", "requirements-test.txt")
    session.install("--no-deps", "-e", ".")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs)
