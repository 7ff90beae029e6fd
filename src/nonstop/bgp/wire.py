"""BGP-4 message framing and the small messages (RFC 4271, 5492, 6793, 2918, 4724, 4760).

Sans-IO: bytes in, values out. Every malformed input raises :class:`NotifyError`, a
RemoteProtocolError carrying the NOTIFICATION code/subcode (and data) to send to the peer.

The :class:`Framer` cuts a byte stream into whole messages and counts the stream position of the
last message boundary in both directions: that count is what the non-stop handover needs.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from nonstop.common import RemoteProtocolError

MARKER = b"\xff" * 16
HEADER_LEN = 19
MAX_LEN = 4096
AS_TRANS = 23456


class MsgType(enum.IntEnum):
    OPEN = 1
    UPDATE = 2
    NOTIFICATION = 3
    KEEPALIVE = 4
    ROUTE_REFRESH = 5


class Afi(enum.IntEnum):
    IPV4 = 1
    IPV6 = 2


class Safi(enum.IntEnum):
    UNICAST = 1


IPV4_UNICAST = (1, 1)
IPV6_UNICAST = (2, 1)

# NOTIFICATION codes and the subcodes we send (RFC 4271 section 4.5, 6.x)
MSG_HEADER_ERROR, OPEN_ERROR, UPDATE_ERROR, HOLD_EXPIRED, FSM_ERROR, CEASE = 1, 2, 3, 4, 5, 6
# header subcodes
CONN_NOT_SYNC, BAD_LENGTH, BAD_TYPE = 1, 2, 3
# OPEN subcodes
UNSUPPORTED_VERSION, BAD_PEER_AS, BAD_BGP_ID, UNSUPPORTED_OPT_PARAM = 1, 2, 3, 4
UNACCEPTABLE_HOLD, UNSUPPORTED_CAPABILITY = 6, 7
# UPDATE subcodes
MALFORMED_ATTR_LIST, UNRECOGNIZED_WELL_KNOWN, MISSING_WELL_KNOWN, ATTR_FLAGS_ERROR = 1, 2, 3, 4
ATTR_LENGTH_ERROR, INVALID_ORIGIN, INVALID_NEXT_HOP, OPTIONAL_ATTR_ERROR = 5, 6, 8, 9
INVALID_NETWORK, MALFORMED_AS_PATH = 10, 11


class NotifyError(RemoteProtocolError):
    """The peer sent something that ends the session with NOTIFICATION (code, subcode, data)."""

    def __init__(self, code: int, subcode: int, reason: str, data: bytes = b"") -> None:
        super().__init__(f"{reason} (NOTIFICATION {code}/{subcode})", counter="notification_sent")
        self.code = code
        self.subcode = subcode
        self.data = data


# -- capabilities ------------------------------------------------------------------------------

CAP_MP, CAP_ROUTE_REFRESH, CAP_GRACEFUL_RESTART, CAP_AS4 = 1, 2, 64, 65
CAP_ENHANCED_RR, CAP_ROUTE_REFRESH_CISCO = 70, 128


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one side said in its OPEN. ``other`` keeps capabilities we do not interpret."""

    families: frozenset[tuple[int, int]] = frozenset()
    as4: int | None = None  # the 4-octet AS number, when the capability was present
    route_refresh: bool = False
    graceful_restart: tuple[int, int] | None = None  # (flags, restart time s), when present
    other: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        for afi, safi in sorted(self.families):
            out += struct.pack("!BBHBB", CAP_MP, 4, afi, 0, safi)
        if self.route_refresh:
            out += bytes([CAP_ROUTE_REFRESH, 0])
        if self.graceful_restart is not None:
            flags, time_s = self.graceful_restart
            # restart flags (4 bits) + time (12 bits); no per-family entries: we keep no
            # forwarding state across a restart the RFC 4724 way, we never restart the session.
            out += struct.pack("!BBH", CAP_GRACEFUL_RESTART, 2, (flags << 12) | (time_s & 0xFFF))
        if self.as4 is not None:
            out += struct.pack("!BBI", CAP_AS4, 4, self.as4)
        for code, value in self.other:
            out += bytes([code, len(value)]) + value
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Capabilities:
        fams: set[tuple[int, int]] = set()
        as4 = None
        rr = False
        gr = None
        other: list[tuple[int, bytes]] = []
        i = 0
        while i < len(data):
            if i + 2 > len(data):
                raise NotifyError(OPEN_ERROR, 0, "truncated capability")
            code, ln = data[i], data[i + 1]
            value = data[i + 2 : i + 2 + ln]
            if len(value) != ln:
                raise NotifyError(OPEN_ERROR, 0, "capability overruns its parameter")
            i += 2 + ln
            if code == CAP_MP:
                if ln != 4:
                    raise NotifyError(OPEN_ERROR, 0, "multiprotocol capability length != 4")
                afi, _, safi = struct.unpack("!HBB", value)
                fams.add((afi, safi))
            elif code in (CAP_ROUTE_REFRESH, CAP_ROUTE_REFRESH_CISCO):
                rr = True
            elif code == CAP_AS4:
                if ln != 4:
                    raise NotifyError(OPEN_ERROR, 0, "4-octet AS capability length != 4")
                (as4,) = struct.unpack("!I", value)
            elif code == CAP_GRACEFUL_RESTART:
                if ln < 2:
                    raise NotifyError(OPEN_ERROR, 0, "graceful restart capability too short")
                (w,) = struct.unpack("!H", value[:2])
                gr = (w >> 12, w & 0xFFF)
            else:
                other.append((code, bytes(value)))
        return cls(frozenset(fams), as4, rr, gr, tuple(other))


