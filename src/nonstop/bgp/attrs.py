"""Path attributes (RFC 4271 4.3/5, 1997, 8092, 6793, 4760) with RFC 7606 error handling.

:class:`Attrs` is one immutable attribute set. The session's :class:`AttrDecoder` parses the path
attributes of an UPDATE once, caches the result by the raw bytes (NLRI excluded) and interns equal
sets, so a million routes learnt with a few thousand distinct sets share a few thousand objects.

RFC 7606 outcome of a malformed attribute (:class:`Action`): TREAT_AS_WITHDRAW (the UPDATE's
routes are withdrawn, the session stays), ATTRIBUTE_DISCARD (the attribute is dropped, the routes
are kept), SESSION_RESET (:class:`NotifyError` raised with the code/subcode to send).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

from nonstop.bgp.wire import (
    ATTR_LENGTH_ERROR,
    MALFORMED_ATTR_LIST,
    OPTIONAL_ATTR_ERROR,
    UNRECOGNIZED_WELL_KNOWN,
    UPDATE_ERROR,
    NotifyError,
)

# attribute type codes
ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF, ATOMIC_AGGREGATE, AGGREGATOR = 1, 2, 3, 4, 5, 6, 7
COMMUNITIES, ORIGINATOR_ID, CLUSTER_LIST, MP_REACH, MP_UNREACH = 8, 9, 10, 14, 15
AS4_PATH, AS4_AGGREGATOR, LARGE_COMMUNITIES = 17, 18, 32

OPTIONAL, TRANSITIVE, PARTIAL, EXTENDED = 0x80, 0x40, 0x20, 0x10
AS_SET, AS_SEQUENCE = 1, 2
IGP, EGP, INCOMPLETE = 0, 1, 2

WELL_KNOWN = {ORIGIN, AS_PATH, NEXT_HOP, LOCAL_PREF, ATOMIC_AGGREGATE}
OPT_TRANSITIVE = {AGGREGATOR, COMMUNITIES, AS4_PATH, AS4_AGGREGATOR, LARGE_COMMUNITIES}
OPT_NON_TRANSITIVE = {MED, ORIGINATOR_ID, CLUSTER_LIST, MP_REACH, MP_UNREACH}


class Action(enum.Enum):
    TREAT_AS_WITHDRAW = "treat-as-withdraw"
    ATTRIBUTE_DISCARD = "attribute-discard"
    SESSION_RESET = "session-reset"


Segment = tuple[int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Attrs:
    """One path attribute set. ``next_hop`` is the raw next hop (4 bytes IPv4, 16 or 32 IPv6)."""

    origin: int = IGP
    as_path: tuple[Segment, ...] = ()
    next_hop: bytes = b""
    med: int | None = None
    local_pref: int | None = None
    atomic_aggregate: bool = False
    aggregator: tuple[int, bytes] | None = None
    communities: tuple[int, ...] = ()
    large_communities: tuple[tuple[int, int, int], ...] = ()
    other: tuple[tuple[int, int, bytes], ...] = ()  # (flags, type, value) passed on

    @property
    def as_path_len(self) -> int:
        return sum(len(a) if t == AS_SEQUENCE else 1 for t, a in self.as_path)

    @property
    def first_as(self) -> int | None:
        for t, a in self.as_path:
            if t == AS_SEQUENCE and a:
                return a[0]
            return None
        return None

    def prepend(self, asn: int) -> Attrs:
        path = self.as_path
        if path and path[0][0] == AS_SEQUENCE and len(path[0][1]) < 255:
            path = ((AS_SEQUENCE, (asn, *path[0][1])), *path[1:])
        else:
            path = ((AS_SEQUENCE, (asn,)), *path)
        return replace(self, as_path=path)


def _hdr(flags: int, kind: int, value: bytes) -> bytes:
    if len(value) > 255:
        return struct.pack("!BBH", flags | EXTENDED, kind, len(value)) + value
    return struct.pack("!BBB", flags & ~EXTENDED, kind, len(value)) + value


def encode_as_path(path: tuple[Segment, ...], as4: bool) -> bytes:
    out = bytearray()
    fmt = "!%dI" if as4 else "!%dH"
    for t, asns in path:
        for i in range(0, max(len(asns), 1), 255):
            chunk = asns[i : i + 255]
            if not as4:
                chunk = tuple(a if a <= 0xFFFF else 23456 for a in chunk)
            out += bytes([t, len(chunk)]) + struct.pack(fmt % len(chunk), *chunk)
    return bytes(out)


def encode_attrs(a: Attrs, *, as4: bool = True, with_next_hop: bool = True) -> bytes:
    """Path attributes in type order. NEXT_HOP only for IPv4 (``with_next_hop``); an IPv6 next hop
    goes in MP_REACH_NLRI, built by the UPDATE encoder."""
    out = [_hdr(TRANSITIVE, ORIGIN, bytes([a.origin])), _hdr(TRANSITIVE, AS_PATH,
                                                          encode_as_path(a.as_path, as4))]
    if with_next_hop and len(a.next_hop) == 4:
        out.append(_hdr(TRANSITIVE, NEXT_HOP, a.next_hop))
    if a.med is not None:
        out.append(_hdr(OPTIONAL, MED, a.med.to_bytes(4, "big")))
    if a.local_pref is not None:
        out.append(_hdr(TRANSITIVE, LOCAL_PREF, a.local_pref.to_bytes(4, "big")))
    if a.atomic_aggregate:
        out.append(_hdr(TRANSITIVE, ATOMIC_AGGREGATE, b""))
    if a.aggregator is not None:
        asn, addr = a.aggregator
        w = 4 if as4 else 2
        v = (asn if as4 or asn <= 0xFFFF else 23456).to_bytes(w, "big") + addr
        out.append(_hdr(OPTIONAL | TRANSITIVE, AGGREGATOR, v))
    if a.communities:
        v = struct.pack(f"!{len(a.communities)}I", *a.communities)
        out.append(_hdr(OPTIONAL | TRANSITIVE, COMMUNITIES, v))
    if not as4 and any(x > 0xFFFF for _, s in a.as_path for x in s):
        out.append(_hdr(OPTIONAL | TRANSITIVE, AS4_PATH, encode_as_path(a.as_path, True)))
    if a.large_communities:
        v = b"".join(struct.pack("!III", *c) for c in a.large_communities)
        out.append(_hdr(OPTIONAL | TRANSITIVE, LARGE_COMMUNITIES, v))
    for flags, kind, value in a.other:
        out.append(_hdr(flags, kind, value))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class MpReach:
    afi: int
    safi: int
    next_hop: bytes
    nlri: bytes


@dataclass(frozen=True, slots=True)
class MpUnreach:
    afi: int
    safi: int
    withdrawn: bytes


@dataclass(frozen=True, slots=True)
class Parsed:
    """What the path attributes of one UPDATE say (the MP NLRI kept raw, decoded later)."""

    attrs: Attrs | None  # None: treat-as-withdraw
    withdraw_reason: str | None
    discarded: tuple[str, ...]
    mp_reach: MpReach | None
    mp_unreach: MpUnreach | None
    has_next_hop: bool


def _flags_ok(flags: int, kind: int) -> bool:
    f = flags & (OPTIONAL | TRANSITIVE)
    if kind in WELL_KNOWN:
        return f == TRANSITIVE
    if kind in OPT_TRANSITIVE:
        return f == OPTIONAL | TRANSITIVE
    if kind in OPT_NON_TRANSITIVE:
        return f == OPTIONAL
    return True


def _as_path(v: bytes, as4: bool) -> tuple[Segment, ...] | None:
    """Segments, or None when malformed (RFC 4271 6.3 / 7606 7.2)."""
    w = 4 if as4 else 2
    fmt = "!%dI" if as4 else "!%dH"
    segs: list[Segment] = []
    i, n = 0, len(v)
    while i < n:
        if i + 2 > n:
            return None
        t, cnt = v[i], v[i + 1]
        if t not in (AS_SET, AS_SEQUENCE) or cnt == 0:
            return None
        j = i + 2 + cnt * w
        if j > n:
            return None
        segs.append((t, struct.unpack(fmt % cnt, v[i + 2 : j])))
        i = j
    return tuple(segs)


def _merge_as4(path: tuple[Segment, ...], as4_path: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """RFC 6793 4.2.3: keep the leading ASes of AS_PATH that AS4_PATH lacks."""
    n, n4 = sum(len(s) if t == AS_SEQUENCE else 1 for t, s in path), sum(
        len(s) if t == AS_SEQUENCE else 1 for t, s in as4_path)
    if n < n4:
        return path
    keep = n - n4
    head: list[Segment] = []
    for t, s in path:
        if keep <= 0:
            break
        if t == AS_SEQUENCE:
            head.append((t, s[:keep]))
            keep -= len(s[:keep])
        else:
            head.append((t, s))
            keep -= 1
    return (*head, *as4_path)


class AttrDecoder:
    """Parses path attributes for one session (2- or 4-octet AS, eBGP or iBGP), cached and
    interned. ``cache`` maps the raw attribute bytes (MP NLRI left out) to the parse result."""

    MAX_CACHE = 200_000

    def __init__(self, *, as4: bool = True, ebgp: bool = True) -> None:
        self.as4 = as4
        self.ebgp = ebgp
        self.cache: dict[bytes, tuple[Attrs | None, str | None, tuple[str, ...], bool]] = {}
        self.interned: dict[Attrs, Attrs] = {}

    def intern(self, a: Attrs) -> Attrs:
        return self.interned.setdefault(a, a)

    def parse(self, data: bytes) -> Parsed:
        """Raises NotifyError for the session-reset cases of RFC 7606."""
        mp_reach = mp_unreach = None
        key_parts: list[bytes] = []
        spans: list[tuple[int, int, bytes]] = []
        seen: set[int] = set()
        overrun = False
        i, n = 0, len(data)
        while i < n:
            if i + 3 > n:
                overrun = True
                break
            flags, kind = data[i], data[i + 1]
            if flags & EXTENDED:
                if i + 4 > n:
                    overrun = True
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                start = i + 4
            else:
                ln = data[i + 2]
                start = i + 3
            end = start + ln
            if end > n:
                overrun = True
                break
            value = data[start:end]
            if kind in (MP_REACH, MP_UNREACH):
                if kind in seen:
                    raise NotifyError(UPDATE_ERROR, MALFORMED_ATTR_LIST, "MP attribute repeated")
                if flags & (OPTIONAL | TRANSITIVE) != OPTIONAL:
                    raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, "MP attribute flags")
                if kind == MP_REACH:
                    mp_reach = _mp_reach(value)
                    key_parts.append(b"\x0e" + mp_reach.next_hop)
                else:
                    mp_unreach = _mp_unreach(value)
                seen.add(kind)
            else:
                if kind not in seen:  # RFC 7606 3g: repeats are discarded
                    seen.add(kind)
                    spans.append((flags, kind, value))
                key_parts.append(data[i:end])
            i = end
        raw = b"".join(key_parts)
        hit = self.cache.get(raw)
        if hit is None:
            hit = self._decode(spans, overrun)
            if len(self.cache) >= self.MAX_CACHE:
                self.cache.clear()
            self.cache[raw] = hit
        attrs, reason, discarded, has_nh = hit
        return Parsed(attrs, reason, discarded, mp_reach, mp_unreach, has_nh)

    def _decode(
        self, spans: list[tuple[int, int, bytes]], overrun: bool
    ) -> tuple[Attrs | None, str | None, tuple[str, ...], bool]:
        f: dict[str, object] = {}
        other: list[tuple[int, int, bytes]] = []
        discarded: list[str] = []
        withdraw: str | None = "attribute length overruns the path attributes" if overrun else None
        as4_path = None
        as4_agg = None
        has_nh = False

        def taw(why: str) -> None:
            nonlocal withdraw
            withdraw = withdraw or why

        for flags, kind, v in spans:
            if not _flags_ok(flags, kind):
                taw(f"attribute {kind}: flags {flags:#x} conflict")
                continue
            ln = len(v)
            if kind == ORIGIN:
                if ln != 1 or v[0] > 2:
                    taw("malformed ORIGIN")
                else:
                    f["origin"] = v[0]
            elif kind == AS_PATH:
                p = _as_path(v, self.as4)
                if p is None:
                    taw("malformed AS_PATH")
                else:
                    f["as_path"] = p
            elif kind == NEXT_HOP:
                if ln != 4:
                    taw("NEXT_HOP length != 4")
                else:
                    f["next_hop"] = bytes(v)
                    has_nh = True
            elif kind == MED:
                if ln != 4:
                    taw("MED length != 4")
                else:
                    f["med"] = int.from_bytes(v, "big")
            elif kind == LOCAL_PREF:
                if self.ebgp:
                    discarded.append("LOCAL_PREF from an external peer")
                elif ln != 4:
                    taw("LOCAL_PREF length != 4")
                else:
                    f["local_pref"] = int.from_bytes(v, "big")
            elif kind == ATOMIC_AGGREGATE:
                if ln != 0:
                    discarded.append("ATOMIC_AGGREGATE length != 0")
                else:
                    f["atomic_aggregate"] = True
            elif kind == AGGREGATOR:
                w = 4 if self.as4 else 2
                if ln != w + 4:
                    discarded.append(f"AGGREGATOR length != {w + 4}")
                else:
                    f["aggregator"] = (int.from_bytes(v[:w], "big"), bytes(v[w:]))
            elif kind == COMMUNITIES:
                if ln == 0 or ln % 4:
                    taw("COMMUNITIES length not a non-zero multiple of 4")
                else:
                    f["communities"] = struct.unpack(f"!{ln // 4}I", v)
            elif kind == LARGE_COMMUNITIES:
                if ln == 0 or ln % 12:
                    taw("LARGE_COMMUNITIES length not a non-zero multiple of 12")
                else:
                    vals = struct.unpack(f"!{ln // 4}I", v)
                    f["large_communities"] = tuple(
                        (vals[k], vals[k + 1], vals[k + 2]) for k in range(0, len(vals), 3)
                    )
            elif kind == ORIGINATOR_ID:
                if ln != 4:
                    taw("ORIGINATOR_ID length != 4")
            elif kind == CLUSTER_LIST:
                if ln == 0 or ln % 4:
                    taw("CLUSTER_LIST length not a non-zero multiple of 4")
            elif kind == AS4_PATH:
                if not self.as4:
                    as4_path = _as_path(v, True)
                    if as4_path is None:
                        discarded.append("malformed AS4_PATH")
                else:
                    discarded.append("AS4_PATH on a 4-octet session")
            elif kind == AS4_AGGREGATOR:
                if not self.as4:
                    if ln != 8:
                        discarded.append("AS4_AGGREGATOR length != 8")
                    else:
                        as4_agg = (int.from_bytes(v[:4], "big"), bytes(v[4:]))
            elif not flags & OPTIONAL:
                raise NotifyError(
                    UPDATE_ERROR, UNRECOGNIZED_WELL_KNOWN, f"unrecognized well-known {kind}",
                    _hdr(flags, kind, bytes(v)),
                )
            elif flags & TRANSITIVE:
                other.append((flags | PARTIAL, kind, bytes(v)))
            # unknown optional non-transitive: quietly ignored (RFC 4271 5)
        if withdraw is None and ("origin" not in f or "as_path" not in f):
            withdraw = "missing well-known attribute " + ("ORIGIN" if "origin" not in f
                                                          else "AS_PATH")
        if withdraw is not None:
            return None, withdraw, tuple(discarded), has_nh
        if as4_path is not None:
            f["as_path"] = _merge_as4(f["as_path"], as4_path)  # type: ignore[arg-type]
        if as4_agg is not None and f.get("aggregator", (0,))[0] == 23456:  # type: ignore[index]
            f["aggregator"] = as4_agg
        if other:
            f["other"] = tuple(other)
        return self.intern(Attrs(**f)), None, tuple(discarded), has_nh  # type: ignore[arg-type]


def _mp_reach(v: bytes) -> MpReach:
    if len(v) < 5:
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, "MP_REACH_NLRI too short")
    afi, safi, nhl = struct.unpack("!HBB", v[:4])
    if 4 + nhl + 1 > len(v):
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, "MP_REACH_NLRI next hop overruns")
    if (afi, safi) not in ((1, 1), (2, 1)):
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, f"MP_REACH AFI/SAFI {afi}/{safi}")
    if (afi == 1 and nhl != 4) or (afi == 2 and nhl not in (16, 32)):
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, f"MP_REACH next hop length {nhl}")
    return MpReach(afi, safi, bytes(v[4 : 4 + nhl]), bytes(v[5 + nhl :]))


def _mp_unreach(v: bytes) -> MpUnreach:
    if len(v) < 3:
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, "MP_UNREACH_NLRI too short")
    afi, safi = struct.unpack("!HB", v[:3])
    if (afi, safi) not in ((1, 1), (2, 1)):
        raise NotifyError(UPDATE_ERROR, OPTIONAL_ATTR_ERROR, f"MP_UNREACH AFI/SAFI {afi}/{safi}")
    return MpUnreach(afi, safi, bytes(v[3:]))


__all__ = [
    "ATTR_LENGTH_ERROR",
    "Action",
    "AttrDecoder",
    "Attrs",
    "MpReach",
    "MpUnreach",
    "Parsed",
    "encode_attrs",
]
