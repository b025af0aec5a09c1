"""Mutation testing of the core modules with mutmut, one module at a time (`make mutation`).

Why one module at a time, in a copy: mutmut 3 mutates every function of the files it is
given and runs, for each mutant, the tests that called that function during a stats run.
Running a module with only the tests that are *about* it keeps a run to minutes on a
2-core machine and makes the score say something about those tests, not about the whole
suite brushing past the code. The copy under ``.cache/mutation/<module>`` keeps mutmut's
``mutants/`` tree and its state out of the working tree.

Subprocess tests (test_cli, test_integration) are left out on purpose: a mutant is chosen
by an environment variable inside the pytest process, and mutmut's stats run records only
in-process calls, so those tests could neither be selected nor kill anything.

The score is killed / (mutants - equivalent). Equivalent mutants (a change that no test
can observe, because the program behaves the same) are listed and explained in
docs/testing.md, section "Mutation testing": every backquoted ``rpicluster.…__mutmut_N``
name there is read as equivalent. Timeouts and segfaults count as killed (the mutant hung
or crashed a test that the original passes); "no tests" and "survived" count as not killed.

Usage: python tools/mutation.py [--jobs N] [--again [--only TEXT ...] | --report] [MODULE ...]
(default: all modules)
Exit status: 0 when each module reached --target (default 90) per cent, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "mutation"
DOC = ROOT / "docs" / "testing.md"

# Tests every copy needs (fixtures and helpers), then the tests about each module.
EXTRA = ["docs", "README.md", "rpicluster.cfg.example", "bench"]
SUPPORT = ["tests/__init__.py", "tests/conftest.py", "tests/helpers.py", "tests/tlscerts.py"]
# Seconds a test may take in a module's copy (pytest-timeout) before it counts as hung: the
# master's tests each take under 6 s on a loaded machine, and a mutant that keeps start()
# waiting for a loop that died hangs every test it reaches.
TIMEOUTS = {"server": 12, "listening": 12, "views": 12}
SERVER_TESTS = [
    "tests/test_master_stop.py",
    "tests/test_master_listening.py",
    "tests/test_master_views.py",
    "tests/test_server_edges.py",
    "tests/test_connection_edges.py",
    "tests/test_master.py",
    "tests/test_peer_tls.py",  # a TLS master's lifecycle; test_tls.py is the connection's
    "tests/test_alerts.py",
]
CONNECTION_TESTS = [
    "tests/test_connection_session.py",
    "tests/test_master_queries.py",
    "tests/test_peer_tls.py",
    "tests/test_connection_edges.py",
    "tests/test_bad_input.py",
    "tests/test_conformance.py",
    "tests/test_member_limits.py",
    "tests/test_tls.py",
    "tests/test_names.py",
    "tests/test_adversarial_master.py",
    "tests/test_master.py",
]
# The config (config.py and the two modules split from it) and the tests about it.
CONFIG_TESTS = [
    "tests/test_config.py",
    "tests/test_config_edges.py",
    "tests/test_config_tls.py",
    "tests/test_alerts.py",
    "tests/test_names.py",
    "tests/test_tls.py",
    "tests/test_web_https.py",  # [webserver] https and its files
]
# The store (store.py and the three modules split from it) and the tests about it.
STORE_TESTS = ["tests/test_store_robust.py", "tests/test_store_edges.py"]
# Run before a mutant's other tests (tests/conftest.py reads RPICLUSTER_TESTS_FIRST): a
# mutant that keeps the master's loop from stopping passes most tests but costs each its
# stop timeout at teardown; this quick test fails on it at once.
FIRST = [
    "tests/test_master_stop.py::"
    "test_a_clean_stop_says_goodbye_to_every_peer_and_saves_the_registry_once_on_the_loop"
]
# A 10-second test: a mutant run re-runs it for every mutant of a function it calls. It
# checks the fleet as a whole; the faults it throws are each tested on their own too.
DESELECT = ["tests/test_adversarial_master.py::test_fleet_survives_every_attack_class"]
MODULES: dict[str, tuple[str, list[str]]] = {
    "backoff": (
        "rpicluster/backoff.py",
        ["tests/test_slave_backoff.py", "tests/test_backoff_edges.py"],
    ),
    "protocol": (
        "rpicluster/protocol.py",
        [
            "tests/test_protocol.py",
            "tests/test_protocol_edges.py",
            "tests/test_bad_input.py",
        ],
    ),
    "config": ("rpicluster/config.py", CONFIG_TESTS),
    "settings": ("rpicluster/settings.py", CONFIG_TESTS),
    "configvalues": ("rpicluster/configvalues.py", CONFIG_TESTS),
    "registry": (
        "rpicluster/master/registry.py",
        [
            "tests/test_master_registry.py",
            "tests/test_registry_edges.py",
            "tests/test_member_limits.py",
            "tests/test_names.py",
            "tests/test_master.py",
        ],
    ),
    "store": ("rpicluster/master/store.py", STORE_TESTS),
    "writequeue": ("rpicluster/master/writequeue.py", STORE_TESTS),
    "saving": ("rpicluster/master/saving.py", STORE_TESTS),
    "database": ("rpicluster/master/database.py", STORE_TESTS),
    "server": ("rpicluster/master/server.py", SERVER_TESTS),
    # The accept loop pauses and makes room by the admission policy: the join storm's tests.
    "listening": ("rpicluster/master/listening.py", [*SERVER_TESTS, "tests/test_join_storm.py"]),
    "views": ("rpicluster/master/views.py", SERVER_TESTS),
    "admission": (
        "rpicluster/master/admission.py",
        [
            "tests/test_join_storm.py",
            "tests/test_member_limits.py",
            "tests/test_connection_edges.py",
            "tests/test_master_listening.py",
        ],
    ),
    "connection": ("rpicluster/master/connection.py", CONNECTION_TESTS),
    "handshake": ("rpicluster/master/handshake.py", CONNECTION_TESTS),
    "peertls": ("rpicluster/master/peertls.py", CONNECTION_TESTS),
    "queries": ("rpicluster/master/queries.py", CONNECTION_TESTS),
}

# "segfault": the mutant crashed the test process (e.g. a connection closed under a thread
# still using it), which fails the run as surely as a failed assertion.
KILLED = ("killed", "timeout", "caught by type check", "segfault")
MUTANT_NAME = re.compile(r"`(rpicluster\.[\w.]+__mutmut_\d+)`")
RESULT_LINE = re.compile(r"^\s+(\S+__mutmut_\d+): (.+)$")


@dataclass
class Score:
    """The outcome of one module's run."""

    module: str
    statuses: dict[str, str]
    equivalent: set[str]

    def count(self, *wanted: str) -> int:
        return sum(1 for status in self.statuses.values() if status in wanted)

    @property
    def killed(self) -> int:
        return self.count(*KILLED)

    @property
    def relevant(self) -> int:
        """Mutants tested that some test could kill: all but the documented equivalent ones.

        A run stopped early (or still going, with --report) leaves mutants "not checked":
        they are counted apart, and the score is over the mutants tested so far.
        """
        tested = {name for name, status in self.statuses.items() if status != "not checked"}
        return len(tested) - len(self.equivalent & tested) + len(self.killed_equivalent())

    def killed_equivalent(self) -> list[str]:
        """Mutants documented as equivalent that a test killed: the doc is wrong about them.

        They count as killed mutants, not as equivalent ones (so the score never passes 100 %).
        """
        return sorted(name for name in self.equivalent if self.statuses.get(name) in KILLED)

    @property
    def untested(self) -> int:
        return self.count("not checked")

    @property
    def percent(self) -> float:
        return 100.0 * self.killed / self.relevant if self.relevant else 100.0

    def not_killed(self) -> list[str]:
        """Mutants neither killed nor documented as equivalent, to look at next."""
        return sorted(
            name
            for name, status in self.statuses.items()
            if status not in (*KILLED, "not checked") and name not in self.equivalent
        )


