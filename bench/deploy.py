"""Time the demo fleet's deploy: a first deploy and unchanged re-runs.

Why: the daily loop of a user is "edit inventory/pis, run deploy.yml"; how long
a fresh fleet takes and how long a no-op re-run takes is what they feel. The
demo fleet (four systemd containers reached over SSH as `pi` with sudo, see
molecule/resources/demo.sh) is the closest thing to real Pis on this machine.

Runs `demo.sh down`, then `demo.sh up` (fresh containers, first deploy), then
`demo.sh up` again --reruns times (unchanged). Each `up` writes the
ansible-playbook duration and PLAY RECAP to .cache/demo/last-deploy.json.
Leaves the demo fleet running (remove it with `make demo-down`).

    python -m bench.deploy [--reruns N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "molecule" / "resources"
LAST_DEPLOY = ROOT / ".cache" / "demo" / "last-deploy.json"


def run(*args: str) -> float:
    """Run one resource script, raise on failure, return its wall time in seconds."""
    start = time.monotonic()
    subprocess.run(["bash", str(RESOURCES / args[0]), *args[1:]], cwd=ROOT, check=True)
    return time.monotonic() - start


def last_deploy() -> dict[str, Any]:
    """What demo.sh recorded about the deploy it just ran."""
    data = json.loads(LAST_DEPLOY.read_text(encoding="utf-8"))
    if data.get("rc") != 0 or not data.get("recap"):
        raise RuntimeError(f"{LAST_DEPLOY}: the deploy did not succeed: {data}")
    return data


def changed(data: dict[str, Any]) -> int:
    return sum(host["changed"] for host in data["recap"].values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reruns", type=int, default=3, help="unchanged re-runs to time (default 3)"
    )
    args = parser.parse_args(argv)
    if args.reruns < 1:
        parser.error("--reruns must be at least 1")

    load_before = os.getloadavg()[0]
    run("docker-engine.sh")
    run("build-image.sh")
    run("demo.sh", "down")
    first_up = run("demo.sh", "up")
    first = last_deploy()
    reruns = []
    for _ in range(args.reruns):
        run("demo.sh", "up")
        reruns.append(last_deploy())

    rerun_seconds = [r["seconds"] for r in reruns]
    rerun_changed = [changed(r) for r in reruns]
    median = statistics.median(rerun_seconds)
    report.append(
        "Demo fleet deploy (1 master + 3 slaves, containers over SSH)",
        [
            f"first deploy (ansible-playbook -i inventory/demo deploy.yml on fresh containers): "
            f"{first['seconds']:.1f} s, changed={changed(first)} over {len(first['recap'])} hosts",
            f"whole first `make demo` step (containers + SSH + deploy + status): {first_up:.1f} s",
            f"unchanged re-run: median {median:.1f} s of {len(reruns)} "
            f"({', '.join(f'{s:.1f}' for s in rerun_seconds)} s), changed={rerun_changed}",
            f"ratio first / unchanged re-run: {first['seconds'] / median:.1f}x",
            f"machine load average (1 min) before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}"
            " (other sessions share these 2 cores)",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
