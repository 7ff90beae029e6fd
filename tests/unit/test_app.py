"""nonstop.app: the prefixed socket API over real sockets, with a real AgentEndpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nonstop.app import aio
from nonstop.app.api import AgentLink, ns_listen
from nonstop.app.channel import AgentEndpoint, Commit, Register

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[AgentEndpoint]:
    ep = AgentEndpoint(str(tmp_path / "agent.sock"))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            ep.step(0.02)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield ep
    stop.set()
    t.join(5)
    ep.close()


def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = sock.recv(n - len(out))
        assert got, f"EOF after {out!r}"
        out += got
    return out


def test_echo_with_commits_no_agent() -> None:
    lst = ns_listen("127.0.0.1", 0)
    cli = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    conn = lst.ns_accept()
    cli.sendall(b"hello")
    assert conn.ns_recv(100) == b"hello"
    # a peek never hands the same bytes out twice, even before the commit
    cli.sendall(b" world")
    assert conn.ns_recv(100) == b" world"
    conn.ns_send(b"hello world")
    conn.commit(b"s", upto=5)
    assert (conn.read_pos, conn.delivered, conn.write_pos) == (5, 11, 11)
    conn.commit()
    assert conn.read_pos == 11
    assert recv_exact(cli, 11) == b"hello world"
    cli.shutdown(socket.SHUT_WR)
    assert conn.ns_recv(100) == b""
    conn.ns_close()
    assert cli.recv(10) == b""
    cli.close()
    lst.close()


def test_echo_through_agent(endpoint: AgentEndpoint) -> None:
    lst = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    cli = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    conn = lst.ns_accept()
    for i in range(20):
        msg = f"line {i}\n".encode()
        cli.sendall(msg)
        got = b""
        while len(got) < len(msg):
            got += conn.ns_recv(100)
        conn.ns_send(got)
        conn.commit(str(i).encode())
        assert recv_exact(cli, len(msg)) == msg
    wait_for(lambda: conn.conn_id in endpoint.conns
             and endpoint.conns[conn.conn_id].record.state == b"19")
    rec = endpoint.conns[conn.conn_id].record
    assert rec.read_pos == rec.write_pos == conn.read_pos == conn.write_pos
    conn.ns_close()
    assert cli.recv(10) == b""  # deliberate close: the agent's duplicate is closed too
    wait_for(lambda: conn.conn_id not in endpoint.conns)
    cli.close()
    lst.close()


CHILD_1 = """
import sys, time
from nonstop.app.api import ns_listen
lst = ns_listen("127.0.0.1", 0, agent=sys.argv[1])
print(lst.port, flush=True)
c = lst.ns_accept()
got = b""
while len(got) < 10:
    got += c.ns_recv(100)
c.ns_send(b"ACK")
c.commit(b"st1", upto=c.read_pos + 4)
print("committed", got.decode(), flush=True)
time.sleep(60)
"""

CHILD_2 = """
import sys, time
from nonstop.app.api import ns_listen
lst = ns_listen("127.0.0.1", int(sys.argv[2]), agent=sys.argv[1])
[(c, rec)] = lst.adopted()
print(rec.read_pos, rec.write_pos, rec.state.decode(), c.write_pos, flush=True)
got = c.ns_recv(100)
print(got.decode(), flush=True)
c.ns_send(b"resumed:" + got)
c.commit(b"st2")
more = b""
while not more.endswith(b"\\n"):
    more += c.ns_recv(100)
