"""bench/memmap.py: RSS by kind of mapping adds up to the process's RSS."""

from __future__ import annotations

import os
import ssl  # noqa: F401  (maps libssl and libcrypto into this process)

from bench import memmap


def rollup_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as rollup:
        for line in rollup:
            if line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError("no Rss line")


def test_breakdown_sums_to_rss_and_names_openssl() -> None:
    parts = memmap.breakdown(os.getpid())
    arenas = parts.pop("thread malloc arenas")
    total = sum(parts.values())
    rss = rollup_rss_kib(os.getpid())
    assert abs(total - rss) <= max(1024, rss // 20)  # read a moment apart
    assert parts.get("libcrypto", 0) > 0
    assert arenas >= 0


def test_describe_is_one_line() -> None:
    line = memmap.describe(os.getpid())
    assert "\n" not in line
    assert "MB" in line and "thread malloc arena" in line
