"""The stream checker catches loss, duplication and corruption, and a clean run reports none."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nonstop.streams import StreamError, StreamVerifier, make_message
from nonstop.streams.run import Server, client


def feed_all(v: StreamVerifier, msgs: list[bytes], chunk: int = 7) -> None:
    data = b"".join(msgs)
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk], float(i))


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=20),
       st.integers(min_value=1, max_value=64))  # fmt: skip
def test_clean_stream_any_chunking(sizes, chunk):
    v = StreamVerifier(1, 7)
    feed_all(v, [make_message(1, 7, i, n) for i, n in enumerate(sizes)], chunk)
    r = v.report
    assert (r.messages, r.lost, r.duplicated, r.corrupted) == (len(sizes), 0, 0, 0)
    assert r.bytes == sum(sizes) and v.pending == 0


def test_loss_duplication_corruption_are_counted():
    v = StreamVerifier(0, 1)
    msgs = [make_message(0, 1, i, 50) for i in range(10)]
    bad = bytearray(msgs[6])
    bad[-1] ^= 0xFF
    feed_all(v, [msgs[0], msgs[1], msgs[3], msgs[3], msgs[4], bytes(bad), msgs[9]])
    r = v.report
    assert r.lost == 1 + 1 + 2  # seq 2, seq 5, then 7 and 8
    assert r.duplicated == 1 and r.corrupted == 1


def test_broken_framing_raises():
    v = StreamVerifier(0, 1)
    with pytest.raises(StreamError):
        v.feed(make_message(1, 1, 0, 10), 0.0)  # the other direction's stream
    with pytest.raises(StreamError):
        StreamVerifier(0, 1).feed(b"\x00" * 40, 0.0)


def test_server_and_client_over_loopback():
    async def run() -> tuple[dict, Server]:
        srv = Server(rate=200, size=100)
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, family=socket.AF_INET)
        port = server.sockets[0].getsockname()[1]
        async with server:
            out = await client("127.0.0.1", port, conns=8, duration=0.5, rate=200, size=100)
        return out, srv

    out, srv = asyncio.run(run())
    assert out["kept"] == 8 and out["resets"] == 0 and out["errors"] == {}
    assert (out["lost"], out["duplicated"], out["corrupted"]) == (0, 0, 0)
    assert out["messages"] >= 8 * 80  # ~100 per connection in 0.5 s at 200/s, plus trailers
    assert out["max_gap_ms"]["max"] < 200
    server_side = [v.report for v in srv.verifiers]
    assert len(server_side) == 8 and all(r.lost == 0 and r.messages >= 80 for r in server_side)
