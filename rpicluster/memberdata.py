"""What a member may send: the limits of docs/protocol.md ("Limits"), checked and cleaned.

A slave holding the secret is trusted to be a member, not to be well behaved: a
stolen SD card or a buggy custom role must not be able to store a value that
another parser (the dashboard's, a status table's, SQLite's) chokes on. So the
master checks every hello ``details`` and every ``vitals`` report against these
limits and refuses the whole message on any violation (``check_*``), and cleans
whatever it loads from an older database (``clean_*``) instead of crashing.

The Python slave cleans its own details the same way before sending them, so a
node with an odd reading still joins (without that key) instead of being refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any, Optional

log = logging.getLogger("rpicluster.memberdata")

MAX_INT = 2**53
MAX_DETAILS_BYTES = 8 * 1024  # UTF-8 bytes of the details as compact JSON
MAX_STRING = 256  # characters of any string (and object key) in details
MAX_ITEMS = 64  # items of a list, keys of an object, in details
MAX_DETAILS_DEPTH = 4  # the details object is level 1
MAX_VITALS_KEYS = 64
MAX_NODE_ID = 128
MAX_ROLE = 200
MAX_ACTION_ERROR = 2000  # characters of an action_error text that are kept
NAME_KEYS = ("hostname", "node_name")  # details strings shown as a node's name

VITALS_KEY = re.compile(r"[a-z0-9_]{1,64}\Z")
# Not allowed in any string a member sends: C0 controls, DEL, C1 controls, lone
# surrogates (they cannot be encoded as UTF-8: JSON "\ud800" decodes to one), the
# line/paragraph separators and the bidirectional formatting characters (they
# reorder a terminal's or a page's text). Everything else is "printable".
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> bool:
    """True when ``text`` holds none of the characters the protocol forbids."""
    return _UNPRINTABLE.search(text) is None


def check_name(text: Any, limit: int) -> str:
    """What is wrong with a name (node_id, role, hostname, node_name, group), or ''."""
    if not isinstance(text, str):
        return "is not a string"
    if not 0 < len(text) <= limit:
        return f"must be 1..{limit} characters"
    if not printable(text):
        return "holds a control, separator, bidi or surrogate character"
    if text[0] == " " or text[-1] == " ":
        return "starts or ends with a space"
    return ""


def _number_problem(value: Any) -> str:
    if isinstance(value, bool):
        return ""
    if isinstance(value, int):
        return "" if -MAX_INT <= value <= MAX_INT else "integer out of range (+-2^53)"
    if isinstance(value, float):
        return "" if math.isfinite(value) else "number is not finite"
    return "not a number"


def _value_problem(value: Any, level: int) -> str:
    """Problem of one details value at nesting ``level`` (the details object is 1)."""
    if value is None or isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        return _number_problem(value)
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            return f"string longer than {MAX_STRING} characters"
        return "" if printable(value) else "string holds a forbidden character"
    if isinstance(value, (list, dict)):
        if level + 1 > MAX_DETAILS_DEPTH:
            return f"nests deeper than {MAX_DETAILS_DEPTH} levels"
        if len(value) > MAX_ITEMS:
            return f"holds more than {MAX_ITEMS} items"
        if isinstance(value, dict):
            for key, item in value.items():
                problem = _key_problem(key) or _value_problem(item, level + 1)
                if problem:
                    return f"{key[:40]!r}: {problem}" if problem[0] != "'" else problem
            return ""
        for item in value:
            problem = _value_problem(item, level + 1)
            if problem:
                return problem
        return ""
    return f"a {type(value).__name__} is not JSON"


def _key_problem(key: Any) -> str:
    if not isinstance(key, str):
        return "key is not a string"
    if len(key) > MAX_STRING:
        return f"key longer than {MAX_STRING} characters"
    return "" if printable(key) else "key holds a forbidden character"


def _entry_problem(key: Any, value: Any) -> str:
    """Problem of one top-level details entry, with the name rules for name keys."""
    problem = _key_problem(key) or _value_problem(value, 1)
    if problem:
        return problem
    if key in NAME_KEYS:
        problem = check_name(value, MAX_STRING)
        return f"is not a valid name: {problem}" if problem else ""
    if key == "groups":
        if not isinstance(value, list):
            return "is not a list"
        for group in value:
            problem = check_name(group, MAX_STRING)
            if problem:
                return f"group is not a valid name: {problem}"
    return ""


def details_size(details: dict[str, Any]) -> int:
    """Bytes of ``details`` as compact UTF-8 JSON, the measure of MAX_DETAILS_BYTES."""
    text = json.dumps(details, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return len(text.encode("utf-8", "surrogatepass"))


def check_details(details: Any) -> str:
    """What is wrong with a hello's ``details`` (docs/protocol.md "Limits"), or ''."""
    if not isinstance(details, dict):
        return "details must be a JSON object"
    if len(details) > MAX_ITEMS:
        return f"details hold more than {MAX_ITEMS} keys"
    for key, value in details.items():
        problem = _entry_problem(key, value)
        if problem:
            return f"details {str(key)[:40]!r}: {problem}"
    size = details_size(details)
    if size > MAX_DETAILS_BYTES:
        return f"details are {size} bytes of JSON, more than {MAX_DETAILS_BYTES}"
    return ""


