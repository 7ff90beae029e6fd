"""UPDATE messages: decode into per-family withdrawn/announced keys plus one interned Attrs;
encode from keys and an Attrs, split to fit 4096 bytes."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from nonstop.bgp.attrs import (
    MP_REACH,
    MP_UNREACH,
    OPTIONAL,
    AttrDecoder,
    Attrs,
    _hdr,
    encode_attrs,
)
from nonstop.bgp.nlri import decode_prefixes, encode_prefix
from nonstop.bgp.wire import (
    IPV4_UNICAST,
    MALFORMED_ATTR_LIST,
    MAX_LEN,
    UPDATE_ERROR,
    MsgType,
    NotifyError,
    frame,
)
from nonstop.common import joined_chunks

Family = tuple[int, int]


@dataclass(slots=True)
class Update:
    """One decoded UPDATE. With ``withdraw_reason`` set (RFC 7606 treat-as-withdraw) ``attrs``
    is None and the announced prefixes must be handled as withdrawn."""

    withdrawn: dict[Family, list[int]] = field(default_factory=dict)
    announced: dict[Family, list[int]] = field(default_factory=dict)
    attrs: Attrs | None = None
    mp_next_hop: bytes = b""
    withdraw_reason: str | None = None
    discarded: tuple[str, ...] = ()

    @property
    def is_end_of_rib(self) -> bool:
        return not self.announced and not any(self.withdrawn.values()) and self.attrs is None


def decode_update(body: bytes | memoryview, dec: AttrDecoder) -> Update:
    b = bytes(body)
    n = len(b)
    if n < 4:
        raise NotifyError(UPDATE_ERROR, MALFORMED_ATTR_LIST, "UPDATE too short")
    wl = (b[0] << 8) | b[1]
    if 2 + wl + 2 > n:
        raise NotifyError(UPDATE_ERROR, MALFORMED_ATTR_LIST, "withdrawn routes length overruns")
    al = (b[2 + wl] << 8) | b[3 + wl]
    a0 = 4 + wl
    if a0 + al > n:
        raise NotifyError(UPDATE_ERROR, MALFORMED_ATTR_LIST, "path attribute length overruns")
    u = Update()
    if wl:
        u.withdrawn[IPV4_UNICAST] = decode_prefixes(b[2 : 2 + wl], 32)
    nlri = decode_prefixes(b[a0 + al :], 32) if a0 + al < n else []
    if al == 0:
        if nlri:  # RFC 7606 3d: missing well-known attributes -> treat-as-withdraw
            u.withdraw_reason = "NLRI without path attributes"
            u.withdrawn.setdefault(IPV4_UNICAST, []).extend(nlri)
        return u
    p = dec.parse(b[a0 : a0 + al])
    if p.mp_unreach is not None:
        fam = (p.mp_unreach.afi, p.mp_unreach.safi)
        u.withdrawn.setdefault(fam, []).extend(
            decode_prefixes(p.mp_unreach.withdrawn, 32 if fam[0] == 1 else 128))
    if nlri:
        u.announced[IPV4_UNICAST] = nlri
    if p.mp_reach is not None:
        fam = (p.mp_reach.afi, p.mp_reach.safi)
        keys = decode_prefixes(p.mp_reach.nlri, 32 if fam[0] == 1 else 128)
        if keys:
            u.announced.setdefault(fam, []).extend(keys)
        u.mp_next_hop = p.mp_reach.next_hop
    u.discarded = p.discarded
    reason = p.withdraw_reason
    if reason is None and nlri and not p.has_next_hop:
        reason = "missing well-known attribute NEXT_HOP"
    if reason is not None:
        if not u.announced:
            return u  # a pure withdrawal: its attributes do not matter
        u.withdraw_reason = reason
        if u.announced:
            for fam, keys in u.announced.items():
                u.withdrawn.setdefault(fam, []).extend(keys)
            u.announced = {}
        return u
    u.attrs = p.attrs
    return u


def _mp_reach(fam: Family, nh: bytes, nlri: bytes) -> bytes:
    return _hdr(OPTIONAL, MP_REACH, struct.pack("!HBB", fam[0], fam[1], len(nh)) + nh + b"\0"
                + nlri)


def _mp_unreach(fam: Family, withdrawn: bytes) -> bytes:
    return _hdr(OPTIONAL, MP_UNREACH, struct.pack("!HB", fam[0], fam[1]) + withdrawn)


def _chunks(keys: list[int], bits: int, room: int) -> list[bytes]:
    return joined_chunks((encode_prefix(k, bits) for k in keys), room)


def encode_update(
    fam: Family,
    *,
    announced: list[int] = (),  # type: ignore[assignment]
    attrs: Attrs | None = None,
    withdrawn: list[int] = (),  # type: ignore[assignment]
    as4: bool = True,
) -> list[bytes]:
    """Whole UPDATE messages (header included) carrying these withdrawals and announcements."""
    msgs: list[bytes] = []
    bits = 32 if fam[0] == 1 else 128
    if withdrawn:
        if fam == IPV4_UNICAST:
            for chunk in _chunks(list(withdrawn), bits, MAX_LEN - 23):
                msgs.append(frame(MsgType.UPDATE, struct.pack("!H", len(chunk)) + chunk + b"\0\0"))
        else:
            for chunk in _chunks(list(withdrawn), bits, MAX_LEN - 23 - 7):
                pa = _mp_unreach(fam, chunk)
                msgs.append(frame(MsgType.UPDATE, b"\0\0" + struct.pack("!H", len(pa)) + pa))
    if announced:
        if attrs is None:
            raise ValueError("announcements need attributes")
        if fam == IPV4_UNICAST:
            pa = encode_attrs(attrs, as4=as4, with_next_hop=True)
            for chunk in _chunks(list(announced), bits, MAX_LEN - 23 - len(pa)):
                msgs.append(frame(MsgType.UPDATE, b"\0\0" + struct.pack("!H", len(pa)) + pa
                                  + chunk))
        else:
            base = encode_attrs(attrs, as4=as4, with_next_hop=False)
            room = MAX_LEN - 23 - len(base) - 9 - len(attrs.next_hop)
            for chunk in _chunks(list(announced), bits, room):
                pa = _mp_reach(fam, attrs.next_hop, chunk) + base
                msgs.append(frame(MsgType.UPDATE, b"\0\0" + struct.pack("!H", len(pa)) + pa))
    return msgs


def end_of_rib(fam: Family) -> bytes:
    if fam == IPV4_UNICAST:
        return frame(MsgType.UPDATE, b"\0\0\0\0")
    pa = _mp_unreach(fam, b"")
    return frame(MsgType.UPDATE, b"\0\0" + struct.pack("!H", len(pa)) + pa)