def documented_equivalents() -> set[str]:
    """The mutant names backquoted in docs/testing.md's "Mutation testing" section."""
    if not DOC.exists():
        return set()
    text = DOC.read_text(encoding="utf-8")
    start = text.find("## Mutation testing")
    if start < 0:
        return set()
    end = text.find("\n## ", start + 1)
    return set(MUTANT_NAME.findall(text[start : end if end > 0 else len(text)]))


def write_settings(module: str, work: Path) -> None:
    """pytest's and mutmut's settings in the copy (again at --again: they may have changed).

    pytest-timeout turns a mutant that makes a test wait forever into a failure quickly;
    mutmut's own limit is on CPU time, which a blocked test does not use.
    """
    source, _tests = MODULES[module]
    (work / "pyproject.toml").write_text(
        "\n".join(
            [
                "[tool.pytest.ini_options]",
                'testpaths = ["tests"]',
                f"timeout = {TIMEOUTS.get(module, 20)}",
                "",
                "[tool.mutmut]",
                'source_paths = ["rpicluster/"]',
                f'only_mutate = ["{source}"]',
                f"also_copy = {EXTRA!r}".replace("'", '"'),
                "pytest_add_cli_args = "
                + str(["-p", "no:cacheprovider", *(f"--deselect={t}" for t in DESELECT)]).replace(
                    "'", '"'
                ),
                # the copy is not a git checkout
                "use_git_change_detection = false",
                "",
            ]
        ),
        encoding="utf-8",
    )


