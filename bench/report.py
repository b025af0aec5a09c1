"""Append a benchmark's figures, with the exact command, to bench/results.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results.md")
HEADER = "# Benchmark results\n\nEach section: measured figures and the command that made them.\n\n"


def invocation() -> str:
    """The command line that ran this benchmark, as a user would type it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head] + sys.argv[1:])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def append(title: str, lines: list[str], command: str = "") -> None:
    """Print the figures and append them as one dated section of results.md."""
    command = command or invocation()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"## {title}", "", f"- when: {stamp}; machine: {machine()}"]
    section.append(f"- command: `{command}`")
    section += [f"- {line}" for line in lines]
    text = "\n".join(section) + "\n\n"
    print(text, end="")
    if not RESULTS.exists():
        RESULTS.write_text(HEADER, encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(text)
