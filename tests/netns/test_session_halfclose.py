"""A peer's half-close through a takeover, end to end: the agent pair and the chat example.

The peer joins the chat, the master's chat server hangs (SIGSTOP), and the peer sends its last
line and half-closes (shutdown SHUT_WR). The master's kernel takes both, the backup holds both,
and the master acknowledges the FIN (the peer moves to FIN_WAIT2: it will never send that FIN
again). Then the master's agent and chat server are SIGKILLed. The backup promotes, and its
standby chat server adopts the connection: it must read the peer's last line, then EOF (the FIN
the worker hands the restored socket once the VIP is there: ``kick.deliver_fins``), broadcast
the line, close, and the peer must read the line and EOF with no reset.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

import pytest

from nonstop.cluster import STEADY_TIMERS, Cluster, ClusterSpec
from nonstop.lab import LabProcess

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PORT = 7410
CHAT = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "chat", "server.py")
FIN_WAIT2, CLOSE = 5, 7


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def recv_until(sock: socket.socket, want: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    got = b""
    while want not in got:
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


Chat = tuple[Cluster, dict[str, LabProcess]]


@pytest.fixture
def cluster(demo_lab, request) -> Iterator[Chat]:  # type: ignore[no-untyped-def]
    c = Cluster(demo_lab, ClusterSpec(services={"chat": PORT}, preempt=False, **STEADY_TIMERS))
    c.start()
    servers: dict[str, LabProcess] = {}
    try:
        c.wait_ready(timeout=20)
        for n in c.spec.nodes:
            path = c.endpoint(n, "chat")
            c.wait(lambda p=path: os.path.exists(p), 10.0, f"{path} to exist", poll=0.02)
            servers[n] = c.lab.host(n).run(
                [sys.executable, CHAT, "--host", c.spec.service_vip, "--port", str(PORT),
                 "--agent", path], name=f"chat-{n}")  # fmt: skip
        master = c.master()
        assert master is not None
        servers[master].wait_output("listening", 10)
        yield c, servers
    finally:
        for p in servers.values():
            with contextlib.suppress(OSError, ProcessLookupError):
                p.send_signal(signal.SIGCONT)
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for n in c.spec.nodes:
                with contextlib.suppress(OSError):
                    print(f"----- log of {n}\n{c.log_text(n)[-8000:]}")
            for n, p in servers.items():
                print(f"----- chat on {n}\n{p.output()[-2000:]}")


def test_a_half_closed_connection_is_read_to_eof_after_a_takeover(cluster: Chat) -> None:
    c, servers = cluster
    master = c.master()
    assert master is not None
    other = next(n for n in c.spec.nodes if n != master)
    peer = c.lab.host("peer")
    with peer.socket(socket.AF_INET) as s:
        s.connect((c.spec.service_vip, PORT))
        s.sendall(b"bob\n")
        assert recv_until(s, b"* bob joined\n").endswith(b"* bob joined\n")
        servers[master].send_signal(signal.SIGSTOP)  # the master's service hangs
        s.sendall(b"last words\n")
        s.shutdown(socket.SHUT_WR)
        # the master acknowledges the FIN once the backup holds it (the peer retransmits it
        # after its RTO to get that ACK: the clamp held the first one back)
        deadline = time.monotonic() + 10
        while tcp_state(s) != FIN_WAIT2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tcp_state(s) == FIN_WAIT2, "the master never acknowledged the peer's FIN"
        c.procs[master].kill()
        servers[master].kill()
        c.wait_role(other, "master", timeout=10)
        # the standby adopts the connection from the commit after "bob\n": it reads the last
        # line, broadcasts it (the peer still receives), then EOF, and closes
        got = recv_until(s, b"bob: last words\n", timeout=15)
        assert got.endswith(b"bob: last words\n"), got
        s.settimeout(10)
        assert s.recv(100) == b"", "no EOF: the restored socket never got the peer's FIN"
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    st = c.status(other) or {}
    svc = st["sessions"][0]
    assert svc["counters"]["fins_delivered"] == 1, svc["counters"]
    assert svc["last_promotion"]["restored"] == 1
    deadline = time.monotonic() + 10
    while svc.get("sync", {}).get("tracked") and time.monotonic() < deadline:
        time.sleep(0.1)
        svc = (c.status(other) or {})["sessions"][0]
    assert svc["sync"]["tracked"] == 0  # the peer acknowledged our FIN: forgotten
