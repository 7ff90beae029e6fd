"""Local crash recovery through the AgentEndpoint: what a successor (restarted, or a warm
standby) gets when the service dies. Real TCP sockets on 127.0.0.1, the endpoint driven by
``handle``/``readable`` in the test's own order (so the races are played out, not hoped for)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nonstop.app.api import AgentLink, NsConn, ns_listen, register
from nonstop.app.channel import AgentEndpoint, Commit, kernel_write_pos


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[AgentEndpoint]:
    ep = AgentEndpoint(str(tmp_path / "agent.sock"))
    yield ep
    ep.close()


def pump(ep: AgentEndpoint, rounds: int = 5) -> None:
    for _ in range(rounds):
        ep.step(0.01)


def adopt_in_thread(link: AgentLink, port: int) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.extend(link.adopt(port)), daemon=True)
    t.start()
    return t, out


def connected(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_successor_skips_bytes_the_dead_owner_wrote_past_its_commit(endpoint) -> None:
    lst = ns_listen("127.0.0.1", 0, agent=endpoint.path, replay=True)
    peer = connected(lst.port)
    pump(endpoint)
    conn = lst.ns_accept()
    pump(endpoint)
    conn.ns_send(b"0123456789")
    conn.commit(b"s1")  # write_pos 10 committed
    conn.ns_send(b"abcdef")  # past the commit: the peer gets it, the successor writes it again
    pump(endpoint)
    assert kernel_write_pos(conn.sock) == 16
    lst.sock.close()  # the process "dies": its channel and sockets go
    conn.sock.close()
    lst.agent.close()
    pump(endpoint)
    assert all(h.owner is None for h in endpoint.conns.values())

    link = AgentLink(endpoint.path)
    t, got = adopt_in_thread(link, lst.port)
    pump(endpoint)
    t.join(5)
    (adopt, sock), = got
    assert adopt.record.write_pos == 10 and adopt.sent == 16 and adopt.record.state == b"s1"
    succ = NsConn(sock, adopt.conn_id, link, adopt.record, adopt.sent)
    succ.ns_send(b"abcdefXYZ")  # the replay from the commit, then new bytes
    assert succ.write_pos == 19
    peer.settimeout(5)
    seen = b""
    while len(seen) < 19:
        seen += peer.recv(100)
    assert seen == b"0123456789abcdefXYZ"  # nothing twice, nothing skipped
    link.close()
    peer.close()


def test_an_adopt_request_before_the_dead_owners_eof_still_gets_its_connections(endpoint):
    lst = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    peer = connected(lst.port)
    pump(endpoint)
    conn = lst.ns_accept()
    pump(endpoint)
    peer.sendall(b"hello world")
    assert conn.ns_recv(100) == b"hello world"  # peeked, still queued
    # it commits 5 bytes and dies before consuming them; that COMMIT and its EOF are both
    # still unread by the endpoint...
    lst.agent.send(Commit(conn.conn_id, 5, 0, b"x"))
    lst.sock.close()
    conn.sock.close()
    lst.agent.close()
    link = AgentLink(endpoint.path)
    t, got = adopt_in_thread(link, lst.port)
    # ...when the successor's request is served first: accept it, then read only it
    endpoint.accept()
    new = endpoint.clients[-1]
    deadline = time.monotonic() + 5
    while t.is_alive() and time.monotonic() < deadline:
        if select.select([new.sock], [], [], 0.05)[0]:
            endpoint.readable(new)
    t.join(5)
    assert len(got) == 1, "the successor was not handed the dead owner's connection"
    adopt, sock = got[0]
    assert adopt.record.state == b"x" and adopt.record.read_pos == 5
    assert sock.recv(100) == b" world"  # from the commit on: the 5 committed bytes trimmed
    sock.close()
    link.close()
    peer.close()


def test_warm_standby_takes_the_connections_when_the_active_dies(endpoint) -> None:
    active = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    port = active.port
    t0, got0 = adopt_in_thread(active.agent, port)  # the active: nothing to adopt, serves
    pump(endpoint)
    t0.join(5)
    assert got0 == []
    peers = [connected(port) for _ in range(3)]
    conns = [active.ns_accept() for _ in peers]
    pump(endpoint)
    for i, c in enumerate(conns):
        c.commit(f"c{i}".encode())
    # the standby: its bind fails (the active listens), so it asks for adoption first; held
    result: list = []
    th = threading.Thread(
        target=lambda: result.append(ns_listen("127.0.0.1", port, agent=endpoint.path)),
        daemon=True,
    )
    th.start()
    pump(endpoint, 20)
    assert not result and len(endpoint.waiting) == 1
    active.close()  # the active dies
    for c in conns:
        c.sock.close()
    pump(endpoint, 20)
    th.join(5)
    assert result, "the standby was not handed the connections"
    standby = result[0]
    adopted = standby.adopted()
    assert sorted(r.state for _, r in adopted) == [b"c0", b"c1", b"c2"]
    # it listens now: new connections reach it
    extra = connected(port)
    pump(endpoint)
    assert isinstance(standby.ns_accept(), NsConn)
    for c, _ in adopted:
        c.ns_send(b"!")
    for p in peers:
        p.settimeout(5)
        assert p.recv(10) == b"!"
    standby.close()
    for p in (*peers, extra):
        p.close()


def test_register_is_needed_for_protection(endpoint) -> None:
    """A connection the library registered is held by the endpoint after its owner's death."""
    srv = socket.create_server(("127.0.0.1", 0))
    link = AgentLink(endpoint.path)
    peer = connected(srv.getsockname()[1])
    s, _ = srv.accept()
    register(link, s)
    pump(endpoint)
    assert len(endpoint.conns) == 1
    link.close()
    s.close()
    pump(endpoint)
    held = next(iter(endpoint.conns.values()))
    assert held.owner is None
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):  # no FIN: the endpoint's duplicate keeps it open
        peer.recv(1)
    srv.close()
    peer.close()