c.ns_send(b"echo:" + more)
c.commit(b"st3")
c.ns_close()
print("closed", flush=True)
time.sleep(60)
"""


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, env=env)


def test_uncommitted_bytes_survive_a_sigkilled_service(endpoint: AgentEndpoint) -> None:
    p1 = spawn(CHILD_1, endpoint.path)
    p2: subprocess.Popen[str] | None = None
    cli: socket.socket | None = None
    try:
        port = int(p1.stdout.readline())
        cli = socket.create_connection(("127.0.0.1", port), timeout=5)
        cli.sendall(b"0123456789")
        assert p1.stdout.readline().split() == ["committed", "0123456789"]
        assert recv_exact(cli, 3) == b"ACK"
        wait_for(lambda: any(h.record.state == b"st1" for h in endpoint.conns.values()))
        [held] = endpoint.conns.values()
        assert (held.record.read_pos, held.record.write_pos) == (4, 3)

        os.kill(p1.pid, signal.SIGKILL)
        p1.wait(5)
        wait_for(lambda: held.owner is None)  # the endpoint saw the service go
        cli.settimeout(0.3)
        with pytest.raises(TimeoutError):  # no FIN, no RST: the agent's duplicate holds it
            cli.recv(10)
        cli.settimeout(5)

        p2 = spawn(CHILD_2, endpoint.path, str(port))
        assert p2.stdout.readline().split() == ["4", "3", "st1", "3"]
        assert p2.stdout.readline().strip() == "456789"  # exactly the uncommitted bytes
        assert recv_exact(cli, 14) == b"resumed:456789"
        cli.sendall(b"more\n")
        assert recv_exact(cli, 10) == b"echo:more\n"
        assert p2.stdout.readline().strip() == "closed"
        assert cli.recv(10) == b""  # deliberate ns_close: EOF while the process still lives
        assert p2.poll() is None
    finally:
        for p in (p1, p2):
            if p is not None:
                p.kill()
                p.wait(5)
                p.stdout.close()
        if cli is not None:
            cli.close()


def test_commit_sent_but_not_consumed_is_trimmed_at_adoption(endpoint: AgentEndpoint) -> None:
    """A service that died between COMMIT and consuming: the successor starts at the commit."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port), timeout=5)
    srv, _ = lsock.accept()
    cli.sendall(b"abcdefgh")
    wait_for(lambda: len(srv.recv(100, socket.MSG_PEEK)) == 8)
    link = AgentLink(endpoint.path)
    link.send(Register(7, ("127.0.0.1", port), cli.getsockname()), srv.fileno())
    link.send(Commit(7, 5, 0, b"x"))
    wait_for(lambda: 7 in endpoint.conns and endpoint.conns[7].record.read_pos == 5)
    link.close()
    srv.close()
    lsock.close()
    lst = ns_listen("127.0.0.1", port, agent=endpoint.path)
    [(conn, rec)] = lst.adopted()
    assert rec.read_pos == 5 and conn.read_pos == 5
    assert conn.ns_recv(100) == b"fgh"
    conn.commit()  # closing with unread bytes in the queue would send a RST
    conn.ns_close()
    assert cli.recv(10) == b""
    cli.close()
    lst.close()


def test_adoption_of_more_connections_than_one_batch(endpoint: AgentEndpoint) -> None:
    """ADOPTs go FDS_PER_MSG to a sendmsg: 150 connections (three batches, the last partial)
    each reach the successor with its own socket, record and trimmed queue."""
    from nonstop.app.channel import FDS_PER_MSG

    n = 2 * FDS_PER_MSG + 22
    lsock = socket.create_server(("127.0.0.1", 0), backlog=n)
    port = lsock.getsockname()[1]
    link = AgentLink(endpoint.path)
    pairs = []
    for i in range(n):
        cli = socket.create_connection(("127.0.0.1", port), timeout=5)
        srv, _ = lsock.accept()
        msg = f"{i:04d}:abcdef".encode()
        cli.sendall(msg)
        wait_for(lambda srv=srv, msg=msg: len(srv.recv(100, socket.MSG_PEEK)) == len(msg))
        link.send(Register(i, ("127.0.0.1", port), cli.getsockname()), srv.fileno())
        link.send(Commit(i, 5 + i % 3, 0, bytes([i % 256])))  # committed, not consumed
        pairs.append((cli, srv))
    wait_for(lambda: len(endpoint.conns) == n and all(
        endpoint.conns[i].record.read_pos == 5 + i % 3 for i in range(n)))  # fmt: skip
    link.close()
    for _, srv in pairs:
        srv.close()
    lsock.close()
    lst = ns_listen("127.0.0.1", port, agent=endpoint.path)
    got = lst.adopted()
    assert sorted(c.conn_id for c, _ in got) == list(range(n))
    for conn, rec in got:
        i = conn.conn_id
        assert rec.state == bytes([i % 256]) and conn.read_pos == 5 + i % 3
        assert conn.ns_recv(100) == f"{i:04d}:abcdef".encode()[5 + i % 3 :]
        conn.commit()
        conn.ns_send(f"bye {i}".encode())
        assert recv_exact(pairs[i][0], len(f"bye {i}")) == f"bye {i}".encode()
        conn.ns_close()
    for cli, _ in pairs:
        cli.close()
    lst.close()


