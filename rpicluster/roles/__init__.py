"""Slave roles by name: the built-ins and a user's own ``package.module:ClassName``.

``[slave] roles`` names the roles a Pi runs; :func:`resolve` turns one name into
the thread class. Built-ins are imported lazily, so a Pi that does not run the
``webserver`` role never imports (or needs) prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rpicluster.config import ConfigError

if TYPE_CHECKING:
    from rpicluster.slave import RpiBasicSlaveThread

BUILTIN = {
    "basic": "rpicluster.slave:RpiBasicSlaveThread",
    "vitals": "rpicluster.roles.vitals:VitalsSlaveThread",
    "webserver": "rpicluster.roles.webserver:WebserverSlaveThread",
}


def resolve(name: str, config_path: str = "rpicluster.cfg") -> type[RpiBasicSlaveThread]:
    """The thread class of role ``name``; :class:`ConfigError` names ``[slave] roles``."""
    from rpicluster.slave import RpiBasicSlaveThread

    def fail(problem: str) -> ConfigError:
        return ConfigError(config_path, "slave", "roles", f"role {name!r}: {problem}")

    target = BUILTIN.get(name, name)
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise fail(
            f"unknown role (built-in roles: {', '.join(BUILTIN)};"
            " a custom role is package.module:ClassName)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise fail(f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise fail(
            f"module {module_name!r} failed to import: {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise fail(f"module {module_name!r} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, RpiBasicSlaveThread)):
        raise fail(f"{target} is not a subclass of rpicluster.slave.RpiBasicSlaveThread")
    return cls
