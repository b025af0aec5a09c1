"""Footprint of one ``rpicluster-slave`` running ``basic,vitals`` with the default intervals.

Starts a master and two slaves as subprocesses on 127.0.0.1: one launched the
way the wheel's console script runs on a Pi, one from the dev venv's console
script (whose editable-install import hooks cost extra RSS), waits until both
are registered with vitals, then samples their RSS every second and their CPU
time at both ends of the same window. The Pi-like one runs with the fixed
``Environment=`` lines of the slave's systemd unit, as systemd runs it on a Pi.
Each slave's RSS is also split by kind of mapping (bench/memmap.py). Targets
(issue 2, kept by issue 9 with the Pi health readings): at most 20 MB RSS and
0.5 % of one core; with ``--tls`` (issue 8) at most 22 MB.

    python -m bench.slave_footprint --seconds 60
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

from bench import memmap
from bench.master_load import cpu_pressure
from bench.report import append
from bench.simslaves import enable_tls, tls_dir, tls_settings
from rpicluster.client import ClientError, MasterClient

RSS_TARGET_MB = 20.0
CPU_TARGET_PERCENT = 0.5
SECRET = "bench-footprint-secret-0123456789"


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def command(script: str, module_args: list[str]) -> list[str]:
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.exists() else [sys.executable, "-m", "rpicluster", *module_args]


def tls_section(name: str) -> str:
    """``[tls]`` with ``name``'s credential when the bench runs with --tls, else ''."""
    if not tls_dir():
        return ""
    settings = tls_settings(name)
    return (
        f"[tls]\nca_file = {settings.ca_file}\ncert_file = {settings.cert_file}\n"
        f"key_file = {settings.key_file}\n"
    )


def client(port: int, timeout: float) -> MasterClient:
    """A status client; with --tls it shows the master's own credential."""
    tls = tls_settings() if tls_dir() else None
    return MasterClient("127.0.0.1", port, SECRET, timeout=timeout, tls=tls)


def write_configs(workdir: Path, port: int, slaves: list[str]) -> tuple[Path, list[Path]]:
    master = workdir / "master.cfg"
    master.write_text(
        f"[cluster]\nsecret = {SECRET}\n"
        f"[master]\nsocket_bind_ip = 127.0.0.1\nsocket_port = {port}\n"
        f"state_dir = {workdir / 'master-state'}\n" + tls_section("master")
    )
    configs = []
    for name in slaves:
        config = workdir / f"slave-{name}.cfg"
        config.write_text(
            f"[cluster]\nsecret = {SECRET}\n"
            f"[slave]\nmaster_ip = 127.0.0.1\nsocket_port = {port}\nroles = basic, vitals\n"
            f"state_dir = {workdir / ('state-' + name)}\n" + tls_section(name)
        )
        configs.append(config)
    return master, configs