def check_vitals(vitals: Any) -> str:
    """What is wrong with a ``vitals`` report, or ''."""
    if not isinstance(vitals, dict):
        return "vitals must be a JSON object"
    if len(vitals) > MAX_VITALS_KEYS:
        return f"vitals hold more than {MAX_VITALS_KEYS} keys"
    for key, value in vitals.items():
        if not isinstance(key, str) or not VITALS_KEY.match(key):
            return f"vitals key {str(key)[:70]!r} is not [a-z0-9_]{{1,64}}"
        if value is None:
            continue
        if isinstance(value, bool):
            return f"vitals {key!r}: true/false is not a number"
        problem = _number_problem(value)
        if problem:
            return f"vitals {key!r}: {problem}"
    return ""


def clean_text(text: Any, limit: int = MAX_ACTION_ERROR) -> str:
    """A free text (an action error) made safe to store: cut, forbidden characters replaced."""
    if not isinstance(text, str):
        text = str(text)
    return _UNPRINTABLE.sub("\ufffd", text[:limit])


# ------------------------------------------------------ cleaning (old databases)


def clean_details(details: Any, *, log_drops: bool = False) -> dict[str, Any]:
    """``details`` without the entries that break the limits (all of them if still too big)."""
    if not isinstance(details, dict):
        return {}
    if not check_details(details):
        return details
    kept: dict[str, Any] = {}
    for key, value in details.items():
        if len(kept) >= MAX_ITEMS:
            break
        problem = _entry_problem(key, value)
        if problem:
            if log_drops:
                log.warning("details key %r dropped: %s", str(key)[:40], problem)
            continue
        kept[key] = value
    if details_size(kept) > MAX_DETAILS_BYTES:
        if log_drops:
            log.warning("details dropped: more than %d bytes of JSON", MAX_DETAILS_BYTES)
        return {}
    return kept


def clean_vitals(vitals: Any) -> Optional[dict[str, Any]]:
    """``vitals`` without the keys that break the limits; None if nothing valid is left."""
    if not isinstance(vitals, dict):
        return None
    if not check_vitals(vitals):
        return vitals
    kept: dict[str, Any] = {}
    for key, value in vitals.items():
        if len(kept) >= MAX_VITALS_KEYS:
            break
        if not isinstance(key, str) or not VITALS_KEY.match(key):
            continue
        if value is None or (not isinstance(value, bool) and not _number_problem(value)):
            kept[key] = value
    return kept or None


def clean_action_errors(errors: Any) -> dict[str, dict[str, Any]]:
    """``{role: {"count": int, "last": str}}`` with bad roles dropped and texts cleaned."""
    if not isinstance(errors, dict):
        return {}
    kept: dict[str, dict[str, Any]] = {}
    for role, entry in errors.items():
        if check_name(role, MAX_ROLE) or not isinstance(entry, dict):
            continue
        count = entry.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_INT:
            count = 0
        kept[role] = {"count": count, "last": clean_text(entry.get("last", ""))}
    return kept
