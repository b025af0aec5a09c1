"""What a validated ``rpicluster.cfg`` holds: one frozen dataclass per section, and ConfigError.

Split from ``config.py`` so a module that only uses settings reads their
shape, defaults and meaning in one place, apart from how a file is parsed and
checked: ``Config`` and its sections are what every program gets once its file
passed validation, and ``ConfigError`` (file, section, key and problem in one
line) is how any program refuses a wrong one. ``config.py`` re-exports all of
it, so ``from rpicluster.config import Config`` stays the import path.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field
from typing import Optional

from rpicluster.protocol import DEFAULT_MAX_FRAME_SIZE

DEFAULT_CONFIG_PATH = "/etc/rpicluster/rpicluster.cfg"
DEFAULT_STATE_DIR = "/var/lib/rpicluster"
DEFAULT_PORT = 5005
DEFAULT_WEBSERVER_PORT = 8123
BUILTIN_ROLES = ("basic", "vitals", "webserver")
MIN_SECRET_LENGTH = 16
DEFAULT_MAX_CONNECTIONS = 30000  # 10,000 Pis with 2-3 roles each, well below LimitNOFILE
DEFAULT_MAX_UNAUTHENTICATED = 1024
DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS = 64
DEFAULT_FORGET_AFTER = 7 * 24 * 3600.0  # a week: a Pi away for a weekend is not forgotten
MAX_FORGET_AFTER = 10 * 365 * 24 * 3600.0


class ConfigError(Exception):
    """A setting is missing or wrong; ``str()`` names file, section and key."""

    def __init__(self, path: str, section: Optional[str], key: Optional[str], problem: str):
        where = path
        if section:
            where += f": [{section}]"
        if key:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")
        self.path, self.section, self.key, self.problem = path, section, key, problem


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: this Pi's credential and the cluster CA (paths on the Pi; tls.py)."""

    ca_file: str
    cert_file: str
    key_file: str
    # Slaves and clients: the name the master's certificate must hold (DNS or IP
    # SAN). Empty: the address dialled ([slave] master_ip, or the master's bind).
    master_name: str = ""


@dataclass(frozen=True)
class ClusterSettings:
    """What the master and every slave must agree on ([cluster])."""

    secret: str
    heartbeat_interval: float = 1.0
    suspect_after: float = 2.5
    dead_after: float = 5.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_timeout: float = 5.0


@dataclass(frozen=True)
class MasterSettings:
    """Where the master listens and keeps its registry ([master])."""

    socket_bind_ip: str = "0.0.0.0"
    socket_port: int = DEFAULT_PORT
    state_dir: str = DEFAULT_STATE_DIR
    history_window: float = 3600.0
    # Bounds on connections (master/admission.py); the unit's LimitNOFILE is 65536.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
    # Seconds a node may stay dead or left before the master forgets it (0: never).
    forget_after: float = DEFAULT_FORGET_AFTER
    # The master's own /metrics (master/metrics.py) on socket_bind_ip; 0 = off.
    metrics_port: int = 0


@dataclass(frozen=True)
class SlaveSettings:
    """How a slave finds its master and which roles it runs ([slave])."""

    master_ip: str
    socket_port: int = DEFAULT_PORT
    roles: tuple[str, ...] = ("basic", "vitals")
    state_dir: str = DEFAULT_STATE_DIR
    reconnect_base: float = 1.0
    reconnect_cap: float = 5.0
    vitals_interval: float = 5.0
    # The node's name shown everywhere (the inventory hostname, rendered by the
    # role); None: the master falls back to the OS hostname, which many fleets
    # leave at "raspberrypi" on every card.
    node_name: Optional[str] = None
    groups: tuple[str, ...] = ()  # the inventory groups of the node, sent with its details


@dataclass(frozen=True)
class WebserverSettings:
    """The dashboard served by the ``webserver`` slave role ([webserver])."""

    webserver_host: str = "0.0.0.0"
    webserver_port: int = DEFAULT_WEBSERVER_PORT
    refresh_interval: float = 2.0
    history_window: float = 3600.0
    # An optional login (HTTP Basic): both set, or neither (no login). The hash is
    # pbkdf2_sha256$<iterations>$<salt>$<hash> (rpicluster/web/auth.py).
    login_user: str = ""
    login_password_hash: str = ""
    # HTTPS (web/https.py): off by default. On, it serves https_cert_file and
    # https_key_file, else this Pi's own [tls] cert_file and key_file (resolved
    # here, so these two always name the files served when https is on).
    https: bool = False
    https_cert_file: str = ""
    https_key_file: str = ""


WEBHOOK_FORMATS = ("json", "text", "chat")


@dataclass(frozen=True)
class AlertSettings:
    """The master's alert rules and where it sends them ([alerts]; master/alerts.py).

    A threshold of 0 turns its rule off. Without ``webhook_url`` the alerts are
    still evaluated and shown (``rpicluster status``, the dashboard), not sent.
    """

    webhook_url: str = ""
    webhook_format: str = "json"
    webhook_timeout: float = 5.0
    hold: float = 10.0
    dead: bool = True
    suspect_for: float = 60.0
    temperature: float = 80.0
    power: bool = True
    disk_free_percent: float = 10.0
    store: bool = True


@dataclass(frozen=True)
class Config:
    """A validated ``rpicluster.cfg``. ``master``/``slave`` are None when absent."""

    path: str
    cluster: ClusterSettings
    master: Optional[MasterSettings]
    slave: Optional[SlaveSettings]
    webserver: WebserverSettings
    raw: configparser.ConfigParser = field(repr=False, compare=False)
    alerts: AlertSettings = AlertSettings()
    # [tls]: this Pi's certificate and the cluster CA; None runs HMAC only.
    tls: Optional[TlsSettings] = None

    def section(self, name: str) -> dict[str, str]:
        """Raw options of any section, for a custom role's own settings."""
        return dict(self.raw[name]) if self.raw.has_section(name) else {}

    def master_address(self) -> tuple[str, int]:
        """Where a client on this Pi reaches the master (used by ``rpicluster status``)."""
        if self.slave is not None:
            return self.slave.master_ip, self.slave.socket_port
        if self.master is not None:
            ip = self.master.socket_bind_ip
            if ip in ("0.0.0.0", ""):
                ip = "127.0.0.1"
            elif ip == "::":
                ip = "::1"
            return ip, self.master.socket_port
        raise ConfigError(self.path, "slave", "master_ip", "no [slave] or [master] section")
