"""Reading and validating ``rpicluster.cfg``.

Every key is checked before anything starts, and a bad one stops the program
with exit code 2 and one line naming the file, the section and the key: a wrong
setting must never half-start a Pi. ``rpicluster.cfg.example`` documents the keys.
The work is shared by three modules: this one reads each section and checks
the file as a whole (unknown keys, the plain protocol on loopback only);
``settings.py`` holds what a valid file gives (``Config`` and a dataclass per
section, ``ConfigError``), ``configvalues.py`` the typed values every section
uses. Everything is importable from here, as before.
"""

from __future__ import annotations

import configparser
import urllib.parse
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from rpicluster import memberdata as md
from rpicluster.configvalues import Reader, flag, is_loopback, parse_groups, parse_roles
from rpicluster.protocol import DEFAULT_MAX_FRAME_SIZE
from rpicluster.settings import (
    BUILTIN_ROLES,
    DEFAULT_CONFIG_PATH,
    DEFAULT_FORGET_AFTER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    DEFAULT_WEBSERVER_PORT,
    MAX_FORGET_AFTER,
    MIN_SECRET_LENGTH,
    WEBHOOK_FORMATS,
    AlertSettings,
    ClusterSettings,
    Config,
    ConfigError,
    MasterSettings,
    SlaveSettings,
    TlsSettings,
    WebserverSettings,
)

# The public names of rpicluster.config, wherever they are defined.
__all__ = [
    "BUILTIN_ROLES",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_FORGET_AFTER",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_UNAUTHENTICATED",
    "DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS",
    "DEFAULT_PORT",
    "DEFAULT_STATE_DIR",
    "DEFAULT_WEBSERVER_PORT",
    "MAX_FORGET_AFTER",
    "MIN_SECRET_LENGTH",
    "WEBHOOK_FORMATS",
    "AlertSettings",
    "ClusterSettings",
    "Config",
    "ConfigError",
    "MasterSettings",
    "SlaveSettings",
    "TlsSettings",
    "WebserverSettings",
    "is_loopback",
    "load_config",
    "parse_config",
    "parse_groups",
    "parse_roles",
]


def _read_cluster(r: Reader) -> ClusterSettings:
    s = "cluster"
    if not r.parser.has_section(s):
        raise ConfigError(r.path, s, None, "section is missing (it holds the cluster secret)")
    secret = r.text(s, "secret")
    if len(secret) < MIN_SECRET_LENGTH:
        raise r.error(s, "secret", f"must be at least {MIN_SECRET_LENGTH} characters long")
    interval = r.number(s, "heartbeat_interval", 1.0, minimum=0.01, maximum=3600)
    suspect = r.number(s, "suspect_after", 2.5 * interval, minimum=0.01)
    dead = r.number(s, "dead_after", max(5.0, 2 * suspect), minimum=0.02)
    if suspect <= interval:
        raise r.error(s, "suspect_after", f"{suspect:g} must be longer than heartbeat_interval")
    if dead <= suspect:
        raise r.error(s, "dead_after", f"{dead:g} must be longer than suspect_after {suspect:g}")
    return ClusterSettings(
        secret=secret,
        heartbeat_interval=interval,
        suspect_after=suspect,
        dead_after=dead,
        max_frame_size=r.number(
            s, "max_frame_size", DEFAULT_MAX_FRAME_SIZE, minimum=16384, maximum=2**31, kind=int
        ),
        handshake_timeout=r.number(s, "handshake_timeout", 5.0, minimum=0.1, maximum=600),
    )


def _read_master(r: Reader, cluster: ClusterSettings) -> MasterSettings:
    s = "master"
    forget_after = r.number(
        s, "forget_after", DEFAULT_FORGET_AFTER, minimum=0.0, maximum=MAX_FORGET_AFTER
    )
    if 0 < forget_after <= cluster.dead_after:
        raise r.error(
            s,
            "forget_after",
            f"{forget_after:g} must be 0 (never forget) or longer than dead_after"
            f" {cluster.dead_after:g}",
        )
    metrics_port = r.number(s, "metrics_port", 0, minimum=0, maximum=65535, kind=int)
    return MasterSettings(
        forget_after=forget_after,
        metrics_port=metrics_port,
        socket_bind_ip=r.text(s, "socket_bind_ip", "0.0.0.0"),
        socket_port=r.port(s, "socket_port", DEFAULT_PORT),
        state_dir=r.text(s, "state_dir", DEFAULT_STATE_DIR),
        history_window=r.number(s, "history_window", 3600.0, minimum=1.0),
        max_connections=r.number(
            s, "max_connections", DEFAULT_MAX_CONNECTIONS, minimum=16, maximum=1000000, kind=int
        ),
        max_unauthenticated=r.number(
            s,
            "max_unauthenticated",
            DEFAULT_MAX_UNAUTHENTICATED,
            minimum=1,
            maximum=65536,
            kind=int,
        ),
        max_unauthenticated_per_address=r.number(
            s,
            "max_unauthenticated_per_address",
            DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
            minimum=1,
            maximum=65536,
            kind=int,
        ),
    )


