"""Shared fixtures: configs built from text, and real masters on 127.0.0.1.

``make_config(slave={...}, cluster={...})`` writes an INI text with short test
intervals and parses it with the real validator, so tests exercise the same path
as ``rpicluster.cfg``. ``master`` is a started :class:`rpicluster.master.Master` on
an ephemeral loopback port; ``master_factory`` starts more (or restarts one on the
same port and state directory).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from rpicluster.config import Config, parse_config
from rpicluster.master import Master

TEST_SECRET = "test-secret-0123456789abcdef"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests named in ``RPICLUSTER_TESTS_FIRST`` (comma-separated) before the others.

    Set by tools/mutation.py: mutmut runs a mutant's tests fastest first, but a mutant that
    keeps the master's loop from stopping costs every test its stop timeout at teardown, so
    the one quick test that checks a clean stop goes first. Without the variable, nothing
    changes; the order is otherwise kept (a stable sort).
    """
    first = [name for name in os.environ.get("RPICLUSTER_TESTS_FIRST", "").split(",") if name]
    if first:
        items.sort(key=lambda item: not any(item.nodeid.endswith(name) for name in first))


@pytest.fixture(autouse=True)
def _cli_log_handlers_removed():
    """Remove the stderr handler a test's in-process ``cli.main()`` installs on the root logger.

    The handler holds pytest's capture file of that test; a slave thread of the test
    logging a moment later would write to the closed file ("--- Logging error ---").
    pytest's own handlers are subclasses of StreamHandler and are left alone.
    """
    root = logging.getLogger()
    level = root.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    root.setLevel(level)


# Short intervals so state changes happen in tenths of a second.
TEST_CLUSTER = {
    "heartbeat_interval": 0.1,
    "suspect_after": 0.3,
    "dead_after": 0.6,
    "handshake_timeout": 1,
}


# A test about stopping calls stop() itself and checks how it went. At teardown a
# master that does not stop promptly (a fault, or a mutant of the shutdown under
# mutation testing) costs the test this long, not stop()'s default 5 s; stop()
# still ends the loop and saves the registry when it runs out.
TEARDOWN_STOP_TIMEOUT = 2.0


@pytest.fixture
def cluster_secret() -> str:
    return TEST_SECRET


def build_config(secret: str = TEST_SECRET, **sections: dict[str, Any]) -> Config:
    """A validated Config from ``{section: {key: value}}``; a master port of 0 is allowed.

    ``socket_port = 0`` is not valid in a file (ports are 1-65535), so it is parsed
    as a placeholder and set to 0 afterwards with ``dataclasses.replace``.
    """
    cluster = {"secret": secret, **TEST_CLUSTER, **sections.pop("cluster", {})}
    ephemeral = False
    master = sections.get("master")
    if master is not None and str(master.get("socket_port", "")) == "0":
        sections["master"] = {**master, "socket_port": 1}
        ephemeral = True
    lines = []
    for name, values in [("cluster", cluster), *sections.items()]:
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
        lines.append("")
    config = parse_config("\n".join(lines), "<test config>")
    if ephemeral:
        assert config.master is not None
        config = dataclasses.replace(
            config, master=dataclasses.replace(config.master, socket_port=0)
        )
    return config


@pytest.fixture
def make_config(cluster_secret: str) -> Callable[..., Config]:
    """Factory: ``make_config(slave={...}, cluster={...}, secret=...)`` -> Config."""

    def make(secret: Optional[str] = None, **sections: dict[str, Any]) -> Config:
        return build_config(secret or cluster_secret, **sections)

    return make


@pytest.fixture
def master_factory(tmp_path: Path, make_config: Callable[..., Config]):
    """Factory: start a Master; every one started is stopped at teardown.

    ``master_factory()`` -> a new master on a new port and state directory;
    ``master_factory(port=old.port, state_dir=old_dir)`` restarts one in place;
    ``cluster={...}``/``master={...}`` override config keys; ``config=`` uses a
    ready Config (its port and state_dir are still replaced unless given).
    """
    started: list[Master] = []
    counter = iter(range(1000))

    def start(
        *,
        port: int = 0,
        state_dir: Optional[str] = None,
        config: Optional[Config] = None,
        cluster: Optional[dict[str, Any]] = None,
        master: Optional[dict[str, Any]] = None,
        alerts: Optional[dict[str, Any]] = None,
    ) -> Master:
        if state_dir is None:
            state_dir = str(tmp_path / f"master-{next(counter)}")
        if config is None:
            sections: dict[str, Any] = {"alerts": alerts} if alerts else {}
            config = make_config(
                cluster=cluster or {},
                master={"socket_bind_ip": "127.0.0.1", "state_dir": state_dir, **(master or {})},
                **sections,
            )
        assert config.master is not None
        config = dataclasses.replace(
            config,
            master=dataclasses.replace(config.master, socket_port=port, state_dir=state_dir),
        )
        instance = Master(config)
        instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in reversed(started):
        instance.stop(TEARDOWN_STOP_TIMEOUT)


@pytest.fixture
def master(master_factory: Callable[..., Master]) -> Master:
    """A started master on 127.0.0.1, ephemeral port, tmp state_dir; stopped at teardown."""
    return master_factory()
