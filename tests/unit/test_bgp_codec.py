"""BGP codec: round trips (Hypothesis), RFC 7606 outcomes per attribute, every truncation of a
valid UPDATE is a protocol error, random bytes never raise anything else."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.bgp.attrs import (
    AS_SEQUENCE,
    AS_SET,
    AttrDecoder,
    Attrs,
    _hdr,
    encode_attrs,
)
from nonstop.bgp.nlri import decode_prefixes, encode_prefixes, key_of, prefix_of
from nonstop.bgp.update import decode_update, encode_update
from nonstop.bgp.wire import (
    Capabilities,
    Framer,
    Notification,
    NotifyError,
    Open,
    RouteRefresh,
    decode_notification,
    decode_open,
    decode_route_refresh,
    encode_notification,
    encode_open,
    encode_route_refresh,
)
from nonstop.common import RemoteProtocolError

V4 = (1, 1)
V6 = (2, 1)


def body(msg: bytes) -> bytes:
    return msg[19:]


# -- strategies -----------------------------------------------------------------------------------

asn = st.integers(1, 0xFFFFFFFF)
segments = st.lists(
    st.tuples(st.sampled_from([AS_SET, AS_SEQUENCE]),
              st.lists(asn, min_size=1, max_size=10).map(tuple)),
    max_size=4,
).map(tuple)
attrs_v4 = st.builds(
    Attrs,
    origin=st.integers(0, 2),
    as_path=segments,
    next_hop=st.binary(min_size=4, max_size=4),
    med=st.none() | st.integers(0, 0xFFFFFFFF),
    local_pref=st.none() | st.integers(0, 0xFFFFFFFF),
    atomic_aggregate=st.booleans(),
    aggregator=st.none() | st.tuples(asn, st.binary(min_size=4, max_size=4)),
    communities=st.lists(st.integers(0, 0xFFFFFFFF), max_size=20).map(tuple),
    large_communities=st.lists(st.tuples(asn, asn, asn), max_size=5).map(tuple),
    other=st.lists(st.tuples(st.just(0xE0), st.integers(200, 250), st.binary(max_size=40)),
                   max_size=2, unique_by=lambda t: t[1]).map(lambda x: tuple(sorted(
                       x, key=lambda t: t[1]))),
)


def key4(draw_len: int, addr: int) -> int:
    mask = ((1 << draw_len) - 1) << (32 - draw_len) if draw_len else 0
    return ((addr & mask) << 8) | draw_len


prefixes4 = st.lists(st.builds(key4, st.integers(0, 32), st.integers(0, 2**32 - 1)),
                     max_size=300, unique=True)
prefixes6 = st.lists(st.builds(
    lambda n, a: (((a >> (128 - n)) << (128 - n) if n else 0) << 8) | n,
    st.integers(0, 128), st.integers(0, 2**128 - 1)), max_size=100, unique=True)


@settings(max_examples=150, deadline=None)
@given(attrs_v4, prefixes4, prefixes4)
def test_update_roundtrip_v4(a: Attrs, ann: list[int], wd: list[int]) -> None:
    msgs = encode_update(V4, announced=ann, attrs=a, withdrawn=wd)
    got_ann: list[int] = []
    got_wd: list[int] = []
    dec = AttrDecoder(ebgp=False)
    f = Framer()
    f.feed(b"".join(msgs))
    for _, b, _ in f.messages():
        u = decode_update(b, dec)
        assert u.withdraw_reason is None
        got_wd += u.withdrawn.get(V4, [])
        if u.announced:
            assert u.attrs == a
            got_ann += u.announced[V4]
    assert got_ann == ann and got_wd == wd


@settings(max_examples=80, deadline=None)
@given(attrs_v4, prefixes6, prefixes6, st.binary(min_size=16, max_size=16))
def test_update_roundtrip_v6(a: Attrs, ann: list[int], wd: list[int], nh: bytes) -> None:
    a6 = Attrs(**{**{s: getattr(a, s) for s in Attrs.__slots__}, "next_hop": nh})
    msgs = encode_update(V6, announced=ann, attrs=a6, withdrawn=wd)
    dec = AttrDecoder(ebgp=False)
    got_ann: list[int] = []
    got_wd: list[int] = []
    for m in msgs:
        u = decode_update(body(m), dec)
        got_wd += u.withdrawn.get(V6, [])
        if u.announced:
            assert u.mp_next_hop == nh
            got_ann += u.announced[V6]
    assert got_ann == ann and got_wd == wd


@given(st.builds(Open, asn, st.integers(3, 65535), st.sampled_from(["10.77.0.1", "1.2.3.4"]),
                 st.builds(Capabilities, st.frozensets(st.sampled_from([V4, V6])),
                           st.none() | asn, st.booleans(),
                           st.none() | st.tuples(st.integers(0, 15), st.integers(0, 4095)))))
def test_open_roundtrip(o: Open) -> None:
    if o.caps.as4 is not None:  # the capability carries the same AS as the OPEN
        o = dataclasses.replace(o, caps=dataclasses.replace(o.caps, as4=o.asn))
    got = decode_open(body(encode_open(o)))
    if o.caps.as4 is None:  # without the capability, a 4-octet AS is sent as AS_TRANS
        assert got.asn == (o.asn if o.asn <= 0xFFFF else 23456)
    else:
        assert got == o


def test_small_messages_roundtrip() -> None:
    n = Notification(6, 2, b"bye")
    assert decode_notification(body(encode_notification(n))) == n
    r = RouteRefresh(2, 1)
    assert decode_route_refresh(body(encode_route_refresh(r))) == r


def test_prefix_keys() -> None:
    assert key_of("10.77.1.0/24") == (4, (0x0A4D0100 << 8) | 24)
    assert prefix_of(key_of("fd77::/16")[1], 6) == "fd77::/16"
    assert decode_prefixes(encode_prefixes([key_of("0.0.0.0/0")[1]])) == [0]
    with pytest.raises(NotifyError):
        decode_prefixes(b"\x21\x0a\x00\x00\x00\x00")  # /33


# -- truncation and random input ------------------------------------------------------------------

FULL = Attrs(origin=0, as_path=((AS_SEQUENCE, (65001, 65002)), (AS_SET, (1, 2))),
             next_hop=b"\x0a\x4d\x00\x01", med=5, local_pref=100, atomic_aggregate=True,
             aggregator=(65001, b"\x0a\x4d\x00\x01"), communities=(1, 2),
             large_communities=((1, 2, 3),), other=((0xE0, 99, b"xyz"),))


def _full_update(fam: tuple[int, int]) -> tuple[bytes, int]:
    """One UPDATE with withdrawals, every attribute and two prefixes; and where its NLRI field
    starts in the body (len(body) when the prefixes are in MP_REACH_NLRI)."""
    if fam == V4:
        keys = [key_of("10.77.1.0/24")[1], key_of("10.77.2.128/25")[1]]
        wd = encode_prefixes(keys[:1])
        pa = encode_attrs(FULL)
        b = len(wd).to_bytes(2, "big") + wd + len(pa).to_bytes(2, "big") + pa
        return b + encode_prefixes(keys), len(b)
    a = Attrs(**{**{s: getattr(FULL, s) for s in Attrs.__slots__},
                 "next_hop": b"\xfd\x77" + b"\0" * 13 + b"\1"})
    keys = [key_of("fd77:1::/64")[1], key_of("fd77:2::/127")[1]]
    (msg,) = encode_update(fam, announced=keys, attrs=a)
    return body(msg), len(body(msg))


@pytest.mark.parametrize("fam", [V4, V6])
def test_every_truncation_is_a_protocol_error(fam: tuple[int, int]) -> None:
    full, nlri_at = _full_update(fam)
    u = decode_update(full, AttrDecoder(ebgp=False))
    assert u.withdraw_reason is None and sum(map(len, u.announced.values())) == 2
    boundaries = {nlri_at, nlri_at + 4}  # v4: after the first prefix (a valid, shorter UPDATE)
    for cut in range(len(full)):
        if cut in boundaries:
            continue
        with pytest.raises(RemoteProtocolError):
            decode_update(full[:cut], AttrDecoder(ebgp=False))
    # and through the framer: a header claiming the shorter length
    for cut in range(len(full)):
        f = Framer()
        f.feed(b"\xff" * 16 + (19 + cut).to_bytes(2, "big") + b"\x02" + full[:cut])
        try:
            m = f.next_message()
            assert m is not None
            decode_update(m[1], AttrDecoder(ebgp=False))
        except RemoteProtocolError:
            continue
        assert cut in boundaries


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_update_bodies(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_update(data, AttrDecoder(as4=bool(len(data) % 2)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_random_open_bodies(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_open(data)


# -- RFC 7606 -------------------------------------------------------------------------------------

ORIGIN_OK = _hdr(0x40, 1, b"\0")
PATH_OK = _hdr(0x40, 2, bytes([2, 1]) + struct.pack("!I", 65002))
NH_OK = _hdr(0x40, 3, b"\x0a\x4d\x00\x0c")
NLRI = bytes([24, 10, 77, 9])


def upd(*attrs: bytes, nlri: bytes = NLRI) -> bytes:
    pa = b"".join(attrs)
    return b"\0\0" + len(pa).to_bytes(2, "big") + pa + nlri


def outcome(b: bytes, ebgp: bool = True) -> str:
    try:
        u = decode_update(b, AttrDecoder(ebgp=ebgp))
    except NotifyError as e:
        return f"reset {e.code}/{e.subcode}"
    if u.withdraw_reason is not None:
        return "treat-as-withdraw"
    if u.discarded:
        return "attribute-discard"
    return "ok"


CASES = [
    ("valid", upd(ORIGIN_OK, PATH_OK, NH_OK), "ok"),
    ("ORIGIN length 2", upd(_hdr(0x40, 1, b"\0\0"), PATH_OK, NH_OK), "treat-as-withdraw"),
    ("ORIGIN value 3", upd(_hdr(0x40, 1, b"\3"), PATH_OK, NH_OK), "treat-as-withdraw"),
    ("ORIGIN flags optional", upd(_hdr(0xC0, 1, b"\0"), PATH_OK, NH_OK), "treat-as-withdraw"),
    ("AS_PATH segment overrun", upd(ORIGIN_OK, _hdr(0x40, 2, b"\2\2\0\0\0\1"), NH_OK),
     "treat-as-withdraw"),
    ("AS_PATH segment type 9", upd(ORIGIN_OK, _hdr(0x40, 2, b"\x09\1\0\0\0\1"), NH_OK),
     "treat-as-withdraw"),
    ("NEXT_HOP length 5", upd(ORIGIN_OK, PATH_OK, _hdr(0x40, 3, b"\1\2\3\4\5")),
     "treat-as-withdraw"),
    ("MED length 3", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0x80, 4, b"\0\0\1")),
     "treat-as-withdraw"),
    ("LOCAL_PREF from eBGP", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0x40, 5, b"\0\0\0\1")),
     "attribute-discard"),
    ("ATOMIC_AGGREGATE length 1", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0x40, 6, b"\0")),
     "attribute-discard"),
    ("AGGREGATOR length 7", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 7, b"\0" * 7)),
     "attribute-discard"),
    ("COMMUNITIES length 5", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 8, b"\0" * 5)),
     "treat-as-withdraw"),
    ("COMMUNITIES length 0", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 8, b"")),
     "treat-as-withdraw"),
    ("LARGE_COMMUNITIES length 13", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 32, b"\0" * 13)),
     "treat-as-withdraw"),
    ("missing ORIGIN", upd(PATH_OK, NH_OK), "treat-as-withdraw"),
    ("missing NEXT_HOP", upd(ORIGIN_OK, PATH_OK), "treat-as-withdraw"),
    ("attribute overruns", upd(ORIGIN_OK, PATH_OK, NH_OK, b"\xc0\x08\x10\0\0"),
     "treat-as-withdraw"),
    ("repeated COMMUNITIES", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 8, b"\0" * 4),
                                 _hdr(0xC0, 8, b"\0" * 4)), "ok"),
    ("unknown optional transitive", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 99, b"x")), "ok"),
    ("unknown well-known", upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0x40, 99, b"x")), "reset 3/2"),
    ("MP_REACH too short", upd(ORIGIN_OK, PATH_OK, _hdr(0x80, 14, b"\0\2"), nlri=b""),
     "reset 3/9"),
    ("MP_REACH twice", upd(ORIGIN_OK, PATH_OK, _hdr(0x80, 15, b"\0\2\1"),
                           _hdr(0x80, 15, b"\0\2\1"), nlri=b""), "reset 3/1"),
    ("MP_REACH bad next hop length", upd(ORIGIN_OK, PATH_OK, _hdr(
        0x80, 14, b"\0\2\1\5" + b"\0" * 5 + b"\0"), nlri=b""), "reset 3/9"),
    ("NLRI prefix length 33", upd(ORIGIN_OK, PATH_OK, NH_OK, nlri=b"\x21" + b"\0" * 5),
     "reset 3/10"),
    ("withdrawn overruns", b"\0\x10\0\0", "reset 3/1"),
]


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rfc7606(name: str, data: bytes, expected: str) -> None:
    assert outcome(data) == expected


def test_unknown_transitive_gets_partial_bit() -> None:
    u = decode_update(upd(ORIGIN_OK, PATH_OK, NH_OK, _hdr(0xC0, 99, b"x")), AttrDecoder())
    assert u.attrs is not None and u.attrs.other == ((0xE0, 99, b"x"),)
    assert _hdr(0xE0, 99, b"x") in encode_attrs(u.attrs)


def test_two_octet_session_merges_as4_path() -> None:
    path2 = _hdr(0x40, 2, bytes([2, 2]) + struct.pack("!HH", 65001, 23456))
    as4 = _hdr(0xC0, 17, bytes([2, 1]) + struct.pack("!I", 4200000000))
    u = decode_update(upd(ORIGIN_OK, path2, NH_OK, as4), AttrDecoder(as4=False))
    assert u.attrs is not None and u.attrs.as_path == ((2, (65001,)), (2, (4200000000,)))


def test_attribute_sets_are_interned() -> None:
    dec = AttrDecoder()
    m = upd(ORIGIN_OK, PATH_OK, NH_OK)
    a1 = decode_update(m, dec).attrs
    a2 = decode_update(upd(ORIGIN_OK, PATH_OK, NH_OK, nlri=bytes([16, 10, 1])), dec).attrs
    a3 = decode_update(upd(NH_OK, PATH_OK, ORIGIN_OK), dec).attrs  # other order, same set
    assert a1 is a2 is a3
