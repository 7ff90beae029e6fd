"""Authentication of control messages (heartbeats, witness, sync): HMAC-SHA256 and a replay window.

Every control datagram is ``payload || tag`` where ``tag`` is the first 16 bytes of
HMAC-SHA256(key, payload) (RFC 4868's HMAC-SHA-256-128 truncation). Freshness is the caller's
business: payloads carry (incarnation, sequence) and a :class:`ReplayWindow` per sender rejects
anything already seen or too old.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

from nonstop.common import ConfigError, RemoteProtocolError

TAG_LEN = 16
MIN_KEY_LEN = 16


def seal(key: bytes, payload: bytes) -> bytes:
    """Return ``payload`` followed by its authentication tag."""
    return payload + hmac.digest(key, payload, hashlib.sha256)[:TAG_LEN]


def unseal(key: bytes, data: bytes) -> bytes:
    """Check the tag of ``data`` and return the payload, or raise RemoteProtocolError."""
    if len(data) <= TAG_LEN:
        raise RemoteProtocolError(
            f"datagram of {len(data)} bytes is too short", counter="malformed"
        )
    payload, tag = data[:-TAG_LEN], data[-TAG_LEN:]
    want = hmac.digest(key, payload, hashlib.sha256)[:TAG_LEN]
    if not hmac.compare_digest(tag, want):
        raise RemoteProtocolError("authentication tag does not match", counter="bad_auth")
    return payload


def load_key(path: str, *, config_file: str = "<config>", field: str = "node.key_file") -> bytes:
    """Read a shared key file. Surrounding whitespace is stripped; the key must be >= 16 bytes."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(config_file, field, f"cannot read key file {path!r}: {e.strerror}") from e
    if len(key) < MIN_KEY_LEN:
        raise ConfigError(
            config_file, field, f"key file {path!r} holds {len(key)} bytes; at least {MIN_KEY_LEN}"
        )
    if st.st_mode & stat.S_IROTH:
        raise ConfigError(
            config_file, field, f"key file {path!r} is readable by everyone; chmod 600 it"
        )
    return key


class ReplayWindow:
    """Sliding window over (incarnation, sequence) of one sender, like IPsec's anti-replay window.

    ``check_and_update`` returns "new", "duplicate" (seen already: a k+1 copy or a replay) or
    "old" (older than the window or an older incarnation). Only "new" should be acted upon.
    A higher incarnation (the sender restarted) resets the window.
    """

    __slots__ = ("_bitmap", "_incarnation", "_top", "size")

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ValueError("replay window size must be >= 1")
        self.size = size
        self._incarnation = -1
        self._top = -1  # highest sequence accepted in this incarnation
        self._bitmap = 0  # bit i set: sequence (top - i) seen

    def check_and_update(self, incarnation: int, seq: int) -> str:
        if incarnation < self._incarnation:
            return "old"
        if incarnation > self._incarnation:
            self._incarnation, self._top, self._bitmap = incarnation, seq, 1
            return "new"
        if seq > self._top:
            shift = seq - self._top
            self._bitmap = ((self._bitmap << shift) | 1) & ((1 << self.size) - 1)
            self._top = seq
            return "new"
        offset = self._top - seq
        if offset >= self.size:
            return "old"
        if self._bitmap >> offset & 1:
            return "duplicate"
        self._bitmap |= 1 << offset
        return "new"

    @property
    def incarnation(self) -> int:
        return self._incarnation
