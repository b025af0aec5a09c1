"""The persistent node id of a Pi, kept in ``<state_dir>/node_id``.

The article numbered slaves with ``random.randint(1, 100000)`` at every start, so
two Pis could collide and a rebooted Pi came back as a stranger. A uuid4 created
once and kept on disk names the Pi for its whole life: the master recognises it
after a reboot or a reconnect, and every role thread of one process shares it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

logger = logging.getLogger(__name__)

NODE_ID_FILE = "node_id"
_MAX_ID_LENGTH = 128


class IdentityError(Exception):
    """The node id cannot be read or created; the message names the path and the fix."""


def _valid(node_id: str) -> bool:
    return 0 < len(node_id) <= _MAX_ID_LENGTH and node_id.isprintable() and " " not in node_id


def new_node_id() -> str:
    """A random (version 4) uuid, as ``str(uuid.uuid4())`` writes it.

    Made here from ``os.urandom`` because the ``uuid`` module (which also pulls in
    ``platform`` checks and ``_uuid``) costs the slave about 0.2 MB of RSS for one
    call in its life.
    """
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def load_or_create_node_id(state_dir: str) -> str:
    """Return the node id kept in ``state_dir``, creating it (uuid4) the first time.

    The file is written atomically (temporary file, fsync, rename), so a power cut
    during the first start never leaves an empty or half-written id behind.
    Raises :class:`IdentityError` when the directory cannot be created or written,
    or when the file holds something that is not a node id.
    """
    directory = state_dir
    path = os.path.join(directory, NODE_ID_FILE)
    try:
        with open(path, encoding="utf-8") as source:
            text = source.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        text = None  # created below; mkdir() names the problem if it cannot be
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"cannot read node id file {path}: {exc}") from None
    if text is not None:
        if not _valid(text):
            raise IdentityError(
                f"node id file {path} holds {text[:40]!r}, not a node id; delete it to get a new id"
            )
        return text

    node_id = new_node_id()
    try:
        os.makedirs(directory, exist_ok=True)
        # pathlib/tempfile would cost the slave ~1.5 MB RSS of imports; a unique name is enough.
        tmp = os.path.join(directory, f".node_id.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise IdentityError(
            f"cannot create node id in state directory {directory}: {exc.strerror or exc}"
            " (make it writable by the rpicluster user, or set state_dir)"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(node_id + "\n")
            out.flush()
            os.fsync(out.fileno())
        # Two processes starting at once: link() refuses an existing name atomically
        # (a check-then-rename would let both win), so the first one wins and the
        # other reads its id back.
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_node_id(state_dir)
        finally:
            os.unlink(tmp)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise IdentityError(f"cannot write node id file {path}: {exc.strerror or exc}") from None
    logger.info("created node id %s in %s", node_id, path)
    return node_id
