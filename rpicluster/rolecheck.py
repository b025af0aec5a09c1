"""Check a custom slave role on the controller before any Pi is touched.

Why: a role file with a syntax error or a misspelt class name would otherwise be
found only on the Pi, by a slave that exits with a config error after deploy has
already changed the fleet. ``rpicluster check-role`` imports each role exactly
as the slave will (its directory first on the import path) and checks that the
class is a subclass of :class:`rpicluster.slave.RpiBasicSlaveThread`; every
problem is one line naming the file and the line, so Ansible's preflight can
stop the run with it.

A role meant for a Pi may import libraries only a Pi has (``gpiozero``,
``RPi.GPIO``, ``smbus2``). When such a module is missing on the controller, it is
replaced by an inert stand-in for the check, and the result says so; the role's
own module, its syntax and its class are still checked for real. Modules of the
``rpicluster`` package are never replaced.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import traceback
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class RoleCheckError(Exception):
    """A role that would not run: ``FILE:LINE: problem`` (line 0: ``FILE: problem``)."""

    def __init__(self, where: str, line: int, problem: str) -> None:
        super().__init__(f"{where}:{line}: {problem}" if line else f"{where}: {problem}")
        self.where, self.line, self.problem = where, line, problem


@dataclass
class RoleCheck:
    """What was checked: the spec, the file (or wheel) it came from, the role's name."""

    spec: str
    origin: str
    class_name: str
    role: str
    stand_ins: list[str] = field(default_factory=list)

    def describe(self) -> str:
        text = f"ok {self.spec}: {self.origin}, class {self.class_name}, role {self.role!r}"
        if self.stand_ins:
            text += (
                f" (checked with stand-ins for {', '.join(sorted(self.stand_ins))}:"
                " not installed on the controller)"
            )
        return text


# ----------------------------------------------------------------- stand-ins


class _StandIn:
    """Anything a Pi-only library offers: callable, subscriptable, a base class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _StandIn:
        return _StandIn()

    def __getattr__(self, name: str) -> _StandIn:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn()


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: supplies a module only when nothing else can."""

    def __init__(self, protected: Sequence[str]) -> None:
        self.protected = tuple(protected)
        self.supplied: list[str] = []

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        top = fullname.partition(".")[0]
        if top in self.protected:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []  # a package, so that `import RPi.GPIO` works too
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__.partition(".")[0] not in [s.partition(".")[0] for s in self.supplied]:
            self.supplied.append(module.__name__)


@contextlib.contextmanager
def _import_context(directory: Optional[str], paths: Sequence[str], module_name: str) -> Iterator:
    """The role's directory (and wheels) first on sys.path, stand-ins last; all undone after."""
    saved_path = list(sys.path)
    saved_modules = set(sys.modules)
    finder = _StandInFinder(["rpicluster", module_name.partition(".")[0]])
    sys.path[:0] = ([directory] if directory else []) + list(paths)
    sys.meta_path.append(finder)
    importlib.invalidate_caches()
    try:
        yield finder
    finally:
        sys.meta_path.remove(finder)
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if not name.startswith("rpicluster"):
                del sys.modules[name]


# --------------------------------------------------------------------- checks