def test_abort_resets_the_peer_although_the_agent_holds_a_copy(endpoint: AgentEndpoint) -> None:
    lst = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    cli = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    conn = lst.ns_accept()
    wait_for(lambda: conn.conn_id in endpoint.conns)
    conn.ns_abort()
    with pytest.raises(ConnectionResetError):
        cli.recv(10)
    wait_for(lambda: conn.conn_id not in endpoint.conns)
    cli.close()
    lst.close()


def test_kernel_positions_are_exact_when_a_segment_lands_between_the_reads(
        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The read position is a TCP_INFO counter minus a queue length: two syscalls. A segment
    landing between them must not skew it (it did under load: a successor's queue was trimmed a
    whole message too far). Here a segment is made to land exactly there, every first time."""
    from nonstop.app import channel

    lsock = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lsock.getsockname()[:2], timeout=5)
    srv, _ = lsock.accept()
    real = channel._queue_len
    calls = 0

    def racing_queue_len(sock: socket.socket, request: int) -> int:
        nonlocal calls
        calls += 1
        # each read is two tries of two queue lengths (receive, send); the first length of
        # the first try: 100 more bytes arrive between the counter and the queue
        if calls % 4 == 1:
            before = real(srv, channel._SIOCINQ)
            cli.sendall(b"y" * 100)
            wait_for(lambda: real(srv, channel._SIOCINQ) == before + 100)
        return real(sock, request)

    cli.sendall(b"x" * 50)
    wait_for(lambda: len(srv.recv(100, socket.MSG_PEEK)) == 50)
    assert srv.recv(20) == b"x" * 20
    monkeypatch.setattr(channel, "_queue_len", racing_queue_len)
    assert channel.kernel_read_pos(srv) == 20
    srv.sendall(b"z" * 30)
    assert channel.kernel_write_pos(srv) == 30  # (queued or acked: the same position)
    assert channel.kernel_read_pos(srv) == 20  # still: more bytes queued do not move it
    for s_ in (cli, srv, lsock):
        s_.close()


def test_adopted_filters_by_port_and_is_empty_without_orphans(endpoint: AgentEndpoint) -> None:
    lst = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    cli = socket.create_connection(("127.0.0.1", lst.port), timeout=5)
    conn = lst.ns_accept()
    assert lst.adopted() == []  # its owner is alive: not an orphan
    other = ns_listen("127.0.0.1", 0, agent=endpoint.path)
    lst.agent.close()  # the owner's channel goes: the connection is orphaned
    wait_for(lambda: endpoint.conns[conn.conn_id].owner is None)
    assert other.adopted() == []  # another port
    lst.sock.close()
    again = ns_listen("127.0.0.1", lst.port, agent=endpoint.path)
    [(c2, _)] = again.adopted()
    assert c2.conn_id == conn.conn_id
    conn.sock.close()
    c2.ns_close()
    assert cli.recv(10) == b""
    cli.close()
    other.close()
    again.close()


def test_asyncio_echo_and_adoption(endpoint: AgentEndpoint) -> None:
    async def main() -> None:
        lst = await aio.ns_listen("127.0.0.1", 0, agent=endpoint.path)
        reader, writer = await asyncio.open_connection("127.0.0.1", lst.port)
        conn = await lst.ns_accept()
        writer.write(b"ping")
        assert await conn.ns_recv(100) == b"ping"

        async def late() -> None:
            await asyncio.sleep(0.1)
            writer.write(b"pong")

        t = asyncio.create_task(late())
        assert await conn.ns_recv(100) == b"pong"  # waits for new bytes; no busy loop on old
        await t
        await conn.ns_send(b"pingpong")
        await conn.commit(b"a", upto=4)
        assert await reader.readexactly(8) == b"pingpong"
        # orphan it without consuming "pong", adopt it again in a new listener
        lst.agent.close()
        await asyncio.to_thread(wait_for, lambda: endpoint.conns[conn.conn_id].owner is None)
        lst.sock.close()
        lst2 = await aio.ns_listen("127.0.0.1", lst.port, agent=endpoint.path)
        [(c2, rec)] = await lst2.adopted()
        assert (rec.read_pos, rec.write_pos, rec.state) == (4, 8, b"a")
        assert await c2.ns_recv(100) == b"pong"
        conn.sock.close()
        writer.write_eof()
        assert await c2.ns_recv(100) == b""
        await c2.commit()
        await c2.ns_close()
        assert await reader.read() == b""
        writer.close()
        lst2.close()

    asyncio.run(asyncio.wait_for(main(), 10))
