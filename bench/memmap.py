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

# glibc reserves a 64 MiB address range for each per-thread malloc arena (a
# read-write part and an inaccessible rest): two mappings summing to 64 MiB.
_ARENA_KB = 65536
_STACK_KB = 8192
_ANON = "anonymous (Python's object arenas, other)"
_ARENAS = "thread malloc arenas' heaps"
_STACKS = "thread stacks"
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
        return _ANON
    return "other"


def breakdown(pid: int) -> dict[str, int]:
    """KiB of RSS by kind of mapping (and ``thread malloc arenas``: their count).

    Anonymous mappings are told apart by size: a thread's stack is 8 MiB (glibc's
    default, from ``ulimit -s``), a per-thread malloc arena's heap a read-write
    mapping that, with the inaccessible rest after it, spans 64 MiB.
    """
    sizes: collections.Counter[str] = collections.Counter()
    arenas = 0
    kind = "other"
    anonymous = False
    previous_rw = 0  # KiB of the anonymous read-write mapping just before, if any
    pending_rss = 0  # its RSS, moved to the arenas' line when it turns out to be one
    perms = ""
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        for line in smaps:
            if _HEADER.match(line):
                fields = line.split(None, 5)
                path = fields[5].strip() if len(fields) > 5 else ""
                kind = _kind(path)
                anonymous = kind.startswith("anonymous")
                perms = fields[1]
                continue
            if line.startswith("Size:"):
                size = int(line.split()[1])
                if anonymous:
                    if perms.startswith("---") and previous_rw and previous_rw + size == _ARENA_KB:
                        arenas += 1
                        sizes[_ARENAS] += pending_rss
                        sizes[_ANON] -= pending_rss
                    if size in (_STACK_KB, _STACK_KB + 4):
                        kind = _STACKS
                previous_rw = size if anonymous and perms.startswith("rw") else 0
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                sizes[kind] += rss
                pending_rss = rss
    result = {name: kib for name, kib in sizes.most_common() if kib > 0}
    result["thread malloc arenas"] = arenas
    return result


def describe(pid: int) -> str:
    """One line: "libcrypto 3.9 MB, [heap] 2.1 MB, ...; 3 thread malloc arenas"."""
    parts = breakdown(pid)
    arenas = parts.pop("thread malloc arenas")
    text = ", ".join(f"{name} {kib / 1024:.2f} MB" for name, kib in parts.items() if kib >= 20)
    return f"{text}; {arenas} thread malloc arena(s)"
