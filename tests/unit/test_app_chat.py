"""The reference chat service (examples/chat) on 127.0.0.1, with an AgentEndpoint: broadcast,
the example client, and a SIGKILLed server whose successor carries the clients on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nonstop.app.channel import AgentEndpoint

ROOT = Path(__file__).resolve().parents[2]
CHAT = ROOT / "examples" / "chat"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[AgentEndpoint]:
    ep = AgentEndpoint(str(tmp_path / "agent.sock"))
    stop = threading.Event()
    t = threading.Thread(target=lambda: [ep.step(0.02) for _ in iter(stop.is_set, True)],
                         daemon=True)
    t.start()
    yield ep
    stop.set()
    t.join(5)
    ep.close()


def start_server(agent: str, port: int = 0) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([sys.executable, str(CHAT / "server.py"), "--port", str(port),
                          "--agent", agent], stdout=subprocess.PIPE, text=True, env=ENV)
    line = p.stdout.readline().split()
    assert line[0] == "listening", line
    return p, int(line[1])


class Client:
    def __init__(self, port: int, nick: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.lines = self.sock.makefile("rb")
        self.say(nick)

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def hear(self) -> str:
        line = self.lines.readline()
        assert line.endswith(b"\n"), f"EOF or timeout after {line!r}"
        return line.decode().rstrip("\n")

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def test_chat_broadcast_client_and_server_restart(endpoint: AgentEndpoint) -> None:
    procs: list[subprocess.Popen[str]] = []
    clients: list[Client] = []
    try:
        srv, port = start_server(endpoint.path)
        procs.append(srv)
        alice = Client(port, "alice")
        clients.append(alice)
        assert alice.hear() == "* alice joined"
        bob = Client(port, "bob")
        clients.append(bob)
        assert alice.hear() == bob.hear() == "* bob joined"
        alice.say("hi bob")
        assert alice.hear() == bob.hear() == "alice: hi bob"

        carol = subprocess.run([sys.executable, str(CHAT / "client.py"), "127.0.0.1", str(port),
                                "carol"], input="hello from carol\n", capture_output=True,
                               text=True, env=ENV, timeout=20)
        assert "carol: hello from carol" in carol.stdout
        for c in (alice, bob):
            assert [c.hear() for _ in range(3)] == [
                "* carol joined", "carol: hello from carol", "* carol left"]

        srv.send_signal(signal.SIGKILL)
        srv.wait(5)
        alice.say("are you there?")  # waits in the kernel queue for the successor
        srv2, port2 = start_server(endpoint.path, port)
        procs.append(srv2)
        assert port2 == port
        # the nickname came back in the commit state; the line was read exactly once
        assert alice.hear() == bob.hear() == "alice: are you there?"
        bob.say("yes")
        assert alice.hear() == bob.hear() == "bob: yes"
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.kill()
            p.wait(5)
            p.stdout.close()
