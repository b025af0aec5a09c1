"""``RpiBasicSlaveThread``: the base class of every slave role.

As in the article, a slave is a ``threading.Thread`` whose ``run()`` connects to
the master, sends the node's details, receives the master's info and then calls
``perform_action()`` over and over; a new kind of slave overrides
``perform_action()`` and nothing else. Everything a real fleet needs lives once
in this base class, so every role gets it:

- reconnect forever with exponential backoff and full jitter (not a fixed 60 s);
- a *link* thread per connection that reads the master's frames and sends the
  heartbeats on their own schedule, so a slow ``perform_action()`` never makes the
  node look dead; it measures the heartbeat round trip and declares the master
  lost when nothing arrives for ``dead_after`` seconds;
- an exception in ``perform_action()`` is logged, counted and reported to the
  master (``action_error``), never fatal;
- ``stop()`` says ``goodbye`` (the master records ``left``, not ``dead``) and ends
  promptly, even in the middle of a backoff wait.

The work is shared by three modules: this one is the role's public API (what a
subclass overrides and calls), ``joining.py`` the loop that connects, shakes
hands and reconnects, ``link.py`` the connection's own thread (reading, heartbeats,
query replies). Everything a role file imports comes from here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import Any, Optional

from rpicluster import protocol
from rpicluster.backoff import Backoff
from rpicluster.config import DEFAULT_STATE_DIR, Config, ConfigError, TlsSettings
from rpicluster.identity import IdentityError, load_or_create_node_id
from rpicluster.joining import Joining
from rpicluster.link import Link, NotConnectedError, QueryError
from rpicluster.nodeinfo import node_details

MAX_ROLE_LENGTH = 200  # what the master accepts in hello (docs/protocol.md)

# One token per slave process, sent in every hello (docs/protocol.md section 4): all
# role threads of one rpicluster-slave share it, so the master tells this process
# reconnecting (same token: the newer connection replaces the older) from another
# machine using the same node id, a copied SD card (another token while this one
# is connected and heard from: refused with ``duplicate_id``).
INSTANCE = os.urandom(8).hex()

# Messages a slave may send with send(); the handshake and queries have their own paths.
_SENDABLE = (protocol.VITALS, protocol.ACTION_ERROR, protocol.GOODBYE, protocol.HEARTBEAT)


class RpiBasicSlaveThread(Joining, threading.Thread):
    """The ``basic`` role: joins the cluster and heartbeats; subclasses add work.

    Override :meth:`perform_action`; it is called over and over while connected.
    Helpers for subclasses: :attr:`node_id`, :attr:`master_info`, :attr:`config`,
    :meth:`send`, :meth:`request`, :meth:`wait`, :attr:`stopping`.
    """

    #: The role name sent to the master; a subclass that does not set it is
    #: named by its class path ``package.module:ClassName``.
    role: str = "basic"

    def __init__(
        self,
        master_ip: str,
        socket_port: int,
        *,
        secret: str,
        node_id: Optional[str] = None,
        state_dir: Optional[str] = None,
        config: Optional[Config] = None,
        heartbeat_interval: float = 1.0,
        dead_after: Optional[float] = None,
        reconnect_base: float = 1.0,
        reconnect_cap: float = 5.0,
        handshake_timeout: float = 5.0,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
        name: Optional[str] = None,
        node_name: Optional[str] = None,
        groups: tuple[str, ...] = (),
        tls: Optional[TlsSettings] = None,
    ) -> None:
        if not secret:
            raise ValueError("secret is required (the [cluster] secret)")
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        role = self.role_name()
        if not (0 < len(role) <= MAX_ROLE_LENGTH and role.isprintable() and role == role.strip()):
            raise ValueError(
                f"{type(self).__name__}.role {role[:40]!r} must be 1..{MAX_ROLE_LENGTH}"
                " printable characters without surrounding spaces"
            )
        super().__init__(name=name or f"slave-{role}", daemon=True)
        self.server_address = (master_ip, int(socket_port))
        self.secret = secret
        # With [tls]: verify the master (cluster CA and its name) before the hello.
        self.tls = tls
        self.config = config
        if node_id is None:
            node_id = load_or_create_node_id(state_dir or DEFAULT_STATE_DIR)
        self.node_id: str = node_id
        # Sent with the details: the name the fleet knows this node by (else the
        # master shows the OS hostname) and its inventory groups.
        self.node_name = node_name or None
        self.groups = tuple(groups)
        self.instance = INSTANCE  # the process's token (a test may give a thread its own)
        self.heartbeat_interval = float(heartbeat_interval)
        self.dead_after = float(dead_after or max(5.0, 5 * self.heartbeat_interval))
        self.handshake_timeout = float(handshake_timeout)
        self.max_frame_size = int(max_frame_size)
        self.backoff = Backoff(reconnect_base, reconnect_cap)
        self.master_info: dict[str, Any] = {}
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.last_rtt: Optional[float] = None
        self.action_errors = 0
        self.connections = 0  # successful handshakes so far
        self._interrupt = threading.Event()
        self._link: Optional[Link] = None
        self._query_ids = itertools.count(1)

    # ----------------------------------------------------------------- building

    @classmethod
    def role_name(cls) -> str:
        """The role this class registers as (its own ``role``, else its class path)."""
        own = cls.__dict__.get("role")
        return own if isinstance(own, str) and own else f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def from_config(cls, config: Config) -> RpiBasicSlaveThread:
        """Build the role thread from a validated config with a ``[slave]`` section."""
        if config.slave is None:
            raise ConfigError(config.path, "slave", None, "section is missing")
        cluster, slave = config.cluster, config.slave
        try:
            node_id = load_or_create_node_id(slave.state_dir)
        except IdentityError as exc:
            raise ConfigError(config.path, "slave", "state_dir", str(exc)) from None
        return cls(
            slave.master_ip,
            slave.socket_port,
            secret=cluster.secret,
            node_id=node_id,
            config=config,
            heartbeat_interval=cluster.heartbeat_interval,
            dead_after=cluster.dead_after,
            reconnect_base=slave.reconnect_base,
            reconnect_cap=slave.reconnect_cap,
            handshake_timeout=cluster.handshake_timeout,
            max_frame_size=cluster.max_frame_size,
            node_name=slave.node_name,
            groups=slave.groups,
            tls=config.tls,
        )

    def details(self) -> dict[str, Any]:
        """What the hello carries: the machine's facts, the node name and groups."""
        details = dict(node_details())
        if self.node_name:
            details["node_name"] = self.node_name
        details["groups"] = list(self.groups)
        return details

    # ------------------------------------------------------------ subclass API

    def perform_action(self) -> None:
        """One unit of the role's work; the base role only idles (heartbeats run apart)."""
        self.wait(None)

    def wait(self, seconds: Optional[float]) -> bool:
        """Sleep up to ``seconds`` (None: until woken); True once :meth:`stop` was called.

        Also returns early (False) when the connection is lost, so the role gets
        back to ``run()`` and the thread reconnects at once.
        """
        self._interrupt.wait(seconds)
        return self.stopping.is_set()

    def send(self, msg_type: str, **fields: Any) -> None:
        """Send one message to the master; raises NotConnectedError when offline."""
        if msg_type not in _SENDABLE:
            raise ValueError(
                f"send() cannot send {msg_type!r} (one of: {', '.join(_SENDABLE)});"
                " use request() for queries"
            )
        link = self._link
        if link is None:
            raise NotConnectedError("not connected to the master")
        link.send(protocol.make(msg_type, **fields))

    def request(self, what: str, timeout: float = 5.0, **fields: Any) -> Any:
        """Ask the master a ``query`` and return the reply's ``data``.

        Raises :class:`QueryError` when the master answers with an error,
        :class:`TimeoutError` when no reply comes within ``timeout`` seconds and
        :class:`NotConnectedError` when the connection is down or lost meanwhile.
        """
        link = self._link
        if link is None:
            raise NotConnectedError("not connected to the master")
        query_id = next(self._query_ids)
        slot: list[Any] = [threading.Event(), None]
        with link.pending_lock:
            link.pending[query_id] = slot
        try:
            link.send(protocol.make(protocol.QUERY, id=query_id, what=what, **fields))
            slot[0].wait(timeout)
        finally:
            with link.pending_lock:
                link.pending.pop(query_id, None)
        reply = slot[1]
        if reply is None:
            if link.closed.is_set():
                raise NotConnectedError(f"connection lost during query {what!r}")
            raise TimeoutError(f"master did not answer query {what!r} within {timeout:g} s")
        if not reply["ok"]:
            raise QueryError(str(reply.get("error", "query failed")))
        return reply.get("data")

    # ---------------------------------------------------------------- lifecycle

    def stop(self) -> None:
        """Say goodbye to the master and end the thread promptly (join() to wait)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._interrupt.set()
        link = self._link
        if link is not None and not link.closed.is_set():
            with contextlib.suppress(NotConnectedError):
                link.send(protocol.make(protocol.GOODBYE, reason="slave stopping"))
            link.close("slave stopping")