# -- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Open:
    asn: int  # the real AS (4-octet when the AS4 capability carries it)
    hold_time: int
    router_id: str
    caps: Capabilities = field(default_factory=Capabilities)
    version: int = 4


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class Notification:
    code: int
    subcode: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class RouteRefresh:
    afi: int
    safi: int
    subtype: int = 0


def _ip4(s: str) -> bytes:
    parts = s.split(".")
    return bytes(int(p) for p in parts)


def frame(kind: int, body: bytes = b"") -> bytes:
    n = HEADER_LEN + len(body)
    return MARKER + n.to_bytes(2, "big") + bytes([kind]) + body


def encode_open(m: Open) -> bytes:
    caps = m.caps.encode()
    params = b""
    if caps:
        if len(caps) > 253:
            params = bytes([255, 2]) + len(caps).to_bytes(2, "big") + caps  # unlikely here
        else:
            params = bytes([2, len(caps)]) + caps
    my_as = m.asn if m.asn <= 0xFFFF else AS_TRANS
    body = struct.pack("!BHH4sB", m.version, my_as, m.hold_time, _ip4(m.router_id), len(params))
    return frame(MsgType.OPEN, body + params)


def encode_keepalive() -> bytes:
    return frame(MsgType.KEEPALIVE)


KEEPALIVE_BYTES = encode_keepalive()


def encode_notification(m: Notification) -> bytes:
    return frame(MsgType.NOTIFICATION, bytes([m.code, m.subcode]) + m.data)


def encode_route_refresh(m: RouteRefresh) -> bytes:
    return frame(MsgType.ROUTE_REFRESH, struct.pack("!HBB", m.afi, m.subtype, m.safi))


