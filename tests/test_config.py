"""rpicluster.cfg validation: every fault names file, section and key.

The shipped ``rpicluster.cfg.example`` is parsed too, and its values must be the
defaults of the code, so the documentation cannot drift from what runs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from rpicluster.config import (
    ClusterSettings,
    ConfigError,
    MasterSettings,
    SlaveSettings,
    TlsSettings,
    WebserverSettings,
    load_config,
    parse_config,
    parse_roles,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "rpicluster.cfg.example"
SECRET = "config-test-secret-0123456789"

BASE = f"""
[cluster]
secret = {SECRET}
[slave]
master_ip = 10.0.0.1
"""


def with_lines(section: str, *lines: str) -> str:
    return BASE.replace(f"[{section}]", f"[{section}]\n" + "\n".join(lines), 1)


def test_minimal_slave_config_takes_the_defaults():
    config = parse_config(BASE, "min.cfg", need="slave")
    assert config.slave == SlaveSettings(master_ip="10.0.0.1")
    assert config.cluster == ClusterSettings(secret=SECRET)
    assert config.master is None
    assert config.master_address() == ("10.0.0.1", 5005)


def load_example():
    """The example as a fleet's file: load_config refuses it without [tls] (its
    addresses are a network's), so it is parsed without that rule here."""
    return parse_config(EXAMPLE.read_text(), str(EXAMPLE))


def example_values() -> dict[str, dict[str, str]]:
    config = load_example()
    return {name: dict(config.raw[name]) for name in config.raw.sections()}