def pi_like_python(workdir: Path) -> str:
    """A bare venv with rpicluster installed in it as pip installs the wheel on a Pi.

    The package is copied into the venv's site-packages and byte-compiled there
    (pip compiles every module at install time, so a Pi's slave loads ``.pyc``
    files; compiling the sources at each start would cost about 1 MB of RSS that
    a Pi never pays, and would happen here whenever PYTHONDONTWRITEBYTECODE is
    set). psutil comes from a plain sys.path entry. No editable-install finder
    and no ``_distutils_hack``, whose imports the dev venv's processes pay on top.
    """
    venv = workdir / "pi-venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    repo = Path(__file__).resolve().parent.parent
    shutil.copytree(
        repo / "rpicluster",
        Path(site, "rpicluster"),
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    subprocess.run(
        [str(python), "-m", "compileall", "-q", str(Path(site, "rpicluster"))], check=True
    )
    Path(site, "rpicluster-bench.pth").write_text(f"{Path(psutil.__file__).parent.parent}\n")
    return str(python)


SLAVE_UNIT = Path(__file__).resolve().parent.parent / (
    "roles/rpicluster_slave/templates/rpicluster-slave.service.j2"
)


def unit_environment() -> dict[str, str]:
    """The fixed ``Environment=`` settings of the slave's systemd unit (template).

    The Pi-like slave runs with them, as systemd runs the slave on a Pi (glibc's
    malloc knobs change its RSS); templated ones (PYTHONPATH of custom roles) are
    left out. Read from the role's template so the bench and the unit stay in step.
    """
    env = {}
    for line in SLAVE_UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment=") and "{" not in line:
            key, _, value = line[len("Environment=") :].partition("=")
            env[key] = value
    return env


# What the console script that pip writes for rpicluster-slave runs.
CONSOLE_SCRIPT = "import sys; from rpicluster.cli import slave_main; sys.exit(slave_main())"


# Keys of the issue 9 readings: the measured slaves must send them (None on a non-Pi).
PI_READINGS = (
    "throttled",
    "under_voltage_alarm",
    "net_rx_bytes_per_s",
    "net_tx_bytes_per_s",
    "disk_read_bytes_per_s",
    "disk_write_bytes_per_s",
)


def latest_vitals(port: int, node_id: str) -> dict:
    """The node's latest vitals at the master ({} when it cannot answer)."""
    try:
        with client(port, 5) as master:
            nodes = master.cluster_state()["nodes"]
    except ClientError:
        return {}
    return next((node["vitals"] or {} for node in nodes if node["node_id"] == node_id), {})


def wait_registered(port: int, node_id_file: Path, timeout: float = 30.0) -> tuple[str, dict]:
    """Block until the slave's node is alive with a vitals reading; return id and vitals."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node_id_file.exists():
            node_id = node_id_file.read_text().strip()
            try:
                with client(port, 2) as master:
                    nodes = master.cluster_state()["nodes"]
            except ClientError:
                nodes = []
            for node in nodes:
                if node["node_id"] == node_id and node["state"] == "alive" and node["vitals"]:
                    return node_id, node["vitals"]
        time.sleep(0.2)
    raise SystemExit(f"a slave did not register with vitals within {timeout:g} s")


def measure(seconds: float, tls: bool = False, env: Optional[dict[str, str]] = None) -> list[str]:
    """Run a Pi-like slave and the dev venv's console script side by side, same window.

    ``env``: variables set for the two slaves only (the unit's ``Environment=``
    lines on a Pi, such as glibc's MALLOC_ARENA_MAX), so each can be measured.
    """
    envs = {
        "pi": {**os.environ, **unit_environment(), **(env or {})},
        "dev": {**os.environ, **(env or {})},
    }
    workdir = Path(tempfile.mkdtemp(prefix="rpicluster-footprint-"))
    port = free_port()
    names = ["pi", "dev"]
    if tls:
        enable_tls(str(workdir / "pki"), names)
    master_cfg, slave_cfgs = write_configs(workdir, port, names)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    commands = {
        "pi": [pi_like_python(workdir), "-c", CONSOLE_SCRIPT],
        "dev": command("rpicluster-slave", ["slave"]),
    }
    master = subprocess.Popen(
        [*command("rpicluster-master", ["master"]), "--config", str(master_cfg)], **quiet
    )
    procs: dict[str, subprocess.Popen] = {}
    load_before = os.getloadavg()[0]
    try:
        for name, config in zip(names, slave_cfgs):
            procs[name] = subprocess.Popen(
                [*commands[name], "--config", str(config)], env=envs[name], **quiet
            )
        vitals, node_ids = {}, {}
        for name in names:
            node_ids[name], vitals[name] = wait_registered(
                port, workdir / f"state-{name}" / "node_id"
            )
            missing = [key for key in PI_READINGS if key not in vitals[name]]
            if missing:
                raise SystemExit(f"the {name} slave sends no {', '.join(missing)}")
        handles = {name: psutil.Process(proc.pid) for name, proc in procs.items()}
        time.sleep(2.0)  # let the start-up work (imports, first readings) settle
        start_cpu = {name: h.cpu_times() for name, h in handles.items()}
        start = time.monotonic()
        rss: dict[str, list[int]] = {name: [] for name in names}
        while time.monotonic() - start < seconds:
            for name, handle in handles.items():
                rss[name].append(handle.memory_info().rss)
            time.sleep(1.0)
        elapsed = time.monotonic() - start
        end_cpu = {name: h.cpu_times() for name, h in handles.items()}
        uss = {name: h.memory_full_info().uss for name, h in handles.items()}
        threads = {name: h.num_threads() for name, h in handles.items()}
        where = {name: memmap.describe(h.pid) for name, h in handles.items()}
        alive = all(proc.poll() is None for proc in procs.values())
        psi = cpu_pressure()
        last = latest_vitals(port, node_ids["pi"])  # a later reading: the rates have values
    finally:
        for proc in [*procs.values(), master]:
            proc.terminate()
        for proc in [*procs.values(), master]:
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    if not alive:
        raise SystemExit("a slave process ended during the window")
    labels = {
        "pi": "as installed on a Pi (plain sys.path, console script)",
        "dev": "dev venv (editable install, .venv/bin/rpicluster-slave)",
    }
    present = [key for key in PI_READINGS if last.get(key) is not None]
    lines = [
        "slaves: roles basic,vitals; heartbeat 1 s, vitals every 5 s (defaults);"
        f" {threads['pi']} threads each; both measured in the same {elapsed:.1f} s window",
        f"vitals: {len(vitals['pi'])} keys with the Pi readings ({', '.join(PI_READINGS)});"
        f" with a value in the last reading on this machine: {', '.join(present) or 'none'}",
        "environment: the pi slave "
        + _env_text({**unit_environment(), **(env or {})})
        + " (the unit's Environment= lines"
        + (" and --env" if env else "")
        + f"), the dev slave {_env_text(env or {})}",
        f"machine load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f},"
        f" CPU pressure (PSI some avg60) {psi} (other sessions share these cores)",
    ]
    for name in names:
        before, after = start_cpu[name], end_cpu[name]
        used = (after.user - before.user) + (after.system - before.system)
        cpu_percent = 100.0 * used / elapsed
        rss_mb = [value / 2**20 for value in rss[name]]
        peak, median = max(rss_mb), statistics.median(rss_mb)
        verdict_rss = "met" if peak <= RSS_TARGET_MB else "MISSED"
        verdict_cpu = "met" if cpu_percent <= CPU_TARGET_PERCENT else "MISSED"
        lines.append(
            f"{labels[name]}: RSS median {median:.1f} MB, peak {peak:.1f} MB"
            f" (USS {uss[name] / 2**20:.1f} MB), target <= {RSS_TARGET_MB:g} MB {verdict_rss};"
            f" CPU {cpu_percent:.3f} % of one core ({used:.2f} s),"
            f" target <= {CPU_TARGET_PERCENT:g} % {verdict_cpu}"
        )
        lines.append(f"{name} slave's RSS by mapping (bench/memmap.py): {where[name]}")
    return lines


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in env.items()) or "(unchanged)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window")
    parser.add_argument("--tls", action="store_true", help="with [tls] (issue 8: <= 22 MB)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the slaves (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    args = parser.parse_args()
    if args.seconds < 5:
        parser.error("--seconds must be at least 5")
    global RSS_TARGET_MB
    if args.tls:
        RSS_TARGET_MB = 22.0
    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    lines = measure(args.seconds, args.tls, env)
    tls = " with TLS" if args.tls else ""
    append(f"slave_footprint: one rpicluster-slave running basic,vitals{tls}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
