"""nonstop.session.segment: parse/build round trips, malformed input, the ACK clamp, seq math."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.common import RemoteProtocolError
from nonstop.session.segment import (
    ACK,
    OPT_NOP,
    PSH,
    SEQ_MOD,
    SYN,
    Segment,
    TcpOptions,
    build,
    checksum_ok,
    clamp_ack,
    encode_options,
    parse,
    seq_add,
    seq_le,
    seq_lt,
    tcp_checksum,
)

u32 = st.integers(0, SEQ_MOD - 1)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@st.composite
def options(draw: st.DrawFn) -> TcpOptions:
    o = TcpOptions(
        mss=draw(st.none() | st.integers(0, 0xFFFF)),
        wscale=draw(st.none() | st.integers(0, 14)),
        sack_permitted=draw(st.booleans()),
        timestamps=draw(st.none() | st.tuples(u32, u32)),
        sack=tuple(draw(st.lists(st.tuples(u32, u32), max_size=4))),
    )
    while True:  # too many options for one header: drop SACK blocks until they fit
        try:
            encode_options(o)
            break
        except ValueError:
            o = TcpOptions(o.mss, o.wscale, o.sack_permitted, o.sack[:-1], o.timestamps)
    return o


@st.composite
def segments(draw: st.DrawFn, flags: st.SearchStrategy[int] | None = None) -> tuple[Segment, bytes]:
    family = draw(st.sampled_from([4, 6]))
    addr = v4 if family == 4 else v6
    opts = draw(options())
    payload = draw(st.binary(max_size=300))
    ip_len = 20 if family == 4 else 40
    seg = Segment(
        family=family,
        src=draw(addr),
        dst=draw(addr),
        sport=draw(st.integers(0, 0xFFFF)),
        dport=draw(st.integers(0, 0xFFFF)),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(flags if flags is not None else st.integers(0, 0xFF)),
        window=draw(st.integers(0, 0xFFFF)),
        options=opts,
        tcp_offset=ip_len,
        payload_offset=ip_len + 20 + len(encode_options(opts)),
        payload_length=len(payload),
    )
    return seg, payload


def naive_checksum_ok(packet: bytes) -> bool:
    """RFC 1071 word by word, the slow obvious way, to check the fast one."""
    seg = parse(packet)
    tcp = bytes(packet[seg.tcp_offset : seg.payload_offset + seg.payload_length])
    if seg.family == 4:
        pseudo = bytes(packet[12:20]) + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = bytes(packet[8:40]) + struct.pack("!I3xB", len(tcp), 6)
    data = pseudo + tcp + b"\0" * (len(tcp) & 1)
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


# -- round trips and malformed input ---------------------------------------------------------------


@given(segments())
def test_parse_build_round_trip(sp: tuple[Segment, bytes]) -> None:
    seg, payload = sp
    packet = build(seg, payload)
    assert parse(packet) == seg
    assert packet[seg.payload_offset :] == payload
    assert checksum_ok(packet) and naive_checksum_ok(packet)


@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse(data)


@given(segments(), st.data())
def test_corrupted_packets_parse_or_raise_remote_error(
    sp: tuple[Segment, bytes], data: st.DataObject
) -> None:
    packet = build(*sp)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(packet) - 1))
        packet[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(packet)))
    for candidate in (packet, packet[:cut]):
        try:
            parse(candidate)
            clamp_ack(bytearray(candidate), data.draw(u32))
        except RemoteProtocolError:
            pass


def test_golden_syn_v4() -> None:
    # SYN from 10.77.0.12:40000 to 10.77.0.11:7000, options as Linux sends them.
    hexa = (
        "4500003c000040004006"
        "0000"
        "0a4d000c0a4d000b"  # IPv4, header checksum left 0
        "9c401b58"
        "00000064"
        "00000000"
        "a002faf0"
        "0000"
        "0000"  # TCP, doff 10, SYN
        "02040582"
        "0402"
        "080a0000000100000000"
        "01030307"  # MSS, SACK-perm, TS, NOP, WS
    )
    packet = bytearray(bytes.fromhex(hexa))
    packet[36:38] = tcp_checksum(packet).to_bytes(2, "big")
    seg = parse(packet)
    assert (seg.src, seg.sport, seg.dst, seg.dport) == ("10.77.0.12", 40000, "10.77.0.11", 7000)
    assert seg.seq == 100 and seg.flags == SYN and seg.window == 0xFAF0
    assert seg.options == TcpOptions(
        mss=1410, wscale=7, sack_permitted=True, timestamps=(1, 0), sack=()
    )
    assert seg.payload_length == 0 and naive_checksum_ok(packet)


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda p: p.__setitem__(0, 0x55), "IP version"),
        (lambda p: p.__setitem__(9, 17), "not TCP"),
        (lambda p: p.__setitem__(slice(2, 4), (400).to_bytes(2, "big")), "lengths"),
        (lambda p: p.__setitem__(6, 0x20), "fragment"),
        (lambda p: p.__setitem__(32, 0x40), "data offset"),
        (lambda p: p.__setitem__(slice(40, 42), bytes([2, 5])), "length 5"),
        (lambda p: p.__setitem__(slice(40, 42), bytes([9, 0])), "length 0"),
    ],
)
def test_malformed_named(mutate: object, why: str) -> None:
    seg = Segment(4, "10.77.0.1", "10.77.0.2", 1, 2, 3, 4, ACK, 5, TcpOptions(mss=1460), 20, 44, 0)
    packet = build(seg)
    mutate(packet)  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError, match=why) as info:
        parse(packet)
    assert info.value.counter == "malformed_segment"


def test_v6_extension_header_skipped() -> None:
    seg = Segment(6, "fd77::1", "fd77::2", 1, 2, 3, 4, ACK, 5, TcpOptions(), 40, 60, 3)
    packet = build(seg, b"abc")
    hbh = bytes([6, 0]) + bytes([1, 4, 0, 0, 0, 0])  # next = TCP, len 0 (8 bytes), PadN
    packet = packet[:40] + bytearray(hbh) + packet[40:]
    packet[6] = 0
    packet[4:6] = (len(packet) - 40).to_bytes(2, "big")
    got = parse(packet)
    assert (got.tcp_offset, got.payload_offset, got.payload_length) == (48, 68, 3)
    assert checksum_ok(packet)


# -- sequence arithmetic -------------------------------------------------------------------------


def test_seq_wraparound() -> None:
    top = SEQ_MOD - 1
    assert seq_lt(top, 0) and seq_lt(top - 10, 5) and not seq_lt(5, top - 10)
    assert seq_add(top, 1) == 0 and seq_add(top - 1, 5) == 3
    assert seq_le(7, 7) and seq_le(7 + SEQ_MOD, 7) and not seq_lt(7, 7)
    assert seq_lt(0, (1 << 31) - 1) and not seq_lt((1 << 31) - 1, 0)


@given(u32, st.integers(1, (1 << 31) - 1))
def test_seq_lt_is_distance(a: int, d: int) -> None:
    b = seq_add(a, d)
    assert seq_lt(a, b) and not seq_lt(b, a) and seq_le(a, b) and not seq_le(b, a)


# -- the clamp -----------------------------------------------------------------------------------


def _ack_seg(ack: int, sack: tuple[tuple[int, int], ...] = (), family: int = 4) -> Segment:
    opts = TcpOptions(timestamps=(11, 22), sack=sack)
    ip = 20 if family == 4 else 40
    src, dst = ("10.77.0.11", "10.77.0.12") if family == 4 else ("fd77::11", "fd77::12")
    return Segment(
        family,
        src,
        dst,
        7000,
        40000,
        1000,
        ack,
        ACK | PSH,
        512,
        opts,
        ip,
        ip + 20 + len(encode_options(opts)),
        5,
    )


@pytest.mark.parametrize("family", [4, 6])
def test_clamp_lowers_ack_across_wrap(family: int) -> None:
    ack = 100  # the peer's bytes up to 100 after the wrap; the backup holds up to 2**32 - 50
    packet = build(_ack_seg(ack, family=family), b"hello")
    assert clamp_ack(packet, SEQ_MOD - 50)
    got = parse(packet)
    assert got.ack == SEQ_MOD - 50 and got.seq == 1000 and got.options.timestamps == (11, 22)
    assert checksum_ok(packet) and naive_checksum_ok(packet)
    assert packet[got.payload_offset :] == b"hello"


def test_clamp_never_raises_ack_and_leaves_packet_alone() -> None:
    packet = build(_ack_seg(SEQ_MOD - 50), b"hello")
    before = bytes(packet)
    assert not clamp_ack(packet, 100)  # 100 is beyond 2**32 - 50: nothing to do
    assert bytes(packet) == before


def test_clamp_trims_and_removes_sack_blocks() -> None:
    blocks = ((5000, 6000), (3000, 4500), (2000, 2500))
    packet = build(_ack_seg(1500, blocks), b"hello")
    assert clamp_ack(packet, 4000)
    got = parse(packet)
    assert got.ack == 1500  # below the limit: kept
    assert got.options.sack == ((3000, 4000), (2000, 2500))
    assert got.payload_offset == _ack_seg(1500, blocks).payload_offset  # header size unchanged
    assert checksum_ok(packet)
    assert clamp_ack(packet, 1200)  # now everything goes: the ACK and both blocks
    got = parse(packet)
    assert got.ack == 1200 and got.options.sack == ()
    opt_bytes = packet[got.tcp_offset + 20 : got.payload_offset]
    assert opt_bytes.count(OPT_NOP) >= 20 and checksum_ok(packet)


def test_clamp_trims_a_sack_edge_at_the_antipode() -> None:
    """A right edge exactly 2**31 past the limit is neither above nor below it in sequence
    space: the clamp trims it (hypothesis found edge 2**31 + 1 against limit 1)."""
    packet = build(_ack_seg(0, ((10, 1 + (1 << 31)),)), b"hello")
    assert clamp_ack(packet, 1)
    assert parse(packet).options.sack == () and checksum_ok(packet)


def test_clamp_ignores_ack_without_ack_flag() -> None:
    seg = Segment(4, "10.77.0.11", "10.77.0.12", 1, 2, 3, 999, SYN, 5, TcpOptions(), 20, 40, 0)
    packet = build(seg)
    assert not clamp_ack(packet, 10) and parse(packet).ack == 999


def test_clamp_fixes_a_partial_checksum() -> None:
    """A local packet carries only the pseudo-header sum (CHECKSUM_PARTIAL): the clamp writes a
    full one."""
    packet = build(_ack_seg(5000), b"hello")
    packet[36:38] = b"\x12\x34"  # whatever CHECKSUM_PARTIAL left there
    assert not checksum_ok(packet)
    assert clamp_ack(packet, 4000)
    assert checksum_ok(packet) and naive_checksum_ok(packet)


@settings(max_examples=300)
@given(segments(flags=st.integers(0, 0xFF).map(lambda f: f | ACK)), u32)
def test_clamp_property(sp: tuple[Segment, bytes], limit: int) -> None:
    seg, payload = sp
    packet = build(seg, payload)
    changed = clamp_ack(packet, limit)
    got = parse(packet)
    assert checksum_ok(packet) and naive_checksum_ok(packet)
    assert seq_le(got.ack, seg.ack)  # never raised
    assert got.ack == (limit if seq_lt(limit, seg.ack) else seg.ack)
    assert all(seq_le(r, limit) for _, r in got.options.sack)
    assert packet[got.payload_offset :] == payload
    assert (got.seq, got.flags, got.window, got.options.timestamps) == (
        seg.seq,
        seg.flags,
        seg.window,
        seg.options.timestamps,
    )
    assert changed == (got != seg)
    assert not clamp_ack(packet, limit)  # idempotent


def test_clamp_64k_segment() -> None:
    import time

    seg = Segment(4, "10.77.0.11", "10.77.0.12", 1, 2, 3, 5000, ACK, 5, TcpOptions(), 20, 40, 65000)
    packet = build(seg, bytes(range(256)) * 253 + bytes(232))
    t0 = time.perf_counter()
    for _ in range(100):
        assert clamp_ack(packet, 4000 - _)
    per = (time.perf_counter() - t0) / 100
    assert checksum_ok(packet)
    print(f"clamp_ack on a 64 KB segment: {per * 1e6:.1f} us")
