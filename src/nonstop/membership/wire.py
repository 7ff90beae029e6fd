"""Heartbeat wire format: ``b"NSHB" | version | msgpack array | HMAC-SHA256-128 tag``.

``encode_heartbeat`` trusts its caller (values are checked, a bad one is our bug and raises
LocalProtocolError). ``decode_heartbeat`` trusts nothing: any datagram either decodes to a
:class:`Heartbeat` or raises :class:`~nonstop.common.RemoteProtocolError` whose ``.counter`` names
what was wrong (malformed, bad_version, bad_auth).
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from nonstop.auth import TAG_LEN, seal, unseal
from nonstop.common import LocalProtocolError, RemoteProtocolError, Role

MAGIC = b"NSHB"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])

U8_MAX = 0xFF
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

# Bits of Heartbeat.flags. Unknown bits are carried and reported, never rejected.
FLAG_WITNESS_LEASE = 1 << 0  # the sender holds the witness lease
FLAG_HANDOVER_REQUEST = 1 << 1  # the sender asks the master to hand over (planned switch)
# bits 2-3 are the groups agent's (store.core FLAG_FAILSAFE, FLAG_STORE_OK)
FLAG_SYNC_READY = 1 << 4  # the sender's session worker listens for a master's sync (backup side)

IDENT_PATTERN = r"^[A-Za-z0-9_.-]+$"
IDENT_MAX = 32


class MsgType(enum.IntEnum):
    HEARTBEAT = 1
    LEAVE = 2  # graceful stop: the sender sends nothing more in this incarnation


U8 = Annotated[int, msgspec.Meta(ge=0, le=U8_MAX)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=U16_MAX)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgpack caps unsigned ints at 2**64 - 1
Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=IDENT_MAX, pattern=IDENT_PATTERN)]


class Heartbeat(msgspec.Struct, frozen=True, array_like=True):
    """One heartbeat (or LEAVE). Field order is the wire order: only ever append fields.

    A receiver of this version ignores array items past the last field it knows, so a field can be
    appended without bumping VERSION as long as old receivers may ignore it.
    """

    type: MsgType
    group: U16
    node_id: Ident
    channel: Ident  # the channel it was sent on; checked by the receiver
    incarnation: U64  # goes up at every restart of the sender
    seq: U64  # one counter per sender, same value on every channel in one tick
    role: Role
    priority: U8
    flags: U32
    sent_at: U64  # sender's monotonic clock in microseconds (informational)
    echo_seq: U64  # last seq received from the destination on this channel, 0 if none
    echo_delay_us: U32  # time from receiving echo_seq to sending this


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Heartbeat)
_MIN_LEN = len(HEADER) + 1 + TAG_LEN


def check_heartbeat(hb: Heartbeat) -> None:
    """Raise LocalProtocolError if a field of a heartbeat we are about to send is out of range."""
    ints = (
        ("group", hb.group, U16_MAX),
        ("incarnation", hb.incarnation, U64_MAX),
        ("seq", hb.seq, U64_MAX),
        ("priority", hb.priority, U8_MAX),
        ("flags", hb.flags, U32_MAX),
        ("sent_at", hb.sent_at, U64_MAX),
        ("echo_seq", hb.echo_seq, U64_MAX),
        ("echo_delay_us", hb.echo_delay_us, U32_MAX),
    )
    for name, value, top in ints:
        if not 0 <= value <= top:
            raise LocalProtocolError(f"heartbeat {name}={value} is outside 0..{top}")
    if not isinstance(hb.type, MsgType) or not isinstance(hb.role, Role):
        raise LocalProtocolError(f"heartbeat type {hb.type!r} / role {hb.role!r} is not an enum")
    for name, value in (("node_id", hb.node_id), ("channel", hb.channel)):
        if not 0 < len(value) <= IDENT_MAX:
            raise LocalProtocolError(f"heartbeat {name}={value!r} must be 1..{IDENT_MAX} chars")


def encode_heartbeat(hb: Heartbeat, key: bytes) -> bytes:
    """Serialize and seal a heartbeat: the bytes of one datagram."""
    check_heartbeat(hb)
    return seal(key, HEADER + _ENCODER.encode(hb))


def decode_heartbeat(data: bytes, key: bytes) -> Heartbeat:
    """Check and parse one datagram. Raises RemoteProtocolError (and nothing else) if it is bad."""
    if len(data) < _MIN_LEN:
        raise RemoteProtocolError(
            f"datagram of {len(data)} bytes is too short", counter="malformed"
        )
    if data[:4] != MAGIC:
        raise RemoteProtocolError("not a heartbeat (bad magic)", counter="malformed")
    if data[4] != VERSION:
        raise RemoteProtocolError(
            f"heartbeat version {data[4]} is not {VERSION}", counter="bad_version"
        )
    payload = unseal(key, data)  # authenticate before parsing anything else
    try:
        return _DECODER.decode(memoryview(payload)[len(HEADER) :])
    except msgspec.ValidationError as e:
        raise RemoteProtocolError(f"invalid heartbeat: {e}", counter="malformed") from e
    except msgspec.DecodeError as e:
        raise RemoteProtocolError(f"undecodable heartbeat: {e}", counter="malformed") from e
