"""Make any value a node ever sent safe to show: one policy for every renderer.

Why here and not at the protocol boundary only: the master refuses bad member
data now, but an old database still holds whatever older masters stored
(Infinity, 400-digit integers, 600-level nesting, lone surrogates, newlines and
terminal escapes in a hostname). The status table, the dashboard, the JSON API,
``/metrics`` and log lines all pass node data through these few functions, so
none of them can crash on such a value or let it forge output:

- :func:`text`: one printable line, bounded; every character that is not
  printable (control characters such as newline and ESC, bidi overrides, lone
  surrogates, unassigned code points) shown as a Python-style backslash escape,
  so a forged log line or a terminal escape is visible instead of effective;
- :func:`number`: a finite float or None (never OverflowError on a huge int);
- :func:`tree`: a JSON-safe copy with bounded depth, items and string lengths.

Standard library only: the status table and the slaves' logs use it too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

ELLIPSIS = "\u2026"
MAX_TEXT = 256  # characters of one displayed value (a hostname, a label, a cell)
MAX_TREE_DEPTH = 8  # node -> details -> 4 levels of member data, with room to spare
MAX_TREE_ITEMS = 256  # items kept per list or object
MAX_TREE_TEXT = 4096  # characters kept per string in JSON documents
MAX_SAFE_INTEGER = 2**53  # beyond this a JSON reader (JavaScript) loses precision
REPLACEMENT = "\ufffd"
TRUNCATED = "\u2026(truncated)"


def _escape(char: str) -> str:
    code = ord(char)
    short = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
    if short:
        return short
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def text(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus an ellipsis).

    ``str()`` of anything, without ever raising: a huge integer or an object whose
    ``__str__`` fails becomes a placeholder. The work is bounded by ``limit``, not
    by the size of ``value``.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        raw = value
    elif isinstance(value, bool):
        raw = "true" if value else "false"
    elif isinstance(value, int):
        raw = _int_text(value)
    else:
        try:
            raw = str(value)
        except Exception:  # noqa: BLE001 - a renderer must never fail on a value
            raw = f"<{type(value).__name__}>"
    cut = raw[:limit]
    if not cut.isprintable():
        cut = "".join(c if c.isprintable() else _escape(c) for c in cut)
        if len(cut) > limit:
            cut = cut[:limit]
            return cut + ELLIPSIS
    return cut + ELLIPSIS if len(raw) > limit else cut


def _int_text(value: int) -> str:
    """An int's digits, or its size for one too long to print (Python limits str(int))."""
    if abs(value) < 10**30:
        return str(value)
    return f"<{value.bit_length()}-bit integer>"


def number(value: Any) -> Optional[float]:
    """``value`` as a finite float when it is a real number (not a bool), else None.

    A 400-digit integer is None, not an OverflowError; NaN and Infinity are None.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def integer(
    value: Any, low: int = -MAX_SAFE_INTEGER, high: int = MAX_SAFE_INTEGER
) -> Optional[int]:
    """``value`` when it is an int (not a bool) within [low, high], else None."""
    if type(value) is not int or not low <= value <= high:
        return None
    return value


def _clean_surrogates(value: str) -> str:
    return "".join(REPLACEMENT if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)


def tree(value: Any, depth: int = MAX_TREE_DEPTH) -> Any:
    """A JSON-safe copy of ``value``: what the JSON API serves.

    Non-finite floats and integers beyond +-2^53 become None; strings are valid
    UTF-8 and at most MAX_TREE_TEXT characters; lists and objects keep their first
    MAX_TREE_ITEMS items; anything nested deeper than ``depth`` becomes None.
    Iterative in effect (depth-bounded recursion), so 600 levels cannot exhaust
    the stack.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _tree_str(value)
    if depth <= 0:
        return None
    if isinstance(value, Mapping):
        out = {}
        for i, (key, item) in enumerate(value.items()):
            if i >= MAX_TREE_ITEMS:
                break
            out[tree_key(key)] = tree(item, depth - 1)
        return out
    if isinstance(value, (list, tuple)):
        return [tree(item, depth - 1) for item in value[:MAX_TREE_ITEMS]]
    return _tree_str(text(value))


def tree_key(key: Any) -> str:
    """An object key as :func:`tree` keeps it: a valid, bounded string."""
    return _tree_str(key if isinstance(key, str) else text(key))


def _tree_str(value: str) -> str:
    if len(value) > MAX_TREE_TEXT:
        value = value[:MAX_TREE_TEXT] + TRUNCATED
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = _clean_surrogates(value)
    return value


class OneLineFormatter(logging.Formatter):
    """A log formatter whose messages are one line whatever their arguments hold.

    A hostname with a newline could otherwise forge a second log line, and one
    with ESC sequences could rewrite a terminal. The message (format and
    arguments) goes through :func:`text`; a traceback appended by ``exc_info``
    stays multi-line, as it comes from our own code.
    """

    def __init__(self, fmt: Optional[str] = None, limit: int = 4096) -> None:
        super().__init__(fmt)
        self.limit = limit

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (stdlib name)
        record.message = text(record.message, self.limit)
        return super().formatMessage(record)


def node_name(node: Mapping[str, Any]) -> str:
    """What a node is called on every page: its ``name`` (contract 1 of the node
    object), else its hostname (a master older than names), else address, else id."""
    for key in ("name", "hostname", "address", "node_id"):
        value = node.get(key)
        if isinstance(value, str) and value:
            return value
    return "?"