def decode_open(body: bytes) -> Open:
    if len(body) < 10:
        raise NotifyError(MSG_HEADER_ERROR, BAD_LENGTH, "OPEN too short", len(body).to_bytes(2))
    version, my_as, hold, rid, plen = struct.unpack("!BHH4sB", body[:10])
    if version != 4:
        raise NotifyError(OPEN_ERROR, UNSUPPORTED_VERSION, f"BGP version {version}", b"\x00\x04")
    params = body[10:]
    if len(params) != plen:
        raise NotifyError(OPEN_ERROR, 0, "optional parameters length mismatch")
    if hold in (1, 2):
        raise NotifyError(OPEN_ERROR, UNACCEPTABLE_HOLD, f"hold time {hold}")
    if rid == b"\0\0\0\0":
        raise NotifyError(OPEN_ERROR, BAD_BGP_ID, "BGP identifier 0.0.0.0")
    capdata = bytearray()
    i = 0
    while i < len(params):
        if i + 2 > len(params):
            raise NotifyError(OPEN_ERROR, 0, "truncated optional parameter")
        ptype, ln = params[i], params[i + 1]
        value = params[i + 2 : i + 2 + ln]
        if len(value) != ln:
            raise NotifyError(OPEN_ERROR, 0, "optional parameter overruns")
        if ptype != 2:
            raise NotifyError(OPEN_ERROR, UNSUPPORTED_OPT_PARAM, f"optional parameter {ptype}")
        capdata += value
        i += 2 + ln
    caps = Capabilities.decode(bytes(capdata))
    asn = caps.as4 if caps.as4 is not None else my_as
    return Open(asn, hold, ".".join(str(b) for b in rid), caps, version)


def decode_notification(body: bytes) -> Notification:
    if len(body) < 2:
        raise NotifyError(MSG_HEADER_ERROR, BAD_LENGTH, "NOTIFICATION too short")
    return Notification(body[0], body[1], bytes(body[2:]))


def decode_route_refresh(body: bytes) -> RouteRefresh:
    if len(body) != 4:
        raise NotifyError(MSG_HEADER_ERROR, BAD_LENGTH, "ROUTE-REFRESH length != 23")
    afi, sub, safi = struct.unpack("!HBB", body)
    return RouteRefresh(afi, safi, sub)


_MIN_LEN = {1: 29, 2: 23, 3: 21, 4: 19, 5: 23}


class Framer:
    """Cuts a byte stream into BGP messages. ``position`` counts the stream bytes consumed up to
    the last whole message returned (a message boundary); ``buffered`` is what is left over."""

    __slots__ = ("_buf", "position")

    def __init__(self, position: int = 0) -> None:
        self._buf = bytearray()
        self.position = position

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> bytes:
        return bytes(self._buf)

    @property
    def fed(self) -> int:
        """Stream bytes fed so far (processed + buffered)."""
        return self.position + len(self._buf)

    def next_message(self) -> tuple[int, memoryview] | None:
        """(type, body) of the next whole message, or None until more bytes arrive."""
        buf = self._buf
        if len(buf) < HEADER_LEN:
            return None
        if buf[:16] != MARKER:
            raise NotifyError(MSG_HEADER_ERROR, CONN_NOT_SYNC, "marker is not all ones")
        n = (buf[16] << 8) | buf[17]
        kind = buf[18]
        if n < HEADER_LEN or n > MAX_LEN:
            raise NotifyError(MSG_HEADER_ERROR, BAD_LENGTH, f"length {n}", bytes(buf[16:18]))
        if kind not in _MIN_LEN:
            raise NotifyError(MSG_HEADER_ERROR, BAD_TYPE, f"message type {kind}", bytes([kind]))
        if n < _MIN_LEN[kind] or (kind == MsgType.KEEPALIVE and n != HEADER_LEN):
            raise NotifyError(MSG_HEADER_ERROR, BAD_LENGTH, f"type {kind} length {n}",
                              bytes(buf[16:18]))
        if len(buf) < n:
            return None
        body = bytes(buf[HEADER_LEN:n])
        del buf[:n]
        self.position += n
        return kind, memoryview(body)

    def messages(self) -> list[tuple[int, memoryview, int]]:
        """All whole messages buffered: (type, body, stream position after it)."""
        out = []
        while (m := self.next_message()) is not None:
            out.append((m[0], m[1], self.position))
        return out
