"""Session-sync wire format: fixed ``struct`` records, batched, sealed once per batch.

A frame (one datagram) is::

    b"NSSY" | version u8 | kind u8 | flags u8 | incarnation u64 | seq u64 | body | tag (16 bytes)

``kind`` BATCH (master -> backup): body is a run of records, each starting with its type byte and
laid out by a fixed ``struct`` (DATA and COMMIT carry a length and that many bytes). ``flags``
RESET: "forget everything, what follows is the whole state" (first batch of an incarnation and of
every resync). ``kind`` ACK (backup -> master): body is the master incarnation being confirmed and
the highest batch seq applied in order (0: none; flag NEED_RESYNC: the backup holds no base).

Why struct and not msgpack: every record but FULL has a fixed layout, so a fixed layout costs no
field tags or length prefixes; UPDATE is 25 bytes, a frame adds 39 (header 23 + tag 16), which is
27.4 bytes per UPDATE at batch 16 and 25.6 at 64. FULL is rare (open, resync) and also fixed (79
bytes, addresses always take 16 bytes, an IPv4 one is 4 bytes then 12 zeros).
FIN (10 bytes) says where a stream ends: the peer half-closed (RCV) or the service closed (SND).

Encoders trust their callers (records validate themselves when built: a bad value is our bug,
LocalProtocolError). ``decode`` trusts nothing and raises RemoteProtocolError only, whose
``.counter`` is malformed, bad_version or bad_auth.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass, fields

import msgspec

from nonstop.auth import TAG_LEN, seal, unseal
from nonstop.common import LocalProtocolError, RemoteProtocolError

MAGIC = b"NSSY"
VERSION = 2  # 2: the FIN record (a version-1 peer would count it as malformed)
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
STATE_MAX = 255  # bytes of an app's commit(state) blob

FLAG_RESET = 1 << 0  # BATCH: the receiver drops all it holds; this batch starts the whole state
FLAG_NEED_RESYNC = 1 << 0  # ACK: the receiver has no base (it started, or missed the RESET)

_HEADER = struct.Struct("!4sBBBQQ")  # magic, version, kind, flags, incarnation, seq
HEADER_LEN = _HEADER.size  # 23
OVERHEAD = HEADER_LEN + TAG_LEN  # 39 bytes per frame, shared by its records


class Kind(enum.IntEnum):
    BATCH = 1
    ACK = 2


class RecType(enum.IntEnum):
    FULL = 1
    UPDATE = 2
    DATA = 3
    COMMIT = 4
    CLOSE = 5
    FIN = 6


class Direction(enum.IntEnum):
    RCV = 0  # from the peer to the service: received, not yet committed by the service
    SND = 1  # from the service to the peer: written, not yet acknowledged by the peer


class CloseReason(enum.IntEnum):
    CLOSED = 1  # deliberate close (FIN exchange or the service closed it)
    RESET = 2  # RST sent or received


def _check_u(name: str, value: int, top: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
        raise LocalProtocolError(f"{name}={value!r} is outside 0..{top}")


def _check_stream_position(conn_id: int, direction: Direction, seq: int) -> None:
    """The fields DATA and FIN share: a connection, a direction, a sequence number."""
    _check_u("conn_id", conn_id, U32_MAX)
    _check_u("seq", seq, U32_MAX)
    if not isinstance(direction, Direction):
        raise LocalProtocolError(f"direction {direction!r} is not a Direction")


# FULL flags
OPT_SACK = 1 << 0
OPT_TIMESTAMPS = 1 << 1
OPT_WSCALE = 1 << 2


@dataclass(frozen=True, slots=True, kw_only=True)
class FullRecord:
    """Everything to re-create a connection (sent on open and on resync).

    ``snd_seq`` / ``rcv_seq``: the first sequence number of the send / receive stream this record
    positions (ISS+1 / IRS+1 on open). ``ts_val``: the socket's TCP_TIMESTAMP when captured.
    Window fields are those of TCP_REPAIR_WINDOW.
    """

    conn_id: int
    family: int  # 4 or 6
    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    snd_seq: int
    rcv_seq: int
    mss: int
    snd_wscale: int = 0
    rcv_wscale: int = 0
    wscale: bool = False
    sack: bool = False
    timestamps: bool = False
    ts_val: int = 0
    snd_wl1: int = 0
    snd_wnd: int = 0
    max_window: int = 0
    rcv_wnd: int = 0
    rcv_wup: int = 0

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise LocalProtocolError(f"family {self.family!r} is not 4 or 6")
        for name in ("local_addr", "peer_addr"):
            try:
                addr = ipaddress.ip_address(getattr(self, name))
            except ValueError as e:
                raise LocalProtocolError(f"{name}: {e}") from e
            if addr.version != self.family:
                raise LocalProtocolError(f"{name} {addr} is not IPv{self.family}")
            object.__setattr__(self, name, str(addr))
        for name in ("local_port", "peer_port", "mss"):
            _check_u(name, getattr(self, name), U16_MAX)
        for name in ("snd_wscale", "rcv_wscale"):
            _check_u(name, getattr(self, name), 14)
        for name in ("conn_id", "snd_seq", "rcv_seq", "ts_val", "snd_wl1", "snd_wnd",
                     "max_window", "rcv_wnd", "rcv_wup"):
            _check_u(name, getattr(self, name), U32_MAX)
        for name in ("wscale", "sack", "timestamps"):
            if not isinstance(getattr(self, name), bool):
                raise LocalProtocolError(f"{name} must be a bool")


    def with_ts(self, ts_val: int) -> FullRecord:
        """This record with another TCP timestamp: a copy without the checks of ``__init__``
        (``dataclasses.replace`` parsed both addresses again: 40% of adopting a restored
        connection, on a promotion's critical path)."""
        _check_u("ts_val", ts_val, U32_MAX)
        new = object.__new__(FullRecord)
        for name in _FULL_FIELDS:
            object.__setattr__(new, name, getattr(self, name))
        object.__setattr__(new, "ts_val", ts_val)
        return new


_FULL_FIELDS = tuple(f.name for f in fields(FullRecord))


# The records made per message (UPDATE, DATA, COMMIT, CLOSE, FIN) are msgspec Structs: built
# ~2.5x faster than frozen dataclasses (their checks run in __post_init__ as before).
class Update(msgspec.Struct, frozen=True, gc=False):
    """The socket's current positions and windows (TCP_REPAIR_WINDOW's snd_wnd and rcv_wnd)."""

    conn_id: int
    rcv_nxt: int
    snd_una: int
    snd_nxt: int
    snd_wnd: int
    rcv_wnd: int

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            _check_u(name, getattr(self, name), U32_MAX)


class Data(msgspec.Struct, frozen=True, gc=False):
    """Stream bytes starting at sequence number ``seq`` in ``direction``."""

    conn_id: int
    direction: Direction
    seq: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_stream_position(self.conn_id, self.direction, self.seq)
        if not isinstance(self.payload, bytes) or len(self.payload) > U16_MAX:
            raise LocalProtocolError(f"payload must be bytes of at most {U16_MAX}")


class Commit(msgspec.Struct, frozen=True, gc=False):
    """The service's checkpoint: read and write positions (sequence numbers) and its state blob."""

    conn_id: int
    rpos: int
    wpos: int
    state: bytes = b""

    def __post_init__(self) -> None:
        for name in ("conn_id", "rpos", "wpos"):
            _check_u(name, getattr(self, name), U32_MAX)
        if not isinstance(self.state, bytes) or len(self.state) > STATE_MAX:
            raise LocalProtocolError(f"commit state must be bytes of at most {STATE_MAX}")


class Close(msgspec.Struct, frozen=True, gc=False):
    conn_id: int
    reason: CloseReason

    def __post_init__(self) -> None:
        _check_u("conn_id", self.conn_id, U32_MAX)
        if not isinstance(self.reason, CloseReason):
            raise LocalProtocolError(f"reason {self.reason!r} is not a CloseReason")


class Fin(msgspec.Struct, frozen=True, gc=False):
    """The stream in ``direction`` ends at sequence number ``seq`` (its FIN takes that number):
    RCV the peer half-closed, SND the service closed. Sent once the bytes before it are."""

    conn_id: int
    direction: Direction
    seq: int

    def __post_init__(self) -> None:
        _check_stream_position(self.conn_id, self.direction, self.seq)


Record = FullRecord | Update | Data | Commit | Close | Fin


@dataclass(frozen=True, slots=True)
class Batch:
    incarnation: int
    seq: int
    records: tuple[Record, ...]
    reset: bool = False


@dataclass(frozen=True, slots=True)
class Ack:
    incarnation: int  # the backup's
    seq: int  # the backup's ack counter
    master_incarnation: int
    applied: int  # highest batch seq applied in order, 0: none
    need_resync: bool = False


_FULL = struct.Struct("!BIBBBBH16sH16sHIIIIIIII")
_UPDATE = struct.Struct("!BIIIIII")
_DATA = struct.Struct("!BIBIH")
_COMMIT = struct.Struct("!BIIIB")
_CLOSE = struct.Struct("!BIB")
_FIN = struct.Struct("!BIBI")
_ACK_BODY = struct.Struct("!QQ")
FULL_LEN, UPDATE_LEN, DATA_LEN, COMMIT_LEN, CLOSE_LEN, FIN_LEN = (
    s.size for s in (_FULL, _UPDATE, _DATA, _COMMIT, _CLOSE, _FIN)
)


def record_size(rec: Record) -> int:
    """Bytes ``rec`` takes in a batch."""
    if isinstance(rec, Update):
        return UPDATE_LEN
    if isinstance(rec, Data):
        return DATA_LEN + len(rec.payload)
    if isinstance(rec, Commit):
        return COMMIT_LEN + len(rec.state)
    if isinstance(rec, Close):
        return CLOSE_LEN
    if isinstance(rec, Fin):
        return FIN_LEN
    return FULL_LEN


def _pack_addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def encode_record(rec: Record) -> bytes:
    if isinstance(rec, Update):
        return _UPDATE.pack(RecType.UPDATE, rec.conn_id, rec.rcv_nxt, rec.snd_una, rec.snd_nxt,
                            rec.snd_wnd, rec.rcv_wnd)
    if isinstance(rec, Data):
        return _DATA.pack(RecType.DATA, rec.conn_id, rec.direction, rec.seq,
                          len(rec.payload)) + rec.payload
    if isinstance(rec, Commit):
        return _COMMIT.pack(RecType.COMMIT, rec.conn_id, rec.rpos, rec.wpos,
                            len(rec.state)) + rec.state
    if isinstance(rec, Close):
        return _CLOSE.pack(RecType.CLOSE, rec.conn_id, rec.reason)
    if isinstance(rec, Fin):
        return _FIN.pack(RecType.FIN, rec.conn_id, rec.direction, rec.seq)
    if isinstance(rec, FullRecord):
        opts = (OPT_SACK * rec.sack) | (OPT_TIMESTAMPS * rec.timestamps) | (OPT_WSCALE * rec.wscale)
        return _FULL.pack(
            RecType.FULL, rec.conn_id, rec.family, opts, rec.snd_wscale, rec.rcv_wscale, rec.mss,
            _pack_addr(rec.local_addr), rec.local_port, _pack_addr(rec.peer_addr), rec.peer_port,
            rec.snd_seq, rec.rcv_seq, rec.ts_val, rec.snd_wl1, rec.snd_wnd, rec.max_window,
            rec.rcv_wnd, rec.rcv_wup,
        )
    raise LocalProtocolError(f"{rec!r} is not a session record")


def encode_batch(key: bytes, batch: Batch) -> bytes:
    _check_u("incarnation", batch.incarnation, U64_MAX)
    _check_u("seq", batch.seq, U64_MAX)
    head = _HEADER.pack(MAGIC, VERSION, Kind.BATCH, FLAG_RESET if batch.reset else 0,
                        batch.incarnation, batch.seq)
    return seal(key, head + b"".join(encode_record(r) for r in batch.records))


def encode_ack(key: bytes, ack: Ack) -> bytes:
    for name in ("incarnation", "seq", "master_incarnation", "applied"):
        _check_u(name, getattr(ack, name), U64_MAX)
    head = _HEADER.pack(MAGIC, VERSION, Kind.ACK, FLAG_NEED_RESYNC if ack.need_resync else 0,
                        ack.incarnation, ack.seq)
    return seal(key, head + _ACK_BODY.pack(ack.master_incarnation, ack.applied))


def _addr(family: int, raw: bytes) -> str:
    if family == 4:
        if any(raw[4:]):
            raise ValueError("IPv4 address with non-zero padding")
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _decode_full(body: memoryview, off: int) -> FullRecord:
    (_, conn_id, family, opts, sws, rws, mss, la, lp, pa, pp, snd_seq, rcv_seq, ts_val,
     wl1, swnd, maxw, rwnd, rwup) = _FULL.unpack_from(body, off)
    if family not in (4, 6) or opts & ~(OPT_SACK | OPT_TIMESTAMPS | OPT_WSCALE):
        raise ValueError(f"FULL family {family} / options {opts:#x}")
    return FullRecord(
        conn_id=conn_id, family=family, local_addr=_addr(family, la), local_port=lp,
        peer_addr=_addr(family, pa), peer_port=pp, snd_seq=snd_seq, rcv_seq=rcv_seq, mss=mss,
        snd_wscale=sws, rcv_wscale=rws, wscale=bool(opts & OPT_WSCALE),
        sack=bool(opts & OPT_SACK), timestamps=bool(opts & OPT_TIMESTAMPS), ts_val=ts_val,
        snd_wl1=wl1, snd_wnd=swnd, max_window=maxw, rcv_wnd=rwnd, rcv_wup=rwup,
    )


def _decode_records(body: memoryview) -> tuple[Record, ...]:
    out: list[Record] = []
    off, end = 0, len(body)
    while off < end:
        t = body[off]
        if t == RecType.UPDATE:
            out.append(Update(*_UPDATE.unpack_from(body, off)[1:]))
            off += UPDATE_LEN
        elif t == RecType.DATA:
            _, conn_id, d, seq, n = _DATA.unpack_from(body, off)
            off += DATA_LEN
            if off + n > end:
                raise ValueError("DATA runs past the end of the batch")
            out.append(Data(conn_id, Direction(d), seq, bytes(body[off : off + n])))
            off += n
        elif t == RecType.COMMIT:
            _, conn_id, rpos, wpos, n = _COMMIT.unpack_from(body, off)
            off += COMMIT_LEN
            if off + n > end:
                raise ValueError("COMMIT state runs past the end of the batch")
            out.append(Commit(conn_id, rpos, wpos, bytes(body[off : off + n])))
            off += n
        elif t == RecType.CLOSE:
            _, conn_id, reason = _CLOSE.unpack_from(body, off)
            out.append(Close(conn_id, CloseReason(reason)))
            off += CLOSE_LEN
        elif t == RecType.FIN:
            _, conn_id, d, seq = _FIN.unpack_from(body, off)
            out.append(Fin(conn_id, Direction(d), seq))
            off += FIN_LEN
        elif t == RecType.FULL:
            out.append(_decode_full(body, off))
            off += FULL_LEN
        else:
            raise ValueError(f"unknown record type {t}")
    return tuple(out)


def decode(data: bytes, key: bytes) -> Batch | Ack:
    """Check and parse one frame. Raises RemoteProtocolError, and nothing else, if it is bad."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < OVERHEAD:
        raise RemoteProtocolError("session frame is too short", counter="malformed")
    data = bytes(data)
    if data[:4] != MAGIC:
        raise RemoteProtocolError("not a session frame (bad magic)", counter="malformed")
    if data[4] != VERSION:
        raise RemoteProtocolError(f"session version {data[4]} is not {VERSION}",
                                  counter="bad_version")
    payload = unseal(key, data)  # authenticate before parsing anything else
    _, _, kind, flags, incarnation, seq = _HEADER.unpack_from(payload)
    body = memoryview(payload)[HEADER_LEN:]
    try:
        if kind == Kind.BATCH and flags & ~FLAG_RESET == 0:
            return Batch(incarnation, seq, _decode_records(body), bool(flags & FLAG_RESET))
        if kind == Kind.ACK and flags & ~FLAG_NEED_RESYNC == 0 and len(body) == _ACK_BODY.size:
            m_inc, applied = _ACK_BODY.unpack(body)
            return Ack(incarnation, seq, m_inc, applied, bool(flags & FLAG_NEED_RESYNC))
    except (struct.error, ValueError, LocalProtocolError) as e:
        raise RemoteProtocolError(f"invalid session batch: {e}", counter="malformed") from e
    raise RemoteProtocolError(f"bad session frame kind {kind} / flags {flags:#x} / length",
                              counter="malformed")
