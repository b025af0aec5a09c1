"""What the standard-library modules a slave imports cost it in RSS, group by group.

Why: a module stays in a slave's RSS for its whole life, and the slave's budget
is 20 MB (22 MB with TLS). This lists the standard-library modules the slave's
start imports (its config, its roles, its TLS layer), then imports exactly that
set in a fresh interpreter, with and without each group below (a left-out module
is blocked, and a module that needs it is left out too), so each line is what
the slave would save if nothing of rpicluster's needed that group:

    python -m bench.slave_imports
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bench import report

REPO = Path(__file__).resolve().parent.parent

# A slave's start with TLS: the modules it imports, stdlib ones kept.
_LIST = """
import sys
sys.modules["_hashlib"] = None  # as cli._lean_hashing does for built-in roles
before = set(sys.modules)
import rpicluster.cli, rpicluster.config, rpicluster.slave, rpicluster.roles.vitals
import rpicluster.tls
names = [n for n in sys.modules if n not in before and not n.startswith(("rpicluster", "psutil"))]
print(" ".join(names))
"""

# Import a module set (argv[1]) with some blocked (argv[2]); print RSS in KiB.
_MEASURE = """
import importlib, sys
blocked = [n for n in sys.argv[2].split(",") if n]
for name in blocked:
    sys.modules[name] = None
sys.modules["_hashlib"] = None
for name in sys.argv[1].split():
    if name not in blocked:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # needs a blocked module: left out with it
import psutil  # the vitals role's, always there
with open("/proc/self/smaps_rollup") as rollup:
    print(next(int(line.split()[1]) for line in rollup if line.startswith("Rss:")))
"""

GROUPS = {
    "dataclasses (the settings classes) and what it imports: inspect, ast, dis, opcode, copy": (
        "dataclasses,inspect,ast,dis,opcode,copy"
    ),
    "argparse and gettext (the command line)": "argparse,gettext",
    "typing at run time (annotations are strings already)": "typing",
    "ssl (TLS itself)": "ssl,_ssl",
}


def rss_kib(python: str, modules: str, blocked: str) -> int:
    done = subprocess.run(
        [python, "-c", _MEASURE, modules, blocked],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per set; the median is kept")
    parser.add_argument("--no-append", action="store_true", help="do not write results.md")
    args = parser.parse_args()
    python = sys.executable
    modules = subprocess.run(
        [python, "-c", _LIST], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()

    def median(blocked: str) -> int:
        values = sorted(rss_kib(python, modules, blocked) for _ in range(args.runs))
        return values[len(values) // 2]

    full = median("")
    lines = [
        f"the slave's start (config, basic and vitals roles, TLS) imports"
        f" {len(modules.split())} standard-library modules; importing them and psutil"
        f" alone: {full / 1024:.1f} MB of RSS (median of {args.runs})",
    ]
    together = []
    for label, blocked in GROUPS.items():
        saved = full - median(blocked)
        lines.append(f"without {label}: {saved / 1024:.2f} MB less")
        if not blocked.startswith("ssl"):
            together.append(blocked)
    saved = full - median(",".join(together))
    lines.append(f"without all but ssl of the above together: {saved / 1024:.2f} MB less")
    if args.no_append:
        print("\n".join(lines))
    else:
        report.append("slave_imports: what the slave's standard-library imports cost", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
