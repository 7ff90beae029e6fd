"""nonstop.app.channel: framing, the decoder under garbage, the endpoint surviving bad clients."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.app.api import AgentLink, ns_listen
from nonstop.app.channel import (
    MAX_BODY,
    Adopt,
    AdoptDone,
    AgentEndpoint,
    Close,
    Commit,
    CommitRecord,
    FrameDecoder,
    Hello,
    Register,
    encode,
)
from nonstop.common import LocalProtocolError, RemoteProtocolError

MESSAGES = [
    Hello(1234),
    Register(1, ("127.0.0.1", 7000), ("10.77.0.9", 40000)),
    Commit(1, 10, 20, b"s" * 255),
    Close(1),
    Close(2, deliberate=False),
    Adopt(1, ("::1", 7000), ("::1", 1), CommitRecord(1, 2, b"x")),
    AdoptDone(0),
]


def test_golden_commit_frame() -> None:
    frame = encode(Commit(1, 10, 20, b"s"))
    assert frame[:5] == struct.pack("!IB", len(frame) - 5, 0)
    assert msgspec.msgpack.decode(frame[5:]) == {
        "type": "commit", "conn_id": 1, "read_pos": 10, "write_pos": 20, "state": b"s"}


def test_round_trip_whole_and_byte_by_byte() -> None:
    r, w = os.pipe()  # stand-in fds to be carried by REGISTER and ADOPT
    try:
        stream = b"".join(encode(m) for m in MESSAGES)
        dec = FrameDecoder()
        got = dec.feed(stream, [r, w])
        assert [m for m, _ in got] == MESSAGES
        assert [f for _, f in got if f] == [[r], [w]]
        dec2 = FrameDecoder()
        out = []
        for i in range(len(stream)):
            out += dec2.feed(stream[i : i + 1], [r, w] if i == 0 else [])
        assert [m for m, _ in out] == MESSAGES
    finally:
        os.close(r)
        os.close(w)


def frame_of(obj: object, nfds: int = 0) -> bytes:
    body = msgspec.msgpack.encode(obj)
    return struct.pack("!IB", len(body), nfds) + body


COMMIT = {"type": "commit", "conn_id": 1, "read_pos": 1, "write_pos": 1, "state": b"s"}


@pytest.mark.parametrize("frame", [
    struct.pack("!IB", MAX_BODY + 1, 0),  # too long
    struct.pack("!IB", 1, 0) + b"\xc1",  # not msgpack
    frame_of({"type": "nope"}),
    frame_of([1, 2, 3]),
    frame_of({**COMMIT, "state": b"s" * 256}),  # state over 255 bytes
    frame_of({**COMMIT, "read_pos": -1}),
    frame_of({**COMMIT, "conn_id": "1"}),
    frame_of(COMMIT, nfds=1),  # an fd on a COMMIT
    encode(Register(1, ("a", 1), ("b", 2))),  # REGISTER whose fd never came
])
def test_malformed_frames_raise_remote_error(frame: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(frame)


def test_a_valid_commit_frame_decodes() -> None:
    [(msg, fds)] = FrameDecoder().feed(frame_of(COMMIT))
    assert msg == Commit(1, 1, 1, b"s") and fds == []


def test_encoder_refuses_an_oversized_message_as_our_bug() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Register(1, ("a" * 5000, 1), ("b", 2)))


def test_fds_are_closed_when_the_frame_is_malformed() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(struct.pack("!IB", 1, 1) + b"\xc1", [r])
    with pytest.raises(OSError):
        os.fstat(r)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_decoder_parses_or_raises_remote_error(data: bytes, byte_by_byte: bool) -> None:
    dec = FrameDecoder()
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    try:
        for c in chunks:
            for msg, fds in dec.feed(c):
                assert type(msg) in {type(m) for m in MESSAGES}
                assert fds == []
    except RemoteProtocolError:
        pass  # the only error garbage may cause


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MESSAGES), st.binary(min_size=1, max_size=8), st.integers(0, 40))
def test_corrupted_valid_frames_parse_or_raise_remote_error(msg, junk: bytes, at: int) -> None:
    frame = bytearray(encode(msg))
    at = min(at, len(frame) - 1)
    frame[at : at + len(junk)] = junk
    try:
        got = FrameDecoder().feed(bytes(frame))
    except RemoteProtocolError:
        return
    assert all(type(m) in {type(x) for x in MESSAGES} for m, _ in got)


@pytest.fixture
def served(tmp_path: Path):
    ep = AgentEndpoint(str(tmp_path / "agent.sock"))
    stop = threading.Event()
    t = threading.Thread(target=lambda: [ep.step(0.02) for _ in iter(stop.is_set, True)],
                         daemon=True)
    t.start()
    yield ep
    stop.set()
    t.join(5)
    ep.close()


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff\x00",
    struct.pack("!IB", 1, 0) + b"\xc1",
    encode(Commit(99, 1, 1)),  # a conn this client never registered
    encode(AdoptDone(1)),  # agent -> library only
])
def test_endpoint_survives_a_malformed_client(served: AgentEndpoint, garbage: bytes) -> None:
    lst = ns_listen("127.0.0.1", 0, agent=served.path)
    cli = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    conn = lst.ns_accept()
    wait_for(lambda: conn.conn_id in served.conns)
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(served.path)
    bad.sendall(garbage)
    bad.settimeout(5)
    assert bad.recv(10) == b""  # dropped
    bad.close()
    assert sum(served.counters.values()) == 1
    cli.sendall(b"still here")  # the good client and its connection carry on
    assert conn.ns_recv(100) == b"still here"
    conn.commit(b"ok")
    wait_for(lambda: served.conns[conn.conn_id].record.state == b"ok")
    conn.ns_close()
    assert cli.recv(10) == b""
    cli.close()
    lst.close()


def test_library_rejects_a_malformed_agent(tmp_path: Path) -> None:
    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    link = AgentLink(path)
    peer, _ = srv.accept()
    peer.sendall(encode(Hello(1)))  # library -> agent only: refused
    with pytest.raises(RemoteProtocolError):
        link.adopt(0)
    link.close()
    peer.close()
    srv.close()


def test_a_service_waits_for_its_agent_to_come_back(tmp_path: Path) -> None:
    """The endpoint's socket file is left by a dead agent (connect refused) and a new agent
    binds it 0.2 s later: AgentLink waits instead of failing (a service started beside a
    restarting agent died at once and its connections went unserved). Without an agent at
    all it gives up after ``wait``."""
    path = str(tmp_path / "agent.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(ConnectionRefusedError):
        AgentLink(path, wait=0.1)

    def agent_back() -> None:
        time.sleep(0.2)
        os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        got.append(srv.accept()[0])
        srv.close()

    got: list[socket.socket] = []
    t = threading.Thread(target=agent_back)
    t.start()
    link = AgentLink(path, wait=5.0)
    t.join()
    assert got and link.sock.getpeername() == path
    link.sock.close()
    got[0].close()


def test_commits_of_one_read_reach_on_commit_in_one_call(tmp_path: Path) -> None:
    """The endpoint hands ``on_commit`` every COMMIT of one read at once (the session manager
    syncs them under one lock); COMMITs before a refused message still count."""
    calls: list[list[tuple[int, int]]] = []
    ep = AgentEndpoint(str(tmp_path / "agent.sock"),
                       on_commit=lambda hs: calls.append([(h.conn_id, h.record.read_pos)
                                                          for h in hs]))  # fmt: skip
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    link = AgentLink(ep.path)
    ep.step(1)  # accept
    pairs = []
    for cid in (1, 2):
        cli = socket.create_connection(("127.0.0.1", port), timeout=5)
        srv, _ = lsock.accept()
        link.send(Register(cid, ("127.0.0.1", port), cli.getsockname()), srv.fileno())
        ep.step(1)
        pairs += [cli, srv]
    assert set(ep.conns) == {1, 2} and calls == []
    link.sock.sendall(encode(Commit(1, 0, 0)) + encode(Commit(2, 0, 0)) + encode(Commit(1, 0, 0)))
    ep.step(1)
    assert calls == [[(1, 0), (2, 0), (1, 0)]]
    link.sock.sendall(encode(Commit(2, 0, 0)) + encode(Commit(99, 0, 0)))  # 99: not its conn
    ep.step(1)
    assert calls[1:] == [[(2, 0)]] and ep.counters  # then the client was dropped
    assert ep.conns[1].owner is None and ep.conns[2].owner is None  # orphans, still held
    link.close()
    ep.close()
    for s_ in (*pairs, lsock):
        s_.close()