def prepare(module: str) -> Path:
    """A fresh copy of the package and the module's tests, with mutmut's configuration."""
    source, tests = MODULES[module]
    work = WORK / module
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "rpicluster", work / "rpicluster", ignore=skip)
    # What some tests read or import besides the package: the documents they hold the code
    # to (docs/protocol.md, the example config) and bench's simulated slaves.
    for name in EXTRA:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, ignore=skip)
        else:
            shutil.copy2(ROOT / name, work / name)
    (work / "tests").mkdir()
    for name in SUPPORT + tests:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, work / name)
    write_settings(module, work)
    return work


def refresh_tests(module: str) -> bool:
    """For --again: today's tests and package into the last run's copy; True if the module changed.

    The mutants not killed last time are then run again against the new tests, and the
    killed ones keep their result. When the module itself changed since that run, its new
    text goes into the copy too: mutmut re-mutates it and, by each function's hash, forgets
    the results of the functions whose code changed (their mutants are renumbered and
    untested again) while every other function keeps its mutants and results.
    """
    source, tests = MODULES[module]
    work = WORK / module
    if not (work / "mutants").is_dir():
        raise SystemExit(f"mutation: --again needs a previous run of {module}")
    changed = (ROOT / source).read_bytes() != (work / source).read_bytes()
    if changed:
        # copy, not copy2: a newer time than the mutated file's is how mutmut sees the change
        shutil.copy(ROOT / source, work / source)
    for name in SUPPORT + tests:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, work / name)
    # Tests no longer in the module's selection leave the copy (and mutmut's tree).
    for tree in (work, work / "mutants"):
        for path in (tree / "tests").glob("*.py"):
            if f"tests/{path.name}" not in SUPPORT + tests:
                path.unlink()
    write_settings(module, work)
    # The rest of the package as it is today too (the tests may use what it gained),
    # in the copy and in mutmut's tree, where only the module itself is mutated.
    for path in (ROOT / "rpicluster").rglob("*.py"):
        name = str(path.relative_to(ROOT))
        if name != source:
            for target in (work / name, work / "mutants" / name):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    for name in EXTRA:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, work / name, dirs_exist_ok=True)
        else:
            shutil.copy2(ROOT / name, work / name)
    return changed


def not_killed_yet(module: str) -> list[str]:
    """The mutants of the module's copy whose last result is not a kill (untested included)."""
    return sorted(name for name, status in statuses(module).items() if status not in KILLED)


def isolated(command: list[str]) -> list[str]:
    """``command`` in a PID namespace of its own, when this process may make one.

    mutmut never cancels a mutant's timeout: when it expires it sends SIGXCPU to
    that PID whether the mutant has ended or not (mutmut/workers/timeout.py). With
    Linux's default pid_max of 32768 a busy machine reuses PIDs within minutes, so
    the signal can land on another program (a Molecule run's ansible-playbook died
    of it, 2026-11-29) or on a later mutant's tests, which would then count as
    killed. In a namespace of its own mutmut's PIDs are its own, and reaching a
    reused one takes 32768 processes of its own first.
    """
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None or not sys.platform.startswith("linux"):
        return command
    # `sh -c '...; exit'` keeps sh as the namespace's PID 1 (it reaps what mutmut
    # orphans; as PID 1 mutmut itself would ignore SIGINT and SIGTERM).
    return [
        unshare, "--pid", "--fork", "--kill-child", "--mount-proc",
        "sh", "-c", '"$@"; exit $?', "mutmut-run", *command,
    ]  # fmt: skip


