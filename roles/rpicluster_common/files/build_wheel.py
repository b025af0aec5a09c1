"""Build the rpicluster wheel on the Ansible controller, reproducibly.

Run by the ``rpicluster_common`` role once per play (``run_once``,
``delegate_to: localhost``). The source is copied to a fresh temporary directory
first, so a stale ``build/`` in the checkout can never leak into the wheel and
two runs at once never share build files. ``SOURCE_DATE_EPOCH`` is pinned, so an
unchanged source gives a byte-identical wheel: the cached copy is then left
untouched and the Pis see nothing to do. Prints one JSON line for Ansible:
``{"changed": bool, "wheel": path, "name": file name, "sha256": hex}``.
Stdlib only: it runs under ``ansible_playbook_python``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# 1980-01-01, the earliest time a zip file can hold: the wheel's bytes depend on
# its content alone, never on when or where it was built.
DEFAULT_EPOCH = "315532800"
SOURCE_FILES = ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in")
PACKAGE = "rpicluster"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_source(source: Path, into: Path) -> None:
    """Copy only what the wheel is built from (no .venv, .git, build/ or caches)."""
    if not (source / PACKAGE).is_dir():
        raise SystemExit(f"build_wheel: {source} has no {PACKAGE}/ package directory")
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, into / name)
    if not (into / "setup.cfg").is_file() and not (into / "pyproject.toml").is_file():
        raise SystemExit(f"build_wheel: {source} has neither setup.cfg nor pyproject.toml")
    shutil.copytree(source / PACKAGE, into / PACKAGE, ignore=IGNORE)


def can_build_offline() -> bool:
    """True when this Python can build without fetching setuptools from an index.

    That needs setuptools 61 or later and a ``bdist_wheel`` command (setuptools
    70.1 or later has its own; older ones need the ``wheel`` package). Otherwise
    pip builds in an isolated environment, which downloads them.
    """
    try:
        import setuptools
    except ImportError:
        return False
    parts = setuptools.__version__.split(".")
    version = tuple(int(p) if p.isdigit() else 0 for p in (parts + ["0"])[:2])
    if version < (61, 0):
        return False
    if version >= (70, 1):
        return True
    return importlib.util.find_spec("wheel") is not None


def build(source: Path, cache: Path) -> dict[str, object]:
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH=os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    env["PYTHONHASHSEED"] = "0"
    with tempfile.TemporaryDirectory(prefix="rpicluster-wheel-") as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "out")
        src.mkdir()
        copy_source(source, src)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet"]
        command += ["--disable-pip-version-check", "--wheel-dir", str(out)]
        if can_build_offline():
            command.append("--no-build-isolation")
        command.append(str(src))
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-20:]
            raise SystemExit("build_wheel: pip wheel failed:\n" + "\n".join(tail))
        wheels = sorted(out.glob(f"{PACKAGE}-*-py3-none-any.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"build_wheel: expected one {PACKAGE} wheel, got {wheels}")
        built = wheels[0]
        target = cache / built.name
        digest = sha256(built)
        changed = not target.is_file() or sha256(target) != digest
        if changed:
            staged = cache / f".{built.name}.tmp{os.getpid()}"
            shutil.copyfile(built, staged)
            os.replace(staged, target)  # atomic: a concurrent run sees old or new, never half
    return {"changed": changed, "wheel": str(target), "name": target.name, "sha256": digest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, type=Path, help="the repository root")
    parser.add_argument("--cache", required=True, type=Path, help="where wheels are kept")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.source.resolve(), args.cache.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
