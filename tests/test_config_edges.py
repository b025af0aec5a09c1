"""rpicluster.cfg at its edges: every bound accepted at its value and refused just past it,
the derived defaults at an interval other than 1, and the defaults of absent sections."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rpicluster.config import (
    ClusterSettings,
    Config,
    ConfigError,
    MasterSettings,
    WebserverSettings,
    load_config,
    parse_config,
)

SECRET = "edge-secret-0123456789"


def config_text(secret: str = SECRET, **sections: dict[str, object]) -> str:
    """An INI text with [cluster] (the secret) plus ``sections``; [slave] unless given."""
    if "master" not in sections and "slave" not in sections:
        sections["slave"] = {}
    sections.setdefault("cluster", {})
    if "slave" in sections:
        sections["slave"] = {"master_ip": "10.0.0.1", **sections["slave"]}
    lines = ["[cluster]", f"secret = {secret}"]
    lines += [f"{key} = {value}" for key, value in sections.pop("cluster").items()]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def parse(**sections: dict[str, object]) -> Config:
    return parse_config(config_text(**sections), "edge.cfg")


def refusal(**sections: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(**sections)
    return str(caught.value)


# (section, key, lowest accepted, highest accepted or None, kind of number)
BOUNDS = [
    ("cluster", "heartbeat_interval", 0.01, 3600, float),
    ("cluster", "max_frame_size", 16384, 2**31, int),
    ("cluster", "handshake_timeout", 0.1, 600, float),
    ("master", "history_window", 1.0, None, float),
    ("master", "max_connections", 16, 1000000, int),
    ("master", "max_unauthenticated", 1, 65536, int),
    ("master", "max_unauthenticated_per_address", 1, 65536, int),
    ("master", "metrics_port", 0, 65535, int),
    ("slave", "reconnect_base", 0.01, 60, float),
    ("slave", "reconnect_cap", 0.01, 3600, float),
    ("slave", "vitals_interval", 0.05, 3600, float),
    ("webserver", "refresh_interval", 0.1, 3600, float),
    ("webserver", "history_window", 1.0, None, float),
    ("alerts", "webhook_timeout", 0.1, 60, float),
    ("alerts", "hold", 0.0, 86400, float),
    ("alerts", "suspect_for", 0.0, 86400, float),
    ("alerts", "temperature", 0.0, 200, float),
    ("alerts", "disk_free_percent", 0.0, 100, float),
]


def settings_of(config: Config, section: str):
    return getattr(config, section)


def with_key(section: str, key: str, value: object) -> dict[str, dict[str, object]]:
    sections: dict[str, dict[str, object]] = {section: {key: value}}
    if section == "slave" and key == "reconnect_cap":
        sections["slave"]["reconnect_base"] = 0.01  # the cap may not be below the base
    if section == "slave" and key == "reconnect_base":
        sections["slave"]["reconnect_cap"] = max(float(value), 5.0)
    if section == "cluster" and key == "heartbeat_interval":
        # suspect_after and dead_after must stay above the interval
        sections["cluster"].update(suspect_after=float(value) * 3, dead_after=float(value) * 6)
    return sections


@pytest.mark.parametrize(("section", "key", "low", "high", "kind"), BOUNDS)
def test_each_bound_is_inclusive(section, key, low, high, kind):
    config = parse(**with_key(section, key, low))
    assert getattr(settings_of(config, section), key) == low
    assert type(getattr(settings_of(config, section), key)) is kind
    if high is not None:
        config = parse(**with_key(section, key, high))
        assert getattr(settings_of(config, section), key) == high


@pytest.mark.parametrize(("section", "key", "low", "high", "kind"), BOUNDS)
def test_each_bound_refuses_the_value_just_past_it(section, key, low, high, kind):
    step = 1 if kind is int else (low / 10 if low else 0.5)
    upper = "" if high is None else f" and at most {high:g}"
    below = low - step if kind is int else round(low - step, 6)
    message = refusal(**with_key(section, key, below))
    assert message == f"edge.cfg: [{section}] {key}: {below} must be at least {low:g}{upper}"
    if high is not None:
        above = high + 1 if kind is int else high + 0.5
        message = refusal(**with_key(section, key, above))
        assert message == f"edge.cfg: [{section}] {key}: {above} must be at least {low:g}{upper}"


def test_a_whole_number_key_names_what_it_wants():
    assert "'1.5' is not a whole number" in refusal(master={"max_connections": "1.5"})
    assert "'many' is not a number" in refusal(master={"history_window": "many"})
    assert "'inf' is not a finite number" in refusal(master={"history_window": "inf"})


def test_ports_are_1_to_65535():
    for port in (1, 65535):
        assert parse(slave={"socket_port": port}).slave.socket_port == port
        assert parse(master={"socket_port": port}).master.socket_port == port
        assert parse(webserver={"webserver_port": port}).webserver.webserver_port == port
    for port in (0, 65536, -1):
        assert f"[slave] socket_port: {port} is not a valid port (1-65535)" in refusal(
            slave={"socket_port": port}
        )
    assert refusal(master={"socket_port": 0}) == (
        "edge.cfg: [master] socket_port: 0 is not a valid port (1-65535)"
    )
    assert "[webserver] webserver_port: 'x' is not a port number" in refusal(
        webserver={"webserver_port": "x"}
    )


def test_a_secret_of_exactly_16_characters_is_enough():
    assert parse_config(config_text(secret="s" * 16)).cluster.secret == "s" * 16
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(secret="s" * 15), "short.cfg")
    assert str(caught.value) == ("short.cfg: [cluster] secret: must be at least 16 characters long")


def test_reconnect_cap_may_equal_reconnect_base():
    slave = parse(slave={"reconnect_base": 3, "reconnect_cap": 3}).slave
    assert (slave.reconnect_base, slave.reconnect_cap) == (3.0, 3.0)
    assert "reconnect_cap: 2.99 must not be less than reconnect_base 3" in refusal(
        slave={"reconnect_base": 3, "reconnect_cap": 2.99}
    )


@pytest.mark.parametrize(
    ("interval", "suspect", "dead"),
    # suspect_after defaults to 2.5 x the interval, dead_after to max(5, 2 x suspect_after)
    [(2.0, 5.0, 10.0), (0.1, 0.25, 5.0), (4.0, 10.0, 20.0), (1.0, 2.5, 5.0)],
)
def test_timeouts_derive_from_the_heartbeat_interval(interval, suspect, dead):
    cluster = parse(cluster={"heartbeat_interval": interval}).cluster
    assert cluster.suspect_after == pytest.approx(suspect)
    assert cluster.dead_after == pytest.approx(dead)


def test_dead_after_derives_from_an_explicit_suspect_after():
    assert parse(cluster={"suspect_after": 4}).cluster.dead_after == 8.0
    assert parse(cluster={"suspect_after": 2}).cluster.dead_after == 5.0


def test_timeouts_equal_to_the_one_before_are_refused():
    assert "suspect_after: 2 must be longer than heartbeat_interval" in refusal(
        cluster={"heartbeat_interval": 2, "suspect_after": 2}
    )
    assert "dead_after: 3 must be longer than suspect_after 3" in refusal(
        cluster={"suspect_after": 3, "dead_after": 3}
    )
    cluster = parse(cluster={"heartbeat_interval": 2, "suspect_after": 2.01}).cluster
    assert cluster.suspect_after == 2.01


def test_the_cluster_defaults():
    assert parse().cluster == ClusterSettings(
        secret=SECRET,
        heartbeat_interval=1.0,
        suspect_after=2.5,
        dead_after=5.0,
        max_frame_size=1024 * 1024,
        handshake_timeout=5.0,
    )


def test_a_master_section_without_keys_gets_the_documented_defaults():
    assert parse(master={}).master == MasterSettings(
        socket_bind_ip="0.0.0.0",
        socket_port=5005,
        state_dir="/var/lib/rpicluster",
        history_window=3600.0,
        max_connections=30000,
        max_unauthenticated=1024,
        max_unauthenticated_per_address=64,
    )


def test_without_a_webserver_section_the_dashboard_gets_the_documented_defaults():
    config = parse()
    assert not config.raw.has_section("webserver")
    assert config.webserver == WebserverSettings(
        webserver_host="0.0.0.0",
        webserver_port=8123,
        refresh_interval=2.0,
        history_window=3600.0,
    )
    empty = parse(webserver={"webserver_port": ""})
    assert empty.webserver.webserver_port == 8123


def test_every_webserver_key_is_read():
    webserver = parse(
        webserver={
            "webserver_host": "127.0.0.2",
            "webserver_port": 9000,
            "refresh_interval": 7,
            "history_window": 60,
        }
    ).webserver
    assert webserver == WebserverSettings("127.0.0.2", 9000, 7.0, 60.0)


def test_a_slave_section_is_read_key_by_key():
    slave = parse(
        slave={
            "socket_port": 6000,
            "roles": "vitals",
            "state_dir": "/srv/state",
            "reconnect_base": 0.5,
            "reconnect_cap": 9,
            "vitals_interval": 2,
        }
    ).slave
    assert (slave.master_ip, slave.socket_port, slave.roles, slave.state_dir) == (
        "10.0.0.1",
        6000,
        ("vitals",),
        "/srv/state",
    )
    assert (slave.reconnect_base, slave.reconnect_cap, slave.vitals_interval) == (0.5, 9.0, 2.0)


def test_a_master_and_a_slave_in_one_file_both_count():
    config = parse(master={"socket_port": 6001}, slave={"socket_port": 6002})
    assert config.master.socket_port == 6001
    # a client on a Pi that is both asks the master named by [slave]
    assert config.master_address() == ("10.0.0.1", 6002)
    assert parse_config(config_text(master={}), "m.cfg", need="master").slave is None
    with pytest.raises(ConfigError, match=r"m.cfg: \[slave\]: section is missing"):
        parse_config(config_text(master={}), "m.cfg", need="slave")


def test_master_address_keeps_a_specific_bind_address():
    config = parse(master={"socket_bind_ip": "192.168.1.5", "socket_port": 6001})
    assert config.master_address() == ("192.168.1.5", 6001)
    anywhere = dataclasses.replace(
        config, master=dataclasses.replace(config.master, socket_bind_ip="")
    )
    assert anywhere.master_address() == ("127.0.0.1", 6001)
    neither = dataclasses.replace(config, master=None)
    with pytest.raises(ConfigError) as caught:
        neither.master_address()
    assert str(caught.value) == "edge.cfg: [slave] master_ip: no [slave] or [master] section"


def test_config_error_names_only_what_it_knows():
    error = ConfigError("a.cfg", None, None, "broken")
    assert str(error) == "a.cfg: broken"
    assert (error.path, error.section, error.key, error.problem) == ("a.cfg", None, None, "broken")
    assert str(ConfigError("a.cfg", "slave", None, "missing")) == "a.cfg: [slave]: missing"
    assert str(ConfigError("a.cfg", "slave", "roles", "bad")) == "a.cfg: [slave] roles: bad"


def test_an_unknown_key_lists_the_known_ones_when_none_is_close():
    message = refusal(webserver={"zzzz": 1})
    assert "[webserver] zzzz: is not a known setting (known: webserver_host, webserver_port" in (
        message
    )


def test_an_unreadable_file_names_the_fix(tmp_path, monkeypatch):
    path = tmp_path / "rpicluster.cfg"
    path.write_text(config_text())

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == (
        f"{path}: permission denied (run as root or as the rpicluster user)"
    )


def test_load_config_reads_the_file_and_passes_need(tmp_path):
    path = tmp_path / "rpicluster.cfg"
    # loopback: load_config refuses a network address without [tls] (test_tls.py)
    path.write_text(config_text(slave={"master_ip": "127.0.0.1"}), encoding="utf-8")
    config = load_config(str(path), need="slave")
    assert config.path == str(path)
    assert config.slave.master_ip == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"\[master\]: section is missing"):
        load_config(str(path), need="master")


def test_forget_after_is_0_or_longer_than_dead_after():
    assert parse(master={}).master.forget_after == 7 * 24 * 3600.0
    assert parse(master={"forget_after": 0}).master.forget_after == 0.0
    assert parse(master={"forget_after": 5.01}).master.forget_after == 5.01
    assert parse(master={"forget_after": 10 * 365 * 24 * 3600}).master.forget_after == 315360000.0
    assert refusal(master={"forget_after": 5}) == (
        "edge.cfg: [master] forget_after: 5 must be 0 (never forget) or longer than dead_after 5"
    )
    assert refusal(master={"forget_after": 0.5}).startswith("edge.cfg: [master] forget_after: 0.5")
    assert refusal(master={"forget_after": -1}) == (
        "edge.cfg: [master] forget_after: -1 must be at least 0 and at most 3.1536e+08"
    )
    assert "forget_after: 315360001 must be at least 0" in refusal(
        master={"forget_after": 315360001}
    )


def test_every_master_key_is_read():
    master = parse(
        master={
            "socket_bind_ip": "10.1.1.1",
            "socket_port": 6000,
            "state_dir": "/srv/master",
            "history_window": 60,
            "max_connections": 100,
            "max_unauthenticated": 10,
            "max_unauthenticated_per_address": 2,
        }
    ).master
    assert (master.socket_bind_ip, master.socket_port, master.state_dir) == (
        "10.1.1.1",
        6000,
        "/srv/master",
    )
    assert (master.history_window, master.max_connections) == (60.0, 100)
    assert (master.max_unauthenticated, master.max_unauthenticated_per_address) == (10, 2)


def test_an_unknown_key_in_any_known_section_is_refused():
    for section in ("cluster", "master", "slave", "webserver"):
        message = refusal(**{section: {"colour": "blue"}})
        assert message.startswith(f"edge.cfg: [{section}] colour: is not a known setting")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            config_text().replace("master_ip = 10.0.0.1", ""),
            "edge.cfg: [slave] master_ip: is required but missing",
        ),
        (
            config_text().replace("[cluster]", "[other]"),
            "edge.cfg: [cluster]: section is missing (it holds the cluster secret)",
        ),
        (
            config_text(slave={"roles": " , "}),
            "edge.cfg: [slave] roles: lists no role",
        ),
        (
            config_text(slave={"roles": "turbo"}),
            "edge.cfg: [slave] roles: unknown role 'turbo' (built-in roles: basic, vitals,"
            " webserver; a custom role is package.module:ClassName)",
        ),
        (
            f"[cluster]\nsecret = {SECRET}\n",
            "edge.cfg: needs a [master] or a [slave] section",
        ),
        (
            config_text(cluster={"suspect_after": 3, "dead_after": 2}),
            "edge.cfg: [cluster] dead_after: 2 must be longer than suspect_after 3",
        ),
        (
            config_text() + "[cluster]\nsecret = again\n",
            "edge.cfg: not a valid INI file: While reading from 'edge.cfg' [line  5]:"
            " section 'cluster' already exists",
        ),
    ],
)
def test_faults_are_named_exactly(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "edge.cfg")
    assert str(caught.value) == message


def test_a_config_parsed_without_a_path_is_named_string():
    with pytest.raises(ConfigError) as caught:
        parse_config(config_text(secret="short-secret"))
    assert str(caught.value).startswith("<string>: [cluster] secret:")


def test_load_config_names_the_file_in_every_fault(tmp_path):
    missing = tmp_path / "missing.cfg"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert str(caught.value) == f"{missing}: file not found"
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path))
    assert str(caught.value).startswith(f"{tmp_path}: cannot read: [Errno 21]")
    cluster_only = tmp_path / "cluster.cfg"
    cluster_only.write_text(f"[cluster]\nsecret = {SECRET}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs a \\[master\\] or a \\[slave\\] section"):
        load_config(str(cluster_only))


# ----------------------------------------- sections added since (alerts, login, names)


@pytest.mark.parametrize("word", ["yes", "true", "on", "1", "TRUE", "On"])
def test_an_alert_flag_says_yes_in_four_ways(word):
    alerts = parse(alerts={"dead": word, "power": word, "store": word}).alerts
    assert (alerts.dead, alerts.power, alerts.store) == (True, True, True)


@pytest.mark.parametrize("word", ["no", "false", "off", "0", "NO", "Off"])
def test_an_alert_flag_says_no_in_four_ways(word):
    alerts = parse(alerts={"dead": word, "power": word, "store": word}).alerts
    assert (alerts.dead, alerts.power, alerts.store) == (False, False, False)


def test_alert_flags_default_to_yes_and_refuse_anything_else():
    alerts = parse(alerts={}).alerts
    assert (alerts.dead, alerts.power, alerts.store) == (True, True, True)
    for key in ("dead", "power", "store"):
        assert refusal(alerts={key: "maybe"}) == (
            f"edge.cfg: [alerts] {key}: 'maybe' is not yes or no"
        )


def test_the_dashboard_login_needs_both_settings():
    from rpicluster.web.auth import hash_password

    good = hash_password("secret", iterations=10000)
    assert refusal(webserver={"login_user": "admin"}) == (
        "edge.cfg: [webserver] login_password_hash: is required when the other login setting is set"
    )
    assert refusal(webserver={"login_password_hash": good}) == (
        "edge.cfg: [webserver] login_user: is required when the other login setting is set"
    )
    for user in ("ad:min", "ad\x7fmin"):
        assert refusal(webserver={"login_user": user, "login_password_hash": good}) == (
            "edge.cfg: [webserver] login_user: must be printable and hold no ':'"
        )
    webserver = parse(webserver={"login_user": "admin", "login_password_hash": good}).webserver
    assert (webserver.login_user, webserver.login_password_hash) == ("admin", good)


def test_groups_are_64_at_most_and_named_cut_to_40_characters():
    groups = ", ".join(f"g{i}" for i in range(64))
    assert len(parse(slave={"groups": groups}).slave.groups) == 64
    assert refusal(slave={"groups": groups + ", g64"}) == (
        "edge.cfg: [slave] groups: lists 65 groups, more than 64"
    )
    long = "x" * 300
    assert refusal(slave={"groups": long}).startswith(
        f"edge.cfg: [slave] groups: group {'x' * 40!r} "
    )


def test_a_node_name_is_named_cut_to_40_characters_when_wrong():
    long = "n" * 300
    assert refusal(slave={"node_name": long}).startswith(
        f"edge.cfg: [slave] node_name: {'n' * 40!r} "
    )
    assert parse(slave={"node_name": "  "}).slave.node_name is None


def test_the_alert_webhook_must_be_an_http_url_with_a_host():
    from rpicluster.config import WEBHOOK_FORMATS

    alerts = parse(alerts={"webhook_url": "http://hooks.local:8080/x"}).alerts
    assert alerts.webhook_url == "http://hooks.local:8080/x" and alerts.webhook_format == "json"
    assert parse(alerts={"webhook_url": "https://h/x"}).alerts.webhook_url == "https://h/x"
    for url in ("ftp://h/x", "http:///x"):
        assert refusal(alerts={"webhook_url": url}) == (
            "edge.cfg: [alerts] webhook_url: must be an http:// or https:// URL with a host"
        )
    assert refusal(alerts={"webhook_url": "http://h:99999/x"}) == (
        "edge.cfg: [alerts] webhook_url: has an invalid port"
    )
    assert parse(alerts={"webhook_format": "TEXT"}).alerts.webhook_format == "text"
    assert refusal(alerts={"webhook_format": "xml"}) == (
        f"edge.cfg: [alerts] webhook_format: 'xml' is not one of {', '.join(WEBHOOK_FORMATS)}"
    )