def statuses(module: str) -> dict[str, str]:
    """Every mutant of the module's last run and its status (``mutmut results``)."""
    results = subprocess.run(
        [str(Path(sys.executable).with_name("mutmut")), "results", "--all", "true"],
        cwd=WORK / module,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = {}
    for line in results.stdout.splitlines():
        match = RESULT_LINE.match(line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def run_module(
    module: str,
    jobs: int,
    equivalent: set[str],
    again: bool = False,
    only: Optional[list[str]] = None,
) -> Score:
    """mutmut run in the module's copy; the status of every mutant of that module.

    With ``only`` (and --again): just the mutants not killed last time whose names contain
    one of those strings, e.g. the ones a new test was written for.
    """
    work = WORK / module
    mutmut = Path(sys.executable).with_name("mutmut")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "RPICLUSTER_TESTS_FIRST": ",".join(FIRST)}
    log = ""
    if again:
        if refresh_tests(module):
            # mutmut run without names re-mutates the module and tests only the mutants
            # without a result: those of the functions that changed (and any never tested).
            print(f"== {module}: changed since the last run: its changed functions", flush=True)
            first = subprocess.run(
                isolated([str(mutmut), "run", "--max-children", str(jobs)]),
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            log = first.stdout + first.stderr
            if first.returncode != 0:
                (work / "run.log").write_text(log, encoding="utf-8")
                sys.stdout.write(first.stdout[-4000:] + first.stderr[-4000:])
                raise SystemExit(
                    f"mutation: mutmut run failed for {module} (log: {work / 'run.log'})"
                )
        names = not_killed_yet(module)
        if only:
            names = [name for name in names if any(part in name for part in only)]
    else:
        names = []
        work = prepare(module)
    what = f"{len(names)} mutants not killed last time" if again else "every mutant"
    print(f"== {module}: mutmut run, {what} ({MODULES[module][0]}, {jobs} jobs)", flush=True)
    if again and not names:
        return Score(module, statuses(module), equivalent)
    run = subprocess.run(
        isolated([str(mutmut), "run", "--max-children", str(jobs), *names]),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    (work / "run.log").write_text(log + run.stdout + run.stderr, encoding="utf-8")
    if run.returncode != 0:
        sys.stdout.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"mutation: mutmut run failed for {module} (log: {work / 'run.log'})")
    return Score(module, statuses(module), equivalent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--target", type=float, default=90.0, help="per-module goal, per cent")
    parser.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the scores of the last runs (a run still going counts so far)",
    )
    parser.add_argument(
        "--again",
        action="store_true",
        help="re-test only the mutants the last run did not kill, against today's tests",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --again: only the mutants whose name contains TEXT (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.only and not args.again:
        parser.error("--only goes with --again")
    modules = args.modules or list(MODULES)
    unknown = [name for name in modules if name not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    equivalent = documented_equivalents()
    if args.report:
        scores = [Score(module, statuses(module), equivalent) for module in modules]
    else:
        scores = [
            run_module(module, args.jobs, equivalent, args.again, args.only) for module in modules
        ]

    print()
    print(
        f"{'module':<12} {'mutants':>7} {'equiv':>5} {'killed':>6} {'timeout':>7} "
        f"{'survived':>8} {'no tests':>8} {'untested':>8} {'score':>7}"
    )
    for score in scores:
        print(
            f"{score.module:<12} {len(score.statuses):>7} "
            f"{len(score.equivalent & set(score.statuses)) - len(score.killed_equivalent()):>5} "
            f"{score.killed:>6} "
            f"{score.count('timeout'):>7} {score.count('survived'):>8} "
            f"{score.count('no tests'):>8} {score.untested:>8} {score.percent:>6.1f}%"
        )
    for score in scores:
        wrong = score.killed_equivalent()
        if wrong:
            print(f"\n{score.module}: documented as equivalent but killed (fix docs/testing.md):")
            for name in wrong:
                print(f"  {name}")
        left = score.not_killed()
        if left:
            print(f"\n{score.module}: not killed and not documented as equivalent:")
            for name in left:
                print(f"  {name}: {score.statuses[name]}")
    print("\n(`mutmut show NAME` in .cache/mutation/MODULE shows a mutant's diff)")
    return 0 if all(s.percent >= args.target and not s.untested for s in scores) else 1


if __name__ == "__main__":
    sys.exit(main())
