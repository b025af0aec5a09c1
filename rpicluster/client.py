"""A small blocking client of the master, for ``rpicluster status`` and tests.

It authenticates like a slave (kind ``client``), asks ``query`` messages and
waits for their ``reply``. No threads: one question, one answer.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
from typing import TYPE_CHECKING, Any, Optional

from rpicluster import protocol
from rpicluster import tls as tlsmod
from rpicluster.config import TlsSettings

if TYPE_CHECKING:
    from rpicluster.config import Config


class ClientError(Exception):
    """The master could not be reached or refused us; ``str()`` says which and why."""


class QueryFailed(ClientError):
    """The master answered a query with an error; ``code`` is its ``error.code``."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class MasterClient:
    """``with MasterClient(host, port, secret) as client: client.cluster_state()``."""

    def __init__(
        self,
        host: str,
        port: int,
        secret: str,
        timeout: float = 5.0,
        *,
        node_id: Optional[str] = None,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
        tls: Optional[TlsSettings] = None,
    ) -> None:
        self.host = host
        # With [tls]: the master is verified (CA and name) before a byte of the
        # protocol is sent, and our own certificate is shown to it.
        self.tls = tls
        self.port = int(port)
        self.secret = secret
        self.timeout = timeout
        self.node_id = node_id or f"cli@{socket.gethostname()}"
        self.max_frame_size = max_frame_size
        self.master_info: dict[str, Any] = {}
        self._sock: Any = None  # a socket, or a tls.TlsSocket over one
        self._ids = itertools.count(1)

    @classmethod
    def from_config(cls, config: Config, timeout: float = 5.0) -> MasterClient:
        """A client of the master this config names, with its secret and ``[tls]``."""
        host, port = config.master_address()
        return cls(
            host,
            port,
            config.cluster.secret,
            timeout=timeout,
            max_frame_size=config.cluster.max_frame_size,
            tls=config.tls,
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self) -> MasterClient:
        """Connect and authenticate; raises :class:`ClientError` naming the master."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ClientError(f"cannot reach the master at {self.where}: {exc}") from None
        if self.tls is not None:
            try:
                context = tlsmod.cached_client_context(self.tls)
                sock = tlsmod.connect(sock, context, self.tls.master_name or self.host)
            except ssl.SSLError as exc:
                sock.close()
                raise ClientError(
                    f"TLS with the master at {self.where} failed: {tlsmod.explain(exc)}"
                ) from None
            except (OSError, tlsmod.TlsError) as exc:
                sock.close()
                raise ClientError(f"TLS with the master at {self.where} failed: {exc}") from None
        try:
            welcome = protocol.client_handshake(
                sock,
                self.secret,
                kind=protocol.KIND_CLIENT,
                node_id=self.node_id,
                role="-",
                max_frame_size=self.max_frame_size,
            )
        except protocol.ProtocolError as exc:
            sock.close()
            hint = (
                " (is [cluster] secret the same as the master's?)"
                if exc.code == protocol.E_AUTH_FAILED
                else ""
            )
            raise ClientError(
                f"master at {self.where} refused us: {exc.code}: {exc.message}{hint}"
            ) from None
        except (OSError, protocol.DisconnectionError) as exc:
            sock.close()
            cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
            text = tlsmod.explain(cause) if isinstance(cause, ssl.SSLError) else str(exc)
            raise ClientError(f"handshake with the master at {self.where} failed: {text}") from None
        self.master_info = welcome.get("master", {})
        self._sock = sock
        return self

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError, protocol.DisconnectionError):
                protocol.send_frame(sock, protocol.make(protocol.GOODBYE, reason="client done"))
            sock.close()

    def __enter__(self) -> MasterClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def query(self, what: str, **fields: Any) -> Any:
        """Ask one query and return the reply's ``data``; :class:`QueryFailed` on ``ok: false``."""
        if self._sock is None:
            self.connect()
        sock = self._sock
        assert sock is not None
        query_id = next(self._ids)
        try:
            protocol.send_frame(
                sock, protocol.make(protocol.QUERY, id=query_id, what=what, **fields)
            )
            while True:
                message = protocol.recv_message(sock, self.max_frame_size)
                kind = message["type"]
                if kind == protocol.REPLY and message["id"] == query_id:
                    break
                if kind == protocol.ERROR:
                    raise ClientError(
                        f"master at {self.where} closed the query: {message['code']}:"
                        f" {message['message']}"
                    )
                if kind == protocol.GOODBYE:
                    raise ClientError(f"master at {self.where} said goodbye: {message['reason']}")
        except socket.timeout:
            self.close()
            raise ClientError(
                f"master at {self.where} did not answer query {what!r} within {self.timeout:g} s"
            ) from None
        except protocol.ProtocolError as exc:
            self.close()
            raise ClientError(f"master at {self.where} sent a bad frame: {exc}") from None
        except (OSError, protocol.DisconnectionError) as exc:
            self.close()
            raise ClientError(f"connection to the master at {self.where} lost: {exc}") from None
        if not message["ok"]:
            error = message.get("error")
            error = error if isinstance(error, dict) else {}
            code = error.get("code") if isinstance(error.get("code"), str) else ""
            text = error.get("message") if isinstance(error.get("message"), str) else "failed"
            raise QueryFailed(f"query {what!r}: {code or 'error'}: {text}", code)
        return message.get("data")

    def forget(self, node: str, force: bool = False) -> dict[str, Any]:
        """Make the master forget ``node`` (name or id); :class:`QueryFailed` says why not."""
        data = self.query("forget", node=node, force=force)
        if not isinstance(data, dict):
            raise ClientError(f"master at {self.where} sent a malformed forget reply")
        return data

    def cluster_state(self, page_size: Optional[int] = None) -> dict[str, Any]:
        """The whole cluster, all pages: ``{"master": {...}, "nodes": [...]}``."""
        nodes: list[dict[str, Any]] = []
        master: dict[str, Any] = {}
        offset: Optional[int] = 0
        seen = set()
        while offset is not None:
            if offset in seen:
                raise ClientError(f"master at {self.where} repeated page offset {offset}")
            seen.add(offset)
            fields: dict[str, Any] = {"offset": offset}
            if page_size is not None:
                fields["limit"] = page_size
            data = self.query("cluster", **fields)
            if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
                raise ClientError(f"master at {self.where} sent a malformed cluster page")
            master = data.get("master") or master
            nodes.extend(data["nodes"])
            offset = data.get("next_offset")
        return {"master": master, "nodes": nodes}