def _read_node_name(r: Reader) -> Optional[str]:
    """``[slave] node_name``: a protocol name (printable, 1..256 characters), or None."""
    if not r.parser.has_option("slave", "node_name"):
        return None
    value = r.parser.get("slave", "node_name", raw=True).strip()
    if not value:
        return None
    problem = md.check_name(value, md.MAX_STRING)
    if problem:
        raise r.error("slave", "node_name", f"{value[:40]!r} {problem}")
    return value


def _read_slave(r: Reader) -> SlaveSettings:
    s = "slave"
    try:
        groups = parse_groups(r.text(s, "groups", ""))
    except ValueError as exc:
        raise r.error(s, "groups", str(exc)) from None
    try:
        roles = parse_roles(r.text(s, "roles", "basic, vitals"))
    except ValueError as exc:
        raise r.error(s, "roles", str(exc)) from None
    base = r.number(s, "reconnect_base", 1.0, minimum=0.01, maximum=60)
    cap = r.number(s, "reconnect_cap", 5.0, minimum=0.01, maximum=3600)
    if cap < base:
        raise r.error(s, "reconnect_cap", f"{cap:g} must not be less than reconnect_base {base:g}")
    return SlaveSettings(
        master_ip=r.text(s, "master_ip"),
        socket_port=r.port(s, "socket_port", DEFAULT_PORT),
        roles=roles,
        state_dir=r.text(s, "state_dir", DEFAULT_STATE_DIR),
        reconnect_base=base,
        reconnect_cap=cap,
        vitals_interval=r.number(s, "vitals_interval", 5.0, minimum=0.05, maximum=3600),
        node_name=_read_node_name(r),
        groups=groups,
    )


def _read_webserver(r: Reader, tls: Optional[TlsSettings]) -> WebserverSettings:
    s = "webserver"
    return WebserverSettings(
        webserver_host=r.text(s, "webserver_host", "0.0.0.0"),
        webserver_port=r.port(s, "webserver_port", DEFAULT_WEBSERVER_PORT),
        refresh_interval=r.number(s, "refresh_interval", 2.0, minimum=0.1, maximum=3600),
        history_window=r.number(s, "history_window", 3600.0, minimum=1.0),
        **_read_login(r, s),
        **_read_https(r, s, tls),
    )


def _read_https(r: Reader, s: str, tls: Optional[TlsSettings]) -> dict[str, Any]:
    """``https`` and the files it serves: its own pair, else the node's ``[tls]`` one."""
    https = flag(r, s, "https", False)
    cert = _config_path(r, r.text(s, "https_cert_file", ""))
    key = _config_path(r, r.text(s, "https_key_file", ""))
    if bool(cert) != bool(key):
        missing = "https_key_file" if cert else "https_cert_file"
        raise r.error(s, missing, "is required when the other one is set")
    if not https:
        return {"https": False, "https_cert_file": cert, "https_key_file": key}
    keys = ("https_cert_file", "https_key_file")
    if not cert:
        if tls is None:
            raise r.error(
                s,
                "https_cert_file",
                "is required when https = yes and there is no [tls] section"
                " (without it the Pi's own certificate of the cluster CA is served)",
            )
        cert, key = tls.cert_file, tls.key_file
        keys = ("https", "https")  # [tls] has checked them already: named for the odd case
    from rpicluster.web.https import HttpsError, check_files

    try:
        check_files(cert, key, cert_key=keys[0], key_key=keys[1])
    except HttpsError as exc:
        raise r.error(s, exc.key, exc.problem) from None
    return {"https": True, "https_cert_file": cert, "https_key_file": key}


def _config_path(r: Reader, value: str) -> str:
    """A path as written, or relative to the config file's directory; empty stays empty."""
    if not value or Path(value).is_absolute():
        return value
    base = Path(r.path).parent if r.path and not r.path.startswith("<") else Path(".")
    return str(base / value)


def _read_login(r: Reader, s: str) -> dict[str, str]:
    """``login_user`` and ``login_password_hash``: both or neither, the hash well-formed."""
    user = r.text(s, "login_user", "")
    password_hash = r.text(s, "login_password_hash", "")
    if bool(user) != bool(password_hash):
        missing = "login_password_hash" if user else "login_user"
        raise r.error(s, missing, "is required when the other login setting is set")
    if password_hash:
        from rpicluster.web.auth import parse_hash

        try:
            parse_hash(password_hash)
        except ValueError as exc:
            raise r.error(s, "login_password_hash", str(exc)) from None
        if ":" in user or not user.isprintable():
            raise r.error(s, "login_user", "must be printable and hold no ':'")
    return {"login_user": user, "login_password_hash": password_hash}


