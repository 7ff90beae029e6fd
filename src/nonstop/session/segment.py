"""TCP segments inside IPv4/IPv6 packets: parse, build, and clamp the ACK number (sans-IO).

The session manager sees whole IP packets from NFQUEUE. ``parse`` reads one into a ``Segment``;
``clamp_ack`` rewrites a packet in place so that it acknowledges nothing past a given sequence
number (the point the backup confirmed): the ACK number is lowered, SACK blocks beyond it are
trimmed or removed (their bytes become NOPs, the header length never changes), and the full TCP
checksum is recomputed. An incremental update would be wrong here: a locally generated packet
carries only the pseudo-header sum in its checksum field (CHECKSUM_PARTIAL), and the kernel marks
a mangled NFQUEUE packet CHECKSUM_NONE, so the checksum we write must be complete.

TCP-MD5 (RFC 2385): a segment signed by its sender carries an MD5 option (kind 19) whose digest
covers the pseudo-header, the fixed TCP header with the checksum zeroed (options excluded, so
trimming SACK blocks does not matter, lowering the ACK number does), the payload and the key.
``clamp_ack(..., md5_key=K)`` signs a changed segment again with K; a signed segment that must
change while no key is given raises ``Md5KeyMissing`` (the caller drops it: the peer would).

Sequence numbers compare modulo 2**32 (RFC 1982 style): ``seq_lt(a, b)`` is true when b is less
than 2**31 ahead of a. Malformed input raises ``RemoteProtocolError`` and nothing else.

The checksum uses the fact that 2**16 = 1 (mod 0xFFFF): the one's-complement sum of 16-bit
words is the big-endian integer of the bytes modulo 0xFFFF (0 standing for 0xFFFF when any byte
is non-zero), so one ``int.from_bytes`` and one ``%`` in C replace a Python loop over 32 k words.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import msgspec

from nonstop.common import RemoteProtocolError

SEQ_MOD = 1 << 32
_HALF = 1 << 31

# TCP flag bits
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = (1 << i for i in range(8))

# TCP option kinds
OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_SACK, OPT_TS = 0, 1, 2, 3, 4, 5, 8
OPT_MD5, MD5_LEN = 19, 18  # RFC 2385: kind, length 18, 16-byte digest (other lengths: not
# an MD5 option, as Linux's tcp_parse_md5sig_option reads them)
_FIXED_LEN = {OPT_MSS: 4, OPT_WSCALE: 3, OPT_SACK_PERM: 2, OPT_TS: 10}

IPPROTO_TCP = 6
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: skipped; others refused


def seq_lt(a: int, b: int) -> bool:
    """a < b in sequence space (mod 2**32)."""
    d = (b - a) % SEQ_MOD
    return 0 < d < _HALF


def seq_le(a: int, b: int) -> bool:
    return a % SEQ_MOD == b % SEQ_MOD or seq_lt(a, b)


def seq_add(a: int, n: int) -> int:
    return (a + n) % SEQ_MOD


# msgspec Structs, not frozen dataclasses: one Segment (and its TcpOptions) is built per queued
# packet, and a frozen dataclass took 2.7 us to build here, a Struct 0.1 us.
class TcpOptions(msgspec.Struct, frozen=True, gc=False):
    """The TCP options nonstop cares about; others are skipped when parsing."""

    mss: int | None = None
    wscale: int | None = None
    sack_permitted: bool = False
    sack: tuple[tuple[int, int], ...] = ()  # (left edge, right edge) blocks
    timestamps: tuple[int, int] | None = None  # (TSval, TSecr)


class Segment(msgspec.Struct, frozen=True, gc=False):
    """One TCP segment as parsed from an IP packet. Offsets count from the start of the packet."""

    family: int  # 4 or 6
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: TcpOptions
    tcp_offset: int  # start of the TCP header (= IP header length, extension headers included)
    payload_offset: int
    payload_length: int

    @property
    def four_tuple(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)


_ADDRS: dict[bytes, str] = {}  # packed address -> text (ipaddress's form): parse is per packet


def addr_str(packed: bytes) -> str:
    """The text form of a packed IPv4 (4 bytes) or IPv6 (16 bytes) address, as ``ipaddress``
    writes it; cached (a few thousand entries at most), since the hot path sees the same few."""
    s = _ADDRS.get(packed)
    if s is None:
        if len(_ADDRS) >= 4096:
            _ADDRS.clear()
        s = _ADDRS[packed] = str(ipaddress.ip_address(packed))
    return s


def _bad(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"tcp segment: {reason}", counter="malformed_segment")


def _ip_layer(buf: bytes | bytearray | memoryview) -> tuple[int, str, str, int, int]:
    """(family, src, dst, tcp offset, end of the IP packet)."""
    n = len(buf)
    if n < 1:
        raise _bad("empty packet")
    version = buf[0] >> 4
    if version == 4:
        if n < 20:
            raise _bad("short IPv4 header")
        ihl = (buf[0] & 0x0F) * 4
        total = int.from_bytes(buf[2:4], "big")
        if ihl < 20 or total < ihl or total > n:
            raise _bad(f"IPv4 lengths ihl={ihl} total={total} have={n}")
        if int.from_bytes(buf[6:8], "big") & 0x3FFF:
            raise _bad("IPv4 fragment")
        if buf[9] != IPPROTO_TCP:
            raise _bad(f"IPv4 protocol {buf[9]} is not TCP")
        return 4, addr_str(bytes(buf[12:16])), addr_str(bytes(buf[16:20])), ihl, total
    if version == 6:
        if n < 40:
            raise _bad("short IPv6 header")
        plen = int.from_bytes(buf[4:6], "big")
        end = 40 + plen
        if plen == 0 or end > n:
            raise _bad(f"IPv6 payload length {plen} (have {n - 40})")
        nxt, off = buf[6], 40
        while nxt in _V6_EXT:
            if off + 8 > end:
                raise _bad("short IPv6 extension header")
            nxt, off = buf[off], off + (buf[off + 1] + 1) * 8
        if nxt != IPPROTO_TCP:
            raise _bad(f"IPv6 next header {nxt} is not TCP")
        return 6, addr_str(bytes(buf[8:24])), addr_str(bytes(buf[24:40])), off, end
    raise _bad(f"IP version {version}")


def _walk_options(
    buf: bytes | bytearray | memoryview, start: int, end: int
) -> list[tuple[int, int, int]]:
    """(kind, offset, length) of each option other than NOP; stops at EOL."""
    out: list[tuple[int, int, int]] = []
    i = start
    while i < end:
        kind = buf[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise _bad(f"option {kind} has no length")
        length = buf[i + 1]
        if length < 2 or i + length > end:
            raise _bad(f"option {kind} length {length}")
        fixed = _FIXED_LEN.get(kind)
        if fixed is not None and length != fixed:
            raise _bad(f"option {kind} length {length} (want {fixed})")
        if kind == OPT_SACK and (length - 2) % 8:
            raise _bad(f"SACK option length {length}")
        out.append((kind, i, length))
        i += length
    return out


_NO_OPTIONS = TcpOptions()
_TS_ONLY = b"\x01\x01\x08\x0a"  # NOP NOP TS, Linux's layout of an established segment


def _options(buf: bytes | bytearray | memoryview, start: int, end: int) -> TcpOptions:
    if start == end:  # the two common layouts first: this runs for every queued segment
        return _NO_OPTIONS
    if end - start == 12 and buf[start : start + 4] == _TS_ONLY:
        return TcpOptions(timestamps=struct.unpack_from("!II", buf, start + 4))
    mss = wscale = ts = None
    sack_perm = False
    sack: tuple[tuple[int, int], ...] = ()
    for kind, i, length in _walk_options(buf, start, end):
        if kind == OPT_MSS:
            mss = int.from_bytes(buf[i + 2 : i + 4], "big")
        elif kind == OPT_WSCALE:
            wscale = buf[i + 2]
        elif kind == OPT_SACK_PERM:
            sack_perm = True
        elif kind == OPT_TS:
            ts = struct.unpack_from("!II", buf, i + 2)
        elif kind == OPT_SACK:
            sack = tuple(struct.unpack_from("!II", buf, j) for j in range(i + 2, i + length, 8))
    return TcpOptions(mss, wscale, sack_perm, sack, ts)


def parse(packet: bytes | bytearray | memoryview) -> Segment:
    """Parse an IPv4/IPv6 packet carrying one TCP segment. Raises RemoteProtocolError."""
    family, src, dst, t, end = _ip_layer(packet)
    if end - t < 20:
        raise _bad("short TCP header")
    sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", packet, t)
    doff = (off_flags >> 12) * 4
    if doff < 20 or t + doff > end:
        raise _bad(f"TCP data offset {doff}")
    opts = _options(packet, t + 20, t + doff)
    return Segment(
        family,
        src,
        dst,
        sport,
        dport,
        seq,
        ack,
        off_flags & 0xFF,
        window,
        opts,
        t,
        t + doff,
        end - t - doff,
    )


# -- checksum --------------------------------------------------------------------------------------


def _sum16(data: bytes | bytearray | memoryview) -> int:
    """One's-complement sum of ``data`` as 16-bit big-endian words, modulo 0xFFFF."""
    v = int.from_bytes(data, "big")
    if len(data) & 1:
        v <<= 8  # pad the odd byte with a zero
    return v % 0xFFFF


