"""Where a process's RSS lives: /proc/PID/smaps summed by kind of mapping.

RSS alone says how much; this says what: OpenSSL's libraries (file pages,
shared with any other OpenSSL user on the Pi but counted in every RSS), the
interpreter and other shared objects, the main heap, the anonymous mappings
(Python's object arenas, thread stacks, glibc's per-thread malloc arenas).
The benchmarks print it so a change that trims RSS can show where it came from.
"""

from __future__ import annotations

import collections
import re
from typing import Optional

# glibc reserves a 64 MiB address range for each per-thread malloc arena (a
# read-write part and an inaccessible rest): two mappings summing to 64 MiB.
_ARENA_KB = 65536
_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def _kind(path: str) -> str:
    """The bucket a mapping's RSS is summed in."""
    if "libcrypto" in path:
        return "libcrypto"
    if "libssl" in path or "/_ssl." in path:
        return "libssl+_ssl"
    if "python" in path and (".so" in path or path.endswith(("/python", "python3"))):
        return "python binary/libpython+ext"
    if path == "[heap]":
        return "[heap] (main malloc arena)"
    if path.startswith("[stack"):
        return "[stack]"
    if path.endswith(".so") or ".so." in path:
        return "other shared objects"
    if path in ("", "[anon]"):
        return "anonymous (Python arenas, thread stacks, thread malloc arenas)"
    return "other"


def breakdown(pid: int) -> dict[str, int]:
    """KiB of RSS by kind of mapping (and ``thread malloc arenas``: their count)."""
    sizes: collections.Counter[str] = collections.Counter()
    arenas = 0
    kind = "other"
    previous: Optional[tuple[str, int]] = None
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if _HEADER.match(line):
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) > 5 else ""
                kind = _kind(path)
                continue
            if line.startswith("Size:") and kind.startswith("anonymous"):
                size = int(line.split()[1])
                # an arena is a rw mapping followed by its ---p rest, 64 MiB in all
                if previous is not None and previous[1] + size == _ARENA_KB:
                    arenas += 1
                previous = (kind, size)
            elif line.startswith("Size:"):
                previous = None
            elif line.startswith("Rss:"):
                sizes[kind] += int(line.split()[1])
    result = dict(sizes.most_common())
    result["thread malloc arenas"] = arenas
    return result


def describe(pid: int) -> str:
    """One line: "libcrypto 3.9 MB, [heap] 2.1 MB, ...; 3 thread malloc arenas"."""
    parts = breakdown(pid)
    arenas = parts.pop("thread malloc arenas")
    text = ", ".join(f"{name} {kib / 1024:.1f} MB" for name, kib in parts.items() if kib >= 50)
    return f"{text}; {arenas} thread malloc arena(s)"
