"""Time the Molecule fleet (1 master + 3 slaves) on one OS suite and architecture.

Why: Raspberry Pi OS is bookworm or trixie, 64-bit (arm64) or 32-bit (armhf).
The amd64 images run in `make test`; the ARM ones run under qemu-user-static
and take several times longer, so whether they fit in `make test` is decided on
these figures. Also records what the services cost in memory on that image.

Runs the `default` scenario step by step (destroy, create with prepare,
converge, idempotence, verify), timing each; after verify it reads, in every container,
the OS, the architecture and pointer size Python sees, and the RSS of
rpicluster-master / rpicluster-slave; then destroys the fleet. Each step's log
is in .cache/fleet-matrix/. Use under the docker lock on a shared machine:

    flock /work/locks/docker.lock python -m bench.fleet_matrix --image bookworm-armhf

Under qemu-user the RSS includes the emulator's own memory (its translated
code), so it overstates what a real Pi uses; the amd64 figure is the baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "molecule" / "resources"
LOGS = ROOT / ".cache" / "fleet-matrix"
# `molecule create` also runs prepare.yml (waiting for systemd to boot).
STEPS = ("destroy", "create", "converge", "idempotence", "verify")
CONTAINERS = ("rpi-master", "rpi-node-01", "rpi-node-02", "rpi-node-03")
# What every container reports: OS codename, dpkg architecture, Python's view.
PROBE = (
    '. /etc/os-release; echo "$VERSION_CODENAME $(dpkg --print-architecture) '
    '$(python3 -c "import platform, struct; '
    "print(platform.machine(), struct.calcsize('P') * 8, platform.python_version())\")\"; "
    "ps -eo rss=,args= | grep -E 'bin/rpicluster-(master|slave)' | grep -v grep || true"
)


def molecule(step: str, env: dict[str, str], tag: str) -> float:
    """Run one Molecule step of the default scenario; return its wall time."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{tag}-{step}.log"
    start = time.monotonic()
    with log.open("w", encoding="utf-8") as out:
        result = subprocess.run(
            ["molecule", step, "-s", "default"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    seconds = time.monotonic() - start
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        head = f"molecule {step} failed after {seconds:.0f} s ({log}):"
        raise RuntimeError("\n".join([head, *tail]))
    return seconds


def probe(container: str) -> tuple[str, list[str]]:
    """The container's OS/arch/Python line and its rpicluster processes' 'RSS-kB args' lines."""
    out = subprocess.run(
        ["docker", "exec", container, "sh", "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], [line.strip() for line in out[1:] if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image",
        default="bookworm",
        help="RPICLUSTER_IMAGE_TAG: bookworm, trixie, bookworm-arm64, bookworm-armhf, ...",
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=0,
        help="RPICLUSTER_MOLECULE_PATIENCE (default 1 on amd64, 6 emulated)",
    )
    args = parser.parse_args(argv)
    suite, _, arch = args.image.partition("-")
    arch = arch or "amd64"
    patience = args.patience or (1 if arch == "amd64" else 6)

    subprocess.run(["bash", str(RESOURCES / "docker-engine.sh")], check=True)
    build_start = time.monotonic()
    subprocess.run(["bash", str(RESOURCES / "build-image.sh"), suite, arch], check=True)
    build = time.monotonic() - build_start

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["RPICLUSTER_IMAGE_TAG"] = args.image
    env["RPICLUSTER_MOLECULE_PATIENCE"] = str(patience)

    times: dict[str, float] = {}
    lines: list[str] = []
    try:
        for step in STEPS:
            times[step] = molecule(step, env, args.image)
        for container in CONTAINERS:
            system, processes = probe(container)
            rss = ", ".join(
                f"{'rpicluster-master' if 'rpicluster-master' in line else 'rpicluster-slave'} "
                f"{int(line.split()[0]) / 1024:.1f} MB"
                for line in processes
            )
            lines.append(f"{container}: {system}; RSS {rss or 'no rpicluster process'}")
    finally:
        times["destroy (end)"] = molecule("destroy", env, args.image)
    total = sum(times.values())
    steps = ", ".join(f"{step} {seconds:.0f} s" for step, seconds in times.items())
    load = os.getloadavg()
    report.append(
        f"Molecule fleet on {args.image} (1 master + 3 slaves, default scenario)",
        [
            f"result: passed (create + prepare, converge, idempotence, verify); "
            f"RPICLUSTER_MOLECULE_PATIENCE={patience}",
            f"steps: {steps}; total {total / 60:.1f} min (image check/build {build:.0f} s)",
            *lines,
            f"machine load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(2 cores shared with other sessions)",
            "RSS under qemu-user includes the emulator's translated code"
            if arch != "amd64"
            else "RSS: native amd64",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