def _complement(total: int) -> int:
    """The checksum for a sum modulo 0xFFFF of data known to be non-zero (0 stands for 0xFFFF)."""
    return ~total & 0xFFFF if total else 0


def _pseudo_sum(packet: bytes | bytearray | memoryview, seg_family: int, tcp_len: int) -> int:
    if seg_family == 4:
        addrs = packet[12:20]
        return (_sum16(addrs) + IPPROTO_TCP + tcp_len) % 0xFFFF
    addrs = packet[8:40]
    return (_sum16(addrs) + IPPROTO_TCP + (tcp_len >> 16) + (tcp_len & 0xFFFF)) % 0xFFFF


def _tcp_span(packet: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    family, _, _, t, end = _ip_layer(packet)
    if end - t < 20:
        raise _bad("short TCP header")
    return family, t, end


def tcp_checksum(packet: bytes | bytearray | memoryview) -> int:
    """The correct TCP checksum for ``packet`` (its checksum field counted as zero)."""
    family, t, end = _tcp_span(packet)
    mv = memoryview(packet)
    total = _pseudo_sum(packet, family, end - t) + _sum16(mv[t : t + 16]) + _sum16(mv[t + 18 : end])
    return _complement(total % 0xFFFF)


def checksum_ok(packet: bytes | bytearray | memoryview) -> bool:
    family, t, end = _tcp_span(packet)
    return (_pseudo_sum(packet, family, end - t) + _sum16(memoryview(packet)[t:end])) % 0xFFFF == 0


def set_checksum(packet: bytearray) -> None:
    _, t, _ = _tcp_span(packet)
    packet[t + 16 : t + 18] = tcp_checksum(packet).to_bytes(2, "big")


# -- TCP-MD5 (RFC 2385) ----------------------------------------------------------------------------


class Md5KeyMissing(LookupError):
    """A segment signed with TCP-MD5 had to change and no key was given to sign it again."""


def md5_option(packet: bytes | bytearray | memoryview) -> int | None:
    """Offset of the 16-byte digest of the MD5 option in ``packet``, or None (not signed)."""
    _, t, end = _tcp_span(packet)
    doff = (packet[t + 12] >> 4) * 4
    if doff < 20 or t + doff > end:
        raise _bad(f"TCP data offset {doff}")
    for kind, i, length in _walk_options(packet, t + 20, t + doff):
        if kind == OPT_MD5 and length == MD5_LEN:
            return i + 2
    return None


def md5_digest(packet: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """The RFC 2385 digest of the segment in ``packet`` under ``key``: MD5 of the pseudo-header
    (addresses, protocol, TCP length; RFC 2460's form for IPv6, as Linux hashes it), the fixed
    20-byte TCP header with the checksum zeroed, the payload, then the key."""
    family, t, end = _tcp_span(packet)
    mv = memoryview(packet)
    doff = (packet[t + 12] >> 4) * 4
    tcp_len = end - t
    if family == 4:
        pseudo = bytes(mv[12:20]) + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
    else:
        pseudo = bytes(mv[8:40]) + struct.pack("!II", tcp_len, IPPROTO_TCP)
    h = hashlib.md5(pseudo, usedforsecurity=False)
    h.update(mv[t : t + 16])
    h.update(b"\0\0")
    h.update(mv[t + 18 : t + 20])
    h.update(mv[t + doff : end])
    h.update(key)
    return h.digest()


def md5_sign(packet: bytearray, key: bytes) -> bool:
    """Write the digest of ``packet`` under ``key`` into its MD5 option; False if it has none.
    The checksum is left alone (the caller recomputes it: it covers the option)."""
    at = md5_option(packet)
    if at is None:
        return False
    packet[at : at + 16] = md5_digest(packet, key)
    return True


def md5_ok(packet: bytes | bytearray | memoryview, key: bytes) -> bool:
    """True when ``packet`` carries an MD5 option whose digest is right under ``key``."""
    at = md5_option(packet)
    return at is not None and bytes(packet[at : at + 16]) == md5_digest(packet, key)


# -- the clamp -------------------------------------------------------------------------------------


def clamp_ack(packet: bytearray, max_ack: int, md5_key: bytes | None = None) -> bool:
    """Make ``packet`` acknowledge nothing past ``max_ack``; True if it changed anything.

    Lowers the ACK number (when the ACK flag is set and the ACK is beyond max_ack), trims SACK
    blocks whose right edge is not at or below max_ack (also one exactly 2**31 away, where
    sequence numbers have no order) and removes those left empty (their bytes become
    NOPs), signs it again when it carries a TCP-MD5 option (with ``md5_key``), then recomputes
    the full TCP checksum. A packet needing no change is left untouched, checksum included.
    Raises RemoteProtocolError for a malformed packet, Md5KeyMissing for a signed packet that
    must change when ``md5_key`` is None (untouched then).
    """
    max_ack %= SEQ_MOD
    seg = parse(packet)
    t = seg.tcp_offset
    lower = bool(seg.flags & ACK and seq_lt(max_ack, seg.ack))
    opts = _walk_options(packet, t + 20, seg.payload_offset)
    signed = any(kind == OPT_MD5 and n == MD5_LEN for kind, _, n in opts)
    if signed and md5_key is None and (lower or any(
            kind == OPT_SACK and any(not seq_le(r, max_ack) for _, r in _sack_blocks(packet, i, n))
            for kind, i, n in opts)):
        raise Md5KeyMissing(f"{seg.src}:{seg.sport} > {seg.dst}:{seg.dport} is signed")
    changed = False
    if lower:
        struct.pack_into("!I", packet, t + 8, max_ack)
        changed = True
    for kind, i, length in opts:
        if kind != OPT_SACK:
            continue
        blocks = _sack_blocks(packet, i, length)
        kept: list[tuple[int, int]] = []
        for left, right in blocks:
            # not provably at or below max_ack: also an edge exactly 2**31 away (no order there)
            if not seq_le(right, max_ack):
                right = max_ack
                if not seq_lt(left, right):
                    continue  # nothing left of this block
            kept.append((left, right))
        if kept == blocks:
            continue
        changed = True
        if kept:
            new = bytes([OPT_SACK, 2 + 8 * len(kept)])
            new += b"".join(struct.pack("!II", a, b) for a, b in kept)
        else:
            new = b""
        packet[i : i + length] = new + bytes([OPT_NOP]) * (length - len(new))
    if changed:
        if signed:
            assert md5_key is not None
            md5_sign(packet, md5_key)
        set_checksum(packet)
    return changed


def _sack_blocks(packet: bytes | bytearray | memoryview, i: int, length: int
                 ) -> list[tuple[int, int]]:
    return [struct.unpack_from("!II", packet, j) for j in range(i + 2, i + length, 8)]


# -- building (tests, and the probes the session manager sends) ------------------------------------


def encode_options(opts: TcpOptions) -> bytes:
    """Options in a fixed order, NOP-padded to a multiple of 4 bytes."""
    out = b""
    if opts.mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, opts.mss)
    if opts.sack_permitted:
        out += bytes([OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2])
    if opts.timestamps is not None:
        out += bytes([OPT_NOP, OPT_NOP]) + struct.pack("!BBII", OPT_TS, 10, *opts.timestamps)
    if opts.wscale is not None:
        out += bytes([OPT_NOP, OPT_WSCALE, 3, opts.wscale])
    if opts.sack:
        out += bytes([OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(opts.sack)])
        out += b"".join(struct.pack("!II", a, b) for a, b in opts.sack)
    if len(out) % 4:
        out += bytes([OPT_NOP]) * (4 - len(out) % 4)
    if len(out) > 40:
        raise ValueError(f"TCP options take {len(out)} bytes (at most 40)")
    return out


def build(seg: Segment, payload: bytes = b"") -> bytearray:
    """The IP packet for ``seg`` with a valid TCP checksum. The segment's offsets and payload
    length must match what is built (a plain IP header, ``encode_options`` layout)."""
    opts = encode_options(seg.options)
    ip_len = 20 if seg.family == 4 else 40
    want = (ip_len, ip_len + 20 + len(opts), len(payload))
    have = (seg.tcp_offset, seg.payload_offset, seg.payload_length)
    if want != have:
        raise ValueError(f"segment offsets {have} do not match the packet built {want}")
    tcp = (
        struct.pack(
            "!HHIIHHHH",
            seg.sport,
            seg.dport,
            seg.seq,
            seg.ack,
            ((20 + len(opts)) // 4) << 12 | seg.flags,
            seg.window,
            0,
            0,
        )
        + opts
        + payload
    )
    if seg.family == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            0,
            0x4000,
            64,
            IPPROTO_TCP,
            0,
            ipaddress.IPv4Address(seg.src).packed,
            ipaddress.IPv4Address(seg.dst).packed,
        )
        ip = ip[:10] + _complement(_sum16(ip)).to_bytes(2, "big") + ip[12:]
    else:
        ip = struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(tcp),
            IPPROTO_TCP,
            64,
            ipaddress.IPv6Address(seg.src).packed,
            ipaddress.IPv6Address(seg.dst).packed,
        )
    packet = bytearray(ip + tcp)
    set_checksum(packet)
    return packet
