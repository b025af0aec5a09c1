"""An optional login for the dashboard: HTTP Basic with a PBKDF2 password hash.

Standard library only (a Pi has no bcrypt): the inventory holds
``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (salt and hash base64), never the
password, so it may sit vault-encrypted in group_vars and in ``rpicluster.cfg``
(0640) without giving the password away. Make one with

    python3 -m rpicluster.web.auth          # asks for the password twice

A check costs one PBKDF2 (about 0.1 s on a Pi at the default iterations), so a
browser's repeated requests are served from a small cache of headers already
proved good, and failed checks are throttled (a token bucket of
``FAIL_BURST`` refilled at ``FAIL_RATE`` a second): guessing stays slow and
cannot take the Pi's CPU.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from typing import Optional

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 200_000
MIN_ITERATIONS = 10_000
CACHE_SIZE = 32  # Authorization headers already proved good
FAIL_BURST = 10.0
FAIL_RATE = 1.0  # failed checks a second, after the burst


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """The inventory's form of ``password``: ``pbkdf2_sha256$<n>$<salt>$<hash>``."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    encoded = (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return "$".join((SCHEME, str(iterations), *encoded))


def parse_hash(text: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a password hash; ValueError says what is wrong."""
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(
            f"is not a {SCHEME}$<iterations>$<salt>$<hash> password hash"
            " (make one with: python3 -m rpicluster.web.auth)"
        )
    if not parts[1].isdigit() or int(parts[1]) < MIN_ITERATIONS:
        raise ValueError(f"needs at least {MIN_ITERATIONS} iterations")
    try:
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("salt and hash must be base64") from None
    if len(salt) < 8 or len(digest) != 32:
        raise ValueError("salt must be at least 8 bytes and the hash 32")
    return int(parts[1]), salt, digest


class BasicAuth:
    """Checks ``Authorization: Basic ...`` headers against one user and password hash."""

    def __init__(self, user: str, password_hash: str) -> None:
        self.user = user
        self.iterations, self.salt, self.digest = parse_hash(password_hash)
        self._good: OrderedDict[bytes, None] = OrderedDict()
        self._tokens = FAIL_BURST
        self._at = time.monotonic()
        self._lock = threading.Lock()  # rendering threads share it

    def check(self, header: Optional[str]) -> Optional[bool]:
        """True: let in; False: wrong or missing; None: too many failures, try later."""
        if not header or header[:6].lower() != "basic ":
            return False
        key = hashlib.sha256(header.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            if key in self._good:
                self._good.move_to_end(key)
                return True
            now = time.monotonic()
            self._tokens = min(FAIL_BURST, self._tokens + (now - self._at) * FAIL_RATE)
            self._at = now
            if self._tokens < 1.0:
                return None
        ok = self._verify(header[6:].strip())
        with self._lock:
            if ok:
                self._good[key] = None
                while len(self._good) > CACHE_SIZE:
                    self._good.popitem(last=False)
            else:
                self._tokens -= 1.0
        return ok

    def _verify(self, encoded: str) -> bool:
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            return False
        digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), self.salt, self.iterations)
        same_user = hmac.compare_digest(user.encode("utf-8"), self.user.encode("utf-8"))
        return hmac.compare_digest(digest, self.digest) and same_user


def main() -> None:
    """Ask for a password twice and print its hash for rpicluster_webserver_password_hash."""
    import getpass
    import sys

    first = getpass.getpass("dashboard password: ")
    if first != getpass.getpass("again: "):
        sys.exit("the two passwords differ")
    if len(first) < 8:
        sys.exit("use at least 8 characters")
    print(hash_password(first))


if __name__ == "__main__":
    main()
