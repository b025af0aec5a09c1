"""Typed values of a config file: numbers in range, ports, flags, role and group lists.

Split from ``config.py`` because these checks are the same for every section:
:class:`Reader` gives one parsed file's values typed and bounded and raises a
:class:`ConfigError` naming file, section and key; :func:`flag` reads yes/no;
:func:`parse_roles` and :func:`parse_groups` check the ``[slave]`` lists the
master would otherwise refuse; :func:`is_loopback` tells an address that never
leaves the machine. ``config.py`` reads each section with them.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import re
from typing import Any, Callable, Optional

from rpicluster import memberdata as md
from rpicluster.settings import BUILTIN_ROLES, ConfigError

_DOTTED_ROLE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


class Reader:
    """Typed access to one parsed file that raises ConfigError naming the key."""

    def __init__(self, path: str, parser: configparser.ConfigParser) -> None:
        self.path = path
        self.parser = parser

    def error(self, section: str, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, section, key, problem)

    def raw(self, section: str, key: str, default: Optional[str]) -> str:
        if self.parser.has_option(section, key):
            value = self.parser.get(section, key, raw=True).strip()
            if value:
                return value
        if default is None:
            raise self.error(section, key, "is required but missing")
        return default

    def text(self, section: str, key: str, default: Optional[str] = None) -> str:
        return self.raw(section, key, default)

    def number(
        self,
        section: str,
        key: str,
        default: float,
        *,
        minimum: float,
        maximum: float = math.inf,
        kind: Callable[[str], Any] = float,
    ) -> Any:
        value = self.raw(section, key, str(default))
        try:
            number = kind(value)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise self.error(section, key, f"{value!r} is not {noun}") from None
        if not math.isfinite(number):
            raise self.error(section, key, f"{value!r} is not a finite number")
        if not (minimum <= number <= maximum):
            upper = "" if maximum == math.inf else f" and at most {maximum:g}"
            raise self.error(section, key, f"{value} must be at least {minimum:g}{upper}")
        return number

    def port(self, section: str, key: str, default: int) -> int:
        value = self.raw(section, key, str(default))
        try:
            port = int(value)
        except ValueError:
            raise self.error(section, key, f"{value!r} is not a port number") from None
        if not 1 <= port <= 65535:
            raise self.error(section, key, f"{port} is not a valid port (1-65535)")
        return port


# A yes/no setting: yes, true, on, 1 or no, false, off, 0 (any case). (A comment, not a
# docstring: the body stays as it was when its equivalent mutants were numbered.)
def flag(r: Reader, section: str, key: str, default: bool) -> bool:
    value = r.raw(section, key, "yes" if default else "no").lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise r.error(section, key, f"{value!r} is not yes or no")


def parse_roles(value: str) -> tuple[str, ...]:
    """Split ``basic, vitals, pkg.mod:Class`` into names; ValueError names a bad one."""
    roles = tuple(part.strip() for part in value.split(",") if part.strip())
    if not roles:
        raise ValueError("lists no role")
    for role in roles:
        if role not in BUILTIN_ROLES and not _DOTTED_ROLE.match(role):
            raise ValueError(
                f"unknown role {role!r} (built-in roles: {', '.join(BUILTIN_ROLES)};"
                " a custom role is package.module:ClassName)"
            )
    if len(set(roles)) != len(roles):
        raise ValueError(f"names a role twice: {value}")
    return roles


def parse_groups(value: str) -> tuple[str, ...]:
    """Split ``slaves, rack1`` into group names; ValueError names a bad one.

    Each group is a name of the protocol (docs/protocol.md section 5: printable,
    1..256 characters), at most 64 of them, none twice: the master would refuse
    the details otherwise, and the slave would join without its groups.
    """
    groups = tuple(part.strip() for part in value.split(",") if part.strip())
    if len(groups) > md.MAX_ITEMS:
        raise ValueError(f"lists {len(groups)} groups, more than {md.MAX_ITEMS}")
    for group in groups:
        problem = md.check_name(group, md.MAX_STRING)
        if problem:
            raise ValueError(f"group {group[:40]!r} {problem}")
    seen: set[str] = set()
    for group in groups:
        if group in seen:
            raise ValueError(f"names group {group!r} twice")
        seen.add(group)
    return groups


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: traffic that never leaves the machine."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip()).is_loopback
    except ValueError:
        return False