def _class_lines(source: str) -> dict[str, int]:
    """Top-level class names of a module and the line each is defined on."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    return {node.name: node.lineno for node in tree.body if isinstance(node, ast.ClassDef)}


def _failing_line(exc: BaseException, filename: str) -> int:
    """The last line of ``filename`` in the traceback (1 if the file is not in it)."""
    line = 1
    wanted = os.path.realpath(filename)
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.realpath(frame.filename) == wanted and frame.lineno:
            line = frame.lineno
    return line


def parse_spec(spec: str) -> tuple[Optional[str], str, str]:
    """``FILE.py:Class`` or ``module:Class`` -> (file or None, module name, class name)."""
    target, sep, class_name = spec.rpartition(":")
    if not sep or not target or not class_name.isidentifier():
        raise ValueError(f"{spec!r}: expected FILE.py:ClassName or module:ClassName")
    if target.endswith(".py"):
        module_name = os.path.basename(target)[: -len(".py")]
        if not module_name.isidentifier():
            raise ValueError(f"{spec!r}: {module_name!r} is not a Python module name")
        return target, module_name, class_name
    if not all(part.isidentifier() for part in target.split(".")):
        raise ValueError(f"{spec!r}: {target!r} is not a Python module name")
    return None, target, class_name


def check_role(spec: str, paths: Sequence[str] = ()) -> RoleCheck:
    """Import the role named by ``spec`` as a slave would; :class:`RoleCheckError` if it fails.

    ``paths`` (directories or pure-Python wheels) are searched before the
    controller's own modules, as the Pi's PYTHONPATH and virtualenv would be.
    """
    from rpicluster.slave import RpiBasicSlaveThread

    filename, module_name, class_name = parse_spec(spec)
    if filename is None and "." not in module_name:
        # a role file in one of the directories (slave_roles/fan.py): checked as that file
        for directory in paths:
            candidate = os.path.join(directory, f"{module_name}.py")
            if os.path.isdir(directory) and os.path.isfile(candidate):
                filename = candidate
                break
    source = ""
    if filename is not None:
        try:
            with open(filename, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise RoleCheckError(
                filename, 0, f"cannot read the role file: {exc.strerror}"
            ) from None
        try:
            compile(raw, filename, "exec", dont_inherit=True)
        except SyntaxError as exc:
            raise RoleCheckError(filename, exc.lineno or 1, f"SyntaxError: {exc.msg}") from None
        except ValueError as exc:  # e.g. NUL bytes
            raise RoleCheckError(filename, 1, f"not Python source: {exc}") from None
        source = raw.decode("utf-8", errors="replace")
    directory = os.path.dirname(os.path.abspath(filename)) if filename else None
    where = filename or module_name

    with _import_context(directory, paths, module_name) as finder:
        try:
            module = importlib.import_module(module_name)
        except SyntaxError as exc:  # a module of a wheel, checked only now
            raise RoleCheckError(
                exc.filename or where, exc.lineno or 1, f"SyntaxError: {exc.msg}"
            ) from None
        except ImportError as exc:
            if filename is None and exc.name == module_name:
                raise RoleCheckError(
                    where,
                    0,
                    f"no module {module_name!r} in the role directory or the extra wheels",
                ) from None
            line = _failing_line(exc, filename) if filename else 1
            raise RoleCheckError(where, line, f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # the role's module raised while importing
            line = _failing_line(exc, filename) if filename else 1
            raise RoleCheckError(
                where, line, f"import failed: {type(exc).__name__}: {exc}"
            ) from None
        if filename is not None:
            loaded = getattr(module, "__file__", None) or ""
            if os.path.realpath(loaded) != os.path.realpath(filename):
                raise RoleCheckError(
                    filename,
                    1,
                    f"module name {module_name!r} is taken by {loaded or 'a built-in module'}:"
                    " rename the file",
                )
        else:
            source_file = getattr(module, "__file__", None) or module_name
            where = source_file
            with (
                contextlib.suppress(OSError, TypeError),
                open(source_file, encoding="utf-8", errors="replace") as handle,
            ):
                source = handle.read()
        classes = _class_lines(source)
        cls = getattr(module, class_name, None)
        if cls is None:
            close = difflib.get_close_matches(class_name, list(classes), n=1)
            hint = f"; did you mean {close[0]!r} (line {classes[close[0]]})?" if close else ""
            defined = ", ".join(sorted(classes)) or "none"
            line = classes[close[0]] if close else 1
            raise RoleCheckError(
                where, line, f"no class {class_name!r} (classes defined: {defined}){hint}"
            )
        line = classes.get(class_name, 1)
        if not isinstance(cls, type) or not issubclass(cls, RpiBasicSlaveThread):
            raise RoleCheckError(
                where,
                line,
                f"{class_name} is not a subclass of rpicluster.slave.RpiBasicSlaveThread",
            )
        if cls is RpiBasicSlaveThread:
            raise RoleCheckError(where, line, f"{class_name} is RpiBasicSlaveThread itself")
        return RoleCheck(spec, where, class_name, cls.role_name(), list(finder.supplied))


def run(specs: Sequence[str], paths: Sequence[str]) -> tuple[int, list[str]]:
    """Check every spec; (exit code, one line per role)."""
    lines: list[str] = []
    status = EXIT_OK
    for spec in specs:
        try:
            lines.append(check_role(spec, paths).describe())
        except ValueError as exc:
            lines.append(f"error: {exc}")
            status = max(status, EXIT_USAGE)
        except RoleCheckError as exc:
            lines.append(f"error: {exc}")
            status = max(status, EXIT_FAILED)
    return status, lines
