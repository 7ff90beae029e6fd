"""The AckClamp's in-place fast check (nonstop.session.nfq.AckClamp._fast_pass) never lets a
segment pass that clamp_ack would change: whenever it says "pass as is", the full clamp agrees
that nothing (ACK or SACK block) is beyond the limit. Random segments, options, limits; the ACK
often placed right at, just below or just past the limit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.unit.test_segment import segments

from nonstop.session.nfq import AckClamp, FourTuple
from nonstop.session.segment import (
    ACK,
    SEQ_MOD,
    Segment,
    TcpOptions,
    build,
    clamp_ack,
    encode_options,
    seq_add,
)

u32 = st.integers(0, SEQ_MOD - 1)


@pytest.fixture(scope="module")
def clamp() -> Iterator[AckClamp]:
    c = AckClamp(1, vip="10.77.0.1", port=1, limit=lambda ft: None)  # never opened
    yield c
    c.close()


def check(clamp: AckClamp, seg: Segment, payload: bytes, limit: int | None) -> bool:
    asked: list[FourTuple] = []

    def lim(ft: FourTuple) -> int | None:
        asked.append(ft)
        return limit

    clamp.limit = lim
    pkt = build(seg, payload)
    buf = bytearray(16) + pkt  # not at offset 0, as in the netlink buffer
    fast = clamp._fast_pass(buf, 16, len(pkt))
    if fast and limit is not None:
        assert not clamp_ack(bytearray(pkt), limit), "fast path passed a segment to clamp"
    if asked:
        assert asked == [seg.four_tuple]
    return fast


@settings(max_examples=600, deadline=None)
@given(segments(), st.none() | u32, st.sampled_from([None, -1, 0, 1, 1 << 20]))
def test_fast_pass_implies_no_clamp(
    clamp: AckClamp, sp: tuple[Segment, bytes], limit: int | None, near: int | None
) -> None:
    seg, payload = sp
    if limit is not None and near is not None:
        limit = seq_add(seg.ack, -near)  # limit just under / at / past the ACK
    check(clamp, seg, payload, limit)


def plain(ack: int, opts: TcpOptions, family: int = 4) -> tuple[Segment, bytes]:
    ip = 20 if family == 4 else 40
    src, dst = ("10.77.0.1", "10.77.0.2") if family == 4 else ("fd77::1", "fd77::2")
    seg = Segment(
        family,
        src,
        dst,
        1,
        2,
        1000,
        ack,
        ACK,
        100,
        opts,
        ip,
        ip + 20 + len(encode_options(opts)),
        4,
    )
    return seg, b"data"


@pytest.mark.parametrize("family", [4, 6])
def test_the_common_segments_take_the_fast_path(clamp: AckClamp, family: int) -> None:
    ts = TcpOptions(timestamps=(1, 2))
    for opts in (TcpOptions(), ts):
        assert check(clamp, *plain(500, opts, family), limit=500)  # ACK at the limit
        assert check(clamp, *plain(500, opts, family), limit=None)  # unknown connection
        assert not check(clamp, *plain(501, opts, family), limit=500)  # beyond: full check
    sack = TcpOptions(timestamps=(1, 2), sack=((100, 200),))
    assert not check(clamp, *plain(500, sack, family), limit=500)  # SACK: always the full check
