"""TCP-MD5 (RFC 2385) in the ACK clamp: a signed segment the clamp rewrites is signed again.

The digest is checked against a computation written here from the RFC's text (section 2.0);
tests/netns/test_bgp_takeover.py::test_md5_session_kept_across_takeovers has BIRD's kernel
accept the re-signed segments (no TCPMD5Failure at the peer)."""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import pytest

from nonstop.session.segment import (
    ACK,
    OPT_MD5,
    Md5KeyMissing,
    Segment,
    TcpOptions,
    build,
    checksum_ok,
    clamp_ack,
    md5_ok,
    md5_option,
    parse,
    set_checksum,
)

KEY = b"birdpw"
ADDR = {4: ("10.77.0.100", "10.77.0.1"), 6: ("fd77::100", "fd77::1")}


def rfc_digest(pkt: bytes | bytearray, family: int, key: bytes = KEY) -> bytes:
    """RFC 2385: pseudo-header (RFC 2460's for IPv6), TCP header without options and with a zero
    checksum, segment data, key."""
    ip_len = 20 if family == 4 else 40
    tcp = bytes(pkt[ip_len:])
    doff = (tcp[12] >> 4) * 4
    if family == 4:
        pseudo = bytes(pkt[12:20]) + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = bytes(pkt[8:40]) + struct.pack("!II", len(tcp), 6)
    return hashlib.md5(pseudo + tcp[:16] + b"\0\0" + tcp[18:20] + tcp[doff:] + key).digest()


def signed(family: int, ack: int, payload: bytes = b"",
           sack: tuple[tuple[int, int], ...] = ()) -> bytearray:
    """A segment with NOP NOP MD5 [NOP NOP SACK], signed by ``rfc_digest``."""
    src, dst = ADDR[family]
    opts = bytes([1, 1, OPT_MD5, 18]) + bytes(16)
    if sack:
        opts += bytes([1, 1, 5, 2 + 8 * len(sack)])
        opts += b"".join(struct.pack("!II", *b) for b in sack)
    tcp = struct.pack("!HHIIHHHH", 179, 40000, 1000, ack, ((20 + len(opts)) // 4) << 12 | ACK,
                      500, 0, 0) + opts + payload
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, s, d)
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, s, d)
    pkt = bytearray(ip + tcp)
    at = len(ip) + 24
    pkt[at : at + 16] = rfc_digest(pkt, family)
    set_checksum(pkt)
    return pkt


@pytest.mark.parametrize("family", [4, 6])
def test_the_digest_is_rfc_2385s(family: int) -> None:
    pkt = signed(family, 5000, b"\xff" * 19)
    assert md5_option(pkt) == (20 if family == 4 else 40) + 24
    assert md5_ok(pkt, KEY) and not md5_ok(pkt, b"other")
    pkt[-1] ^= 1  # the payload is covered
    assert not md5_ok(pkt, KEY)


@pytest.mark.parametrize("family", [4, 6])
def test_a_clamped_signed_segment_is_signed_again(family: int) -> None:
    pkt = signed(family, 5000, b"\x01" * 30, sack=((4500, 6000),))
    assert clamp_ack(pkt, 4000, KEY)
    seg = parse(pkt)
    assert seg.ack == 4000 and seg.options.sack == ()  # the block ended past 4000: gone
    at = md5_option(pkt)
    assert at is not None and bytes(pkt[at : at + 16]) == rfc_digest(pkt, family)
    assert checksum_ok(pkt)


@pytest.mark.parametrize("family", [4, 6])
def test_sack_trimmed_only_keeps_a_valid_signature(family: int) -> None:
    pkt = signed(family, 4000, b"", sack=((4500, 6000),))
    assert clamp_ack(pkt, 5000, KEY)
    assert parse(pkt).options.sack == ((4500, 5000),)
    assert md5_ok(pkt, KEY) and checksum_ok(pkt)


def test_a_signed_segment_without_a_key_is_refused_untouched() -> None:
    pkt = signed(4, 5000)
    before = bytes(pkt)
    with pytest.raises(Md5KeyMissing):
        clamp_ack(pkt, 4000)
    assert bytes(pkt) == before
    assert not clamp_ack(pkt, 6000)  # nothing to change: no key needed, nothing touched
    assert bytes(pkt) == before and md5_ok(pkt, KEY)


def test_an_unsigned_segment_needs_no_key() -> None:
    src, dst = ADDR[4]
    pkt = build(Segment(4, src, dst, 179, 40000, 1, 5000, ACK, 500, TcpOptions(), 20, 40, 0))
    assert clamp_ack(pkt, 4000, KEY) and parse(pkt).ack == 4000 and md5_option(pkt) is None
    assert checksum_ok(pkt)