def _read_alerts(r: Reader) -> AlertSettings:
    s = "alerts"
    url = r.text(s, "webhook_url", "")
    if url:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise r.error(s, "webhook_url", "must be an http:// or https:// URL with a host")
        try:
            parsed.port  # noqa: B018 (raises ValueError on a bad port)
        except ValueError:
            raise r.error(s, "webhook_url", "has an invalid port") from None
    fmt = r.text(s, "webhook_format", "json").lower()
    if fmt not in WEBHOOK_FORMATS:
        raise r.error(s, "webhook_format", f"{fmt!r} is not one of {', '.join(WEBHOOK_FORMATS)}")
    return AlertSettings(
        webhook_url=url,
        webhook_format=fmt,
        webhook_timeout=r.number(s, "webhook_timeout", 5.0, minimum=0.1, maximum=60),
        hold=r.number(s, "hold", 10.0, minimum=0.0, maximum=86400),
        dead=flag(r, s, "dead", True),
        suspect_for=r.number(s, "suspect_for", 60.0, minimum=0.0, maximum=86400),
        temperature=r.number(s, "temperature", 80.0, minimum=0.0, maximum=200),
        power=flag(r, s, "power", True),
        disk_free_percent=r.number(s, "disk_free_percent", 10.0, minimum=0.0, maximum=100),
        store=flag(r, s, "store", True),
    )


def _read_tls(r: Reader) -> Optional[TlsSettings]:
    """``[tls]``: all three files or none; each readable, the key private, all loadable."""
    s = "tls"
    if not r.parser.has_section(s):
        return None
    # Imported here: a slave without [tls] never maps OpenSSL (cli._lean_hashing).
    from rpicluster.tls import TlsError, check_files

    base = Path(r.path).parent if r.path and not r.path.startswith("<") else Path(".")

    def path(key: str) -> str:
        value = r.text(s, key)
        return str(base / value) if not Path(value).is_absolute() else value

    settings = TlsSettings(
        ca_file=path("ca_file"),
        cert_file=path("cert_file"),
        key_file=path("key_file"),
        master_name=r.text(s, "master_name", ""),
    )
    try:
        check_files(settings)
    except TlsError as exc:
        raise r.error(s, exc.key, exc.problem) from None
    return settings


def _check_plain_is_local(
    r: Reader, master: Optional[MasterSettings], slave: Optional[SlaveSettings]
) -> None:
    """Without [tls] the HMAC proves membership only: allowed on loopback alone.

    The one-machine quick start keeps working unchanged; a fleet on a network
    needs the cluster CA (docs/protocol.md sections 13 and 14).
    """
    hint = (
        "is not a loopback address and there is no [tls] section: a fleet on a network"
        " needs TLS with the cluster CA (the Ansible roles set it up; docs/deploy.md),"
        " the plain protocol is for one machine only (127.0.0.1)"
    )
    if master is not None and not is_loopback(master.socket_bind_ip):
        raise r.error("master", "socket_bind_ip", f"{master.socket_bind_ip} {hint}")
    if slave is not None and not is_loopback(slave.master_ip):
        raise r.error("slave", "master_ip", f"{slave.master_ip} {hint}")


def _check_known_keys(r: Reader) -> None:
    """A misspelt key in a known section is an error, not a silently ignored line."""
    known = {
        "cluster": ClusterSettings,
        "master": MasterSettings,
        "slave": SlaveSettings,
        "webserver": WebserverSettings,
        "alerts": AlertSettings,
        "tls": TlsSettings,
    }
    for section, settings in known.items():
        if not r.parser.has_section(section):
            continue
        keys = [f.name for f in fields(settings)]
        for key in r.parser.options(section):
            if key not in keys:
                import difflib  # here: only a wrong key needs it (0.2 MB of a slave's RSS)

                close = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(keys)})"
                raise r.error(section, key, f"is not a known setting{hint}")


def parse_config(
    text: str, path: str = "<string>", *, need: str = "any", plain_local_only: bool = False
) -> Config:
    """Validate config ``text``; ``need`` is ``master``, ``slave`` or ``any``.

    ``plain_local_only`` (what :func:`load_config`, so every program, asks):
    without ``[tls]`` the master's address must be loopback.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        first_line = str(exc).splitlines()[0]
        raise ConfigError(path, None, None, f"not a valid INI file: {first_line}") from None
    r = Reader(path, parser)
    _check_known_keys(r)
    if need in ("master", "slave") and not parser.has_section(need):
        raise ConfigError(path, need, None, "section is missing")
    cluster = _read_cluster(r)
    master = _read_master(r, cluster) if parser.has_section("master") else None
    slave = _read_slave(r) if parser.has_section("slave") else None
    if need == "any" and master is None and slave is None:
        raise ConfigError(path, None, None, "needs a [master] or a [slave] section")
    tls = _read_tls(r)
    if tls is None and plain_local_only:
        _check_plain_is_local(r, master, slave)
    return Config(
        path=path,
        cluster=cluster,
        master=master,
        slave=slave,
        webserver=_read_webserver(r, tls),
        raw=parser,
        alerts=_read_alerts(r),
        tls=tls,
    )


def load_config(path: str = DEFAULT_CONFIG_PATH, *, need: str = "any") -> Config:
    """Read and validate the file at ``path``; raise :class:`ConfigError` on any fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, None, "file not found") from None
    except PermissionError:
        problem = "permission denied (run as root or as the rpicluster user)"
        raise ConfigError(path, None, None, problem) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc}") from None
    return parse_config(text, path, need=need, plain_local_only=True)