def test_example_file_is_valid_and_documents_every_key():
    values = example_values()
    settings = {
        "cluster": ClusterSettings,
        "master": MasterSettings,
        "slave": SlaveSettings,
        "webserver": WebserverSettings,
    }
    for section, cls in settings.items():
        assert set(values[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_example_values_are_the_code_defaults():
    config = load_example()
    required = {("cluster", "secret"), ("slave", "master_ip")}
    for section in ("cluster", "master", "slave", "webserver"):
        settings = getattr(config, section)
        for f in dataclasses.fields(settings):
            if (section, f.name) in required:
                continue
            assert getattr(settings, f.name) == f.default, (section, f.name)


def test_every_key_has_a_comment_in_the_example():
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"^(\w+)\s*=", line)
        if not match:
            continue
        above = lines[:number]
        # The key's comment is the nearest block of "#" lines above it (keys may share one).
        while above and re.match(r"^\w+\s*=", above[-1]):
            above.pop()
        assert above and above[-1].startswith("#"), f"{match.group(1)} has no comment"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        (BASE.replace("master_ip = 10.0.0.1", ""), "[slave] master_ip", "required but missing"),
        (
            with_lines("slave", "socket_port = 70000"),
            "[slave] socket_port",
            "70000 is not a valid port",
        ),
        (with_lines("slave", "socket_port = http"), "[slave] socket_port", "not a port number"),
        (with_lines("slave", "roles = basic, turbo"), "[slave] roles", "unknown role 'turbo'"),
        (with_lines("slave", "roles = basic, basic"), "[slave] roles", "names a role twice"),
        (with_lines("slave", "roles = ,"), "[slave] roles", "lists no role"),
        (
            with_lines("cluster", "heartbeat_interval = 1s"),
            "[cluster] heartbeat_interval",
            "'1s' is not a number",
        ),
        (
            with_lines("cluster", "heartbeat_interval = 0"),
            "[cluster] heartbeat_interval",
            "must be at least 0.01",
        ),
        (
            with_lines("cluster", "dead_after = inf"),
            "[cluster] dead_after",
            "not a finite number",
        ),
        (
            with_lines("cluster", "suspect_after = nan"),
            "[cluster] suspect_after",
            "not a finite number",
        ),
        (
            with_lines("cluster", "max_frame_size = 1.5"),
            "[cluster] max_frame_size",
            "not a whole number",
        ),
        (
            with_lines("cluster", "heartbeat_interval = 2", "suspect_after = 1.5"),
            "[cluster] suspect_after",
            "must be longer than heartbeat_interval",
        ),
        (
            with_lines("slave", "reconnect_base = 2", "reconnect_cap = 1"),
            "[slave] reconnect_cap",
            "must not be less than reconnect_base",
        ),
        (
            with_lines("slave", "heartbeat_interval = 1"),
            "[slave] heartbeat_interval",
            "not a known setting (did you mean",
        ),
        (with_lines("cluster", "secret_key = x"), "[cluster] secret_key", "not a known setting"),
        (BASE.replace(f"secret = {SECRET}", "secret ="), "[cluster] secret", "required"),
        (BASE.replace("[cluster]", "[clutser]"), "[cluster]", "section is missing"),
        ("secret = x", "", "not a valid INI file"),
    ],
)
def test_bad_values_name_the_file_section_and_key(text, where, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/rpicluster/rpicluster.cfg")
    message = str(caught.value)
    assert message.startswith("/etc/rpicluster/rpicluster.cfg")
    assert where in message and problem in message, message
    assert "\n" not in message


def test_need_master_or_slave():
    with pytest.raises(ConfigError, match=r"\[master\]: section is missing"):
        parse_config(BASE, "x.cfg", need="master")
    only_cluster = f"[cluster]\nsecret = {SECRET}\n"
    with pytest.raises(ConfigError, match="needs a \\[master\\] or a \\[slave\\] section"):
        parse_config(only_cluster, "x.cfg")


def test_custom_role_sections_stay_available_to_roles():
    text = BASE + "\n[fan]\ngpio_pin = 14\n"
    assert parse_config(text).section("fan") == {"gpio_pin": "14"}
    assert parse_config(text).section("absent") == {}


def test_master_address_from_a_master_only_config():
    text = f"[cluster]\nsecret = {SECRET}\n[master]\nsocket_port = 6001\n"
    assert parse_config(text).master_address() == ("127.0.0.1", 6001)
    v6 = text + "socket_bind_ip = ::\n"
    assert parse_config(v6).master_address() == ("::1", 6001)


def test_parse_roles_accepts_dotted_paths():
    assert parse_roles(" basic ,my_pkg.sensors:FanSlave") == ("basic", "my_pkg.sensors:FanSlave")
    with pytest.raises(ValueError, match="unknown role 'my_pkg.sensors.FanSlave'"):
        parse_roles("my_pkg.sensors.FanSlave")


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "missing.cfg"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))
    binary = tmp_path / "binary.cfg"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(binary))


def readme_tables() -> dict[str, dict[str, str]]:
    """``{section: {key: default}}`` from README.md's configuration reference."""
    tables: dict[str, dict[str, str]] = {}
    section = None
    for line in (REPO / "README.md").read_text().splitlines():
        header = re.match(r"^### `\[(\w+)\]`", line)
        if header:
            section = tables.setdefault(header.group(1), {})
            continue
        row = re.match(r"^\| `(\w+)` \| (`[^`]*`|\([^)]*\)) \|", line)
        if row and section is not None:
            section[row.group(1)] = row.group(2).strip("`")
    return tables


def test_readme_reference_lists_every_key_with_the_example_default():
    readme, example = readme_tables(), example_values()
    assert set(readme) == {"cluster", "master", "slave", "webserver", "alerts", "tls"}
    # [tls] names files that must exist, so the example shows it commented out.
    tls = readme.pop("tls")
    assert set(tls) == {f.name for f in dataclasses.fields(TlsSettings)}
    text = EXAMPLE.read_text()
    assert all(f"# {key} = " in text for key in tls), tls
    for section, keys in readme.items():
        assert set(keys) == set(example[section]), section
        for key, default in keys.items():
            if default != "(required)":
                assert float_or_text(default) == float_or_text(example[section][key]), key


def float_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value.replace(" ", "")
