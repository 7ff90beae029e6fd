"""The response journal (nonstop.vs.journal): frames, authentication, the standby's store, and
the active/standby pair over a real local TCP stream."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.common import RemoteProtocolError
from nonstop.vs.journal import (
    TO_ACTIVE,
    TO_STANDBY,
    Ack,
    Closed,
    Entry,
    FrameDecoder,
    JournalGap,
    JournalLink,
    JournalServer,
    JournalStore,
    Open,
    encode,
)

KEY = b"k" * 32
CH = b"c" * 16
K = (8080, "10.77.0.1", 40000)


def entry(seq: int, wpos: int, rend: int, data: bytes = b"r", inflight: bool = False) -> Entry:
    return Entry(seq, *K, wpos, rend, inflight, data)


def test_frames_round_trip_whole_and_bytewise() -> None:
    msgs = [Open(*K, 0), entry(1, 0, 40, b"HTTP/1.1 200 OK\r\n\r\n"), Closed(*K)]
    wire = b"".join(encode(m, KEY, CH, TO_STANDBY) for m in msgs)
    assert FrameDecoder(KEY, CH, TO_STANDBY).feed(wire) == msgs
    dec = FrameDecoder(KEY, CH, TO_STANDBY)
    got = [m for i in range(len(wire)) for m in dec.feed(wire[i : i + 1])]
    assert got == msgs


@pytest.mark.parametrize(
    "key, challenge, direction",
    [(b"x" * 32, CH, TO_STANDBY), (KEY, b"d" * 16, TO_STANDBY), (KEY, CH, TO_ACTIVE)],
    ids=["other key", "replayed from another stream", "reflected"],
)
def test_a_frame_from_elsewhere_is_refused(key: bytes, challenge: bytes, direction: bytes) -> None:
    wire = encode(entry(1, 0, 10), KEY, CH, TO_STANDBY)
    with pytest.raises(RemoteProtocolError) as e:
        FrameDecoder(key, challenge, direction).feed(wire)
    assert e.value.counter == "bad_auth"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_parse_or_raise_the_remote_error(data: bytes) -> None:
    dec = FrameDecoder(KEY, CH, TO_STANDBY)
    try:
        dec.feed(data)
    except RemoteProtocolError as e:
        assert e.counter in ("bad_journal", "bad_auth")


def test_store_says_what_to_write_at_each_position() -> None:
    s = JournalStore()
    s.apply(Open(*K, 100), 0.0)
    s.apply(entry(1, 100, 50, b"A" * 10), 0.0)
    s.apply(entry(2, 110, 90, inflight=True, data=b""), 0.0)
    cj = s.take(K)
    assert cj is not None and s.take(K) is None and len(s) == 0
    e = cj.at(100, 50)
    assert e is not None and e.data == b"A" * 10
    e2 = cj.at(110, 90)
    assert e2 is not None and e2.inflight
    assert cj.at(120, 130) is None  # nothing written there yet: forward the request
    with pytest.raises(JournalGap):
        cj.at(90, 40)  # before coverage: the journal cannot tell
    with pytest.raises(JournalGap):
        cj.at(100, 51)  # the positions disagree: never write bytes for another request


def test_response_replaces_inflight_mark_and_closed_drops() -> None:
    s = JournalStore()
    s.apply(Open(*K, 0), 0.0)
    s.apply(entry(1, 0, 10, inflight=True, data=b""), 0.0)
    s.apply(entry(2, 0, 10, b"resp"), 0.0)
    assert len(s) == 1
    s.apply(Closed(*K), 0.0)
    assert s.take(K) is None and len(s) == 0
    s.apply(entry(3, 0, 10), 0.0)  # no Open on this stream: ignored, counted
    assert s.counters["entry_without_open"] == 1 and s.take(K) is None


def test_eviction_by_age_and_count_is_a_gap_not_a_guess() -> None:
    s = JournalStore(keep=1.0, per_conn=2)
    s.apply(Open(*K, 0), 0.0)
    s.apply(entry(1, 0, 10), 0.0)
    s.apply(entry(2, 5, 20), 0.5)
    s.apply(entry(3, 9, 30), 0.6)  # per_conn: the entry at 0 goes
    s.handle_timer(1.55)  # the one at 5 is 1.05 s old: gone
    cj = s.take(K)
    assert cj is not None
    with pytest.raises(JournalGap):
        cj.at(0, 10)
    with pytest.raises(JournalGap):
        cj.at(5, 20)
    e = cj.at(9, 30)
    assert e is not None and e.seq == 3


def test_open_restarts_coverage() -> None:
    s = JournalStore()
    s.apply(Open(*K, 0), 0.0)
    s.apply(entry(1, 0, 10), 0.0)
    s.apply(Open(*K, 50), 1.0)  # a new stream: coverage from 50 only
    cj = s.take(K)
    assert cj is not None and cj.since == 50 and cj.entries == {}


def test_link_and_server_over_tcp() -> None:
    async def main() -> None:
        store = JournalStore()
        server = JournalServer(store, KEY)
        srv = await asyncio.start_server(server.serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        link = JournalLink(("127.0.0.1", port), KEY, timeout=2, retry=0.01)
        assert not await link.record(K, 0, 10, b"x")  # no stream yet: unjournaled
        task = asyncio.ensure_future(link.run())
        async with asyncio.timeout(5):
            while not link.up:
                await asyncio.sleep(0.01)
        data = os.urandom(100_000)
        assert await link.record(K, 0, 10, data)
        assert await link.record(K, 100_000, 20, inflight=True)
        cj = store.conns[K]
        assert cj.since == 0 and cj.entries[0][1].data == data
        link.closed(K)
        async with asyncio.timeout(5):
            while K in store.conns:
                await asyncio.sleep(0.01)
        task.cancel()
        link.close()
        srv.close()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_link_drops_a_standby_that_never_acks() -> None:
    async def main() -> None:
        async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"c" * 16)  # a challenge, then silence
            await r.read(1 << 20)
            await asyncio.sleep(10)

        srv = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        link = JournalLink(("127.0.0.1", port), KEY, timeout=0.1, retry=5)
        task = asyncio.ensure_future(link.run())
        async with asyncio.timeout(5):
            while not link.up:
                await asyncio.sleep(0.01)
        assert not await link.record(K, 0, 10, b"x")
        assert link.counters["timeouts"] == 1 and not link.up
        task.cancel()
        srv.close()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


def test_ack_is_authenticated_too() -> None:
    wire = encode(Ack(3), KEY, CH, TO_ACTIVE)
    assert FrameDecoder(KEY, CH, TO_ACTIVE).feed(wire) == [Ack(3)]
