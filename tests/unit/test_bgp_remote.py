"""The journal between nodes (nonstop.bgp.remote): authenticated frames, a follower fed over
real TCP on localhost, and the standby's retained tail for a restore behind the master's
writes (a takeover on another node)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
from test_bgp_speaker import A, Pair  # tests/unit is on sys.path (rootdir-relative)

from nonstop.bgp import Journal, Standby
from nonstop.bgp.config import loads
from nonstop.bgp.journal import ACKED, session_state
from nonstop.bgp.remote import (
    NONCE_LEN,
    FrameReader,
    HistoryServer,
    JournalFollower,
    JournalServer,
    fetch_history,
    pack_frame,
    parse_records,
    records_body,
)
from nonstop.bgp.wire import KEEPALIVE_BYTES, Framer, MsgType
from nonstop.common import RemoteProtocolError

KEY = b"k" * 32


def test_frames_roundtrip_and_reject_tampering() -> None:
    nonce = b"n" * 16
    body = records_body(7, [b"abc", b"", b"defg"])
    wire = pack_frame(KEY, nonce, body)
    r = FrameReader(KEY, nonce)
    got = []
    for i in range(len(wire)):  # byte by byte
        got += r.feed(wire[i : i + 1])
    assert got == [body] and parse_records(body) == (7, [b"abc", b"", b"defg"])
    for bad in (pack_frame(KEY, b"m" * 16, body),  # another connection's nonce
                pack_frame(b"x" * 32, nonce, body),  # another key
                wire[:-1] + bytes([wire[-1] ^ 1])):  # a flipped bit
        with pytest.raises(RemoteProtocolError):
            FrameReader(KEY, nonce).feed(bad)
    with pytest.raises(RemoteProtocolError):
        parse_records(b"R" + (0).to_bytes(8, "big") + b"\0\0\0\x09ab")  # cut


def test_standby_resends_from_its_tail_when_restored_behind() -> None:
    """The session sync restored the connection at a send position behind what the master
    wrote: the standby sends those bytes again (the peer's TCP drops what it has)."""
    p = Pair()
    j = Journal(p.a)
    p.connect()
    p.a.originate("10.77.107.0/24", (), None, p.now)
    upd = p.a.data_to_send("b")  # written and journaled
    p.b.receive_data("a", upd, p.now)
    s = Standby(loads(A), retain=True)
    for rec in j.take():
        s.apply(rec)
    behind = s.written["b"] - len(upd)
    s.resume(p.now, written={"b": behind})
    assert s.speaker.data_to_send("b") == upd + KEEPALIVE_BYTES


def test_acked_records_bound_the_tail() -> None:
    p = Pair()
    j = Journal(p.a)
    p.connect()
    for i in range(3):
        p.a.originate(f"10.77.{110 + i}.0/24", (), None, p.now)
        p.pump()
    s = Standby(loads(A), retain=True)
    for rec in j.take():
        s.apply(rec)
    w = s.written["b"]
    assert len(s.tail["b"]) == w  # everything since the connection opened
    p.a._j(ACKED, 0, p.now, (w - 10).to_bytes(8, "big"))
    p.a._j(ACKED, 0, p.now, w.to_bytes(8, "big"))
    for rec in j.take():
        s.apply(rec)
    assert len(s.tail["b"]) == 10  # back to the previous ACKED value, not the last
    with pytest.raises(Exception, match="kernel wrote"):
        s.resume(p.now, written={"b": w - 11})


def test_follower_over_tcp_holds_the_master_state() -> None:
    async def main() -> None:
        p = Pair()
        j = Journal(p.a)
        p.connect()
        confirms = []
        srv = JournalServer(KEY, ("127.0.0.1", 0), j, lambda: confirms.append(srv.confirmed))
        port = srv.sock.getsockname()[1]
        assert srv.confirmed == srv.seq  # nobody to wait for
        f = JournalFollower(loads(A), KEY, ("127.0.0.1", port)).start()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if srv.following == 1:
                break
        assert srv.following == 1
        p.a.originate("10.77.120.0/24", (), None, p.now)
        p.pump()
        assert srv.confirmed < srv.seq  # the new records are not acknowledged yet
        for _ in range(200):
            await asyncio.sleep(0.01)
            if srv.confirmed == srv.seq:
                break
        assert srv.confirmed == srv.seq and confirms
        await asyncio.to_thread(f.stop)
        assert f.applied == srv.seq and session_state(f.standby.speaker) == session_state(p.a)
        srv.close()

    asyncio.run(main())


def test_the_standby_gives_the_journal_back_only_once_the_master_ended() -> None:
    """A master's speaker restarted on its node asks the standby for the journal (Q): refused
    while the master's journal runs; after it ended, the whole copy, applied, is the master's
    state, and the standby is told (it must follow the new journal from its start)."""
    async def main() -> None:
        p = Pair()
        j = Journal(p.a)
        p.connect()
        srv = JournalServer(KEY, ("127.0.0.1", 0), j, lambda: None)
        f = JournalFollower(loads(A), KEY, srv.sock.getsockname()).start()
        served: list[bool] = []
        hs = HistoryServer(KEY, ("127.0.0.1", 0), f, lambda: served.append(True))
        addr = hs.sock.getsockname()
        p.a.originate("10.77.121.0/24", (), None, p.now)
        p.pump()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if srv.following == 1 and srv.confirmed == srv.seq:
                break
        assert srv.confirmed == srv.seq > 0
        assert await asyncio.to_thread(fetch_history, loads(A), KEY, addr, 0.3) is None
        srv.close()  # the master's speaker died: its journal ends
        for _ in range(300):
            await asyncio.sleep(0.01)
            if f.ended is not None:
                break
        got = await asyncio.to_thread(fetch_history, loads(A), KEY, addr, 5.0)
        assert got is not None and got.history == f.history and len(got.history) == srv.seq
        assert session_state(got.standby.speaker) == session_state(p.a)
        assert served == [True]
        hs.close()
        await asyncio.to_thread(f.stop)

    asyncio.run(main())


def test_a_cut_copy_of_the_journal_is_not_taken() -> None:
    """Records then EOF without the closing E frame (the standby died while sending): the
    restarted speaker must not continue from a journal that may be short."""
    p = Pair()
    j = Journal(p.a)
    p.connect()
    recs = j.take()
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve_cut() -> None:
        for _ in range(2):
            c, _ = lsock.accept()
            with c:
                body = FrameReader(KEY).feed(c.recv(4096))[0]
                assert body[:1] == b"Q" and len(body) == 1 + NONCE_LEN
                c.sendall(pack_frame(KEY, body[1:], records_body(0, recs)))

    t = threading.Thread(target=serve_cut, daemon=True)
    t.start()
    assert fetch_history(loads(A), KEY, lsock.getsockname(), 0.5) is None
    lsock.close()


def test_server_drops_a_forged_standby() -> None:
    async def main() -> None:
        p = Pair()
        j = Journal(p.a)
        p.connect()
        srv = JournalServer(KEY, ("127.0.0.1", 0), j, lambda: None)
        c = socket.create_connection(srv.sock.getsockname())
        c.sendall(pack_frame(b"z" * 32, b"", b"H" + b"n" * 16))
        t0 = time.monotonic()
        while srv.counters.get("bad_auth", 0) == 0 and time.monotonic() - t0 < 2:
            await asyncio.sleep(0.01)
        assert srv.counters["bad_auth"] == 1 and srv.standbys == []
        assert srv.confirmed == srv.seq
        c.close()
        srv.close()

    asyncio.run(main())


def test_the_resumed_stream_is_one_session() -> None:
    p = Pair()
    j = Journal(p.a)
    p.connect()
    s = Standby(loads(A), retain=True)
    for rec in j.take():
        s.apply(rec)
    s.resume(p.now + 1, written={"b": s.written["b"]})
    f = Framer()
    f.feed(bytes(p.wire_ab) + s.speaker.data_to_send("b"))
    assert [m[0] for m in f.messages()].count(MsgType.OPEN) == 1
