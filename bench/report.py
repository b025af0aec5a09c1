"""Append a benchmark's figures, with the exact command, to bench/results.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("results.md")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def append(title: str, lines: list[str], command: str = "") -> None:
    """Print the figures and append them as one dated section of results.md."""
    command = command or "python -m " + " ".join([sys.argv[0].replace("/", ".")] + sys.argv[1:])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [f"## {title}", "", f"- when: {stamp}; machine: {machine()}", f"- command: `{command}`"]
    section += [f"- {line}" for line in lines]
    text = "\n".join(section) + "\n\n"
    print(text, end="")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section: measured figures and the command.\n\n")
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write(text)
