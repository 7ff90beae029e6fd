"""``nonstop service reset``: the CLI, over the agent's unix socket, to the agent's supervisors and
its local faults. The agent here is the real code of ``Agent.reset_service`` and of its fault
callbacks around real supervisors (processes that die at start while a flag file exists), a
real role machine and the real API; only the rest of the daemon (heartbeats, VIPs) is left out.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import socket
import textwrap
import time
import types
from pathlib import Path

import pytest

from nonstop.agent.api import AgentApi
from nonstop.agent.daemon import Agent
from nonstop.agent.faults import LocalFaults
from nonstop.agent.services import AgentServices
from nonstop.app.supervisor import SvcState
from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, main
from nonstop.common import Role
from nonstop.config import AgentConfig, load_agent_config
from nonstop.failover import roles as R

CONFIG = """
[node]
id = "node-a"
priority = 200
key_file = "key"
state_dir = "state"

[[channels]]
name = "lan"
address = "127.0.0.1"

[[peers]]
id = "node-b"
addresses = {{ lan = "127.0.0.2" }}

[[vips]]
address = "10.77.0.100/24"
interface = "lan"

[api]
listen = "127.0.0.1:{port}"

[[services]]
name = "stream"
vip = "10.77.0.100"
port = 7400
command = ["sh", "-c", "test -e {flag} && exit 3; exec sleep 60"]
instances = 2
hook = ["sh", "-c", "echo \\"$*\\" >> {hooks}", "hook"]
backoff = {{ initial_ms = 1, factor = 1.0, jitter = 0.0 }}
crash_loop = {{ deaths = 2, window_ms = 60000 }}
"""


def machine(now: float) -> R.RoleMachine:
    return R.RoleMachine(R.RoleConfig("node-a", 200, False, 0.0, 0.01, 3, False), now=now)


def role_changes(m: R.RoleMachine) -> list[tuple[str, str, str]]:
    out = []
    while (a := m.next_action()) is not None:
        del a
    while (ev := m.next_event()) is not None:
        out.append((str(ev.old), str(ev.new), ev.reason))
    return out


def test_local_faults_withdraw_exactly_the_cleared_cause() -> None:
    m, faults = machine(0.0), LocalFaults()
    m.handle_timer(1.0)
    assert m.role == Role.MASTER
    faults.declare(m, "service stream", "service stream crash loop (5 deaths within 60 s)", 1.1)
    faults.declare(m, "fence guard", "fence guard exited", 1.2)
    assert m.role == Role.FAULT
    role_changes(m)
    assert faults.clear(m, "service stream", "service stream crash loop cleared", 1.3)
    assert m.role == Role.FAULT and m.reason == "fault: fence guard exited"  # it is left
    assert not faults.clear(m, "service stream", "again", 1.4)  # nothing declared: nothing done
    assert role_changes(m) == []
    faults.causes.pop("fence guard")  # (a dead guard never comes back; here, as if it did)
    faults.declare(m, "service stream", "service stream crash loop (5 deaths within 60 s)", 1.5)
    assert faults.clear(m, "service stream", "service stream crash loop cleared", 1.6)
    assert role_changes(m)[0] == (
        "fault", "backup", "recovered from the local fault: service stream crash loop cleared"
    )  # fmt: skip
    assert m.role == Role.MASTER  # alone, the best candidate again: eligible at once


class FakeAgent:
    """The daemon's reset path on real parts; no sockets but the API's, no VIPs. Its pump only
    records the role changes (history and hooks, as the daemon's does)."""

    _local_fault = Agent._local_fault
    _local_fault_cleared = Agent._local_fault_cleared
    _role_changed = Agent._role_changed
    reset_service = Agent.reset_service

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.history: collections.deque[dict] = collections.deque(maxlen=100)
        self.counters: collections.Counter[str] = collections.Counter()
        self.role_hooks: list[tuple[str, str, str]] = []
        self.hooks = types.SimpleNamespace(
            role_changed=lambda old, new, why: self.role_hooks.append((str(old), str(new), why))
        )
        self.roles = machine(time.monotonic() - 1.0)
        self.roles.handle_timer(time.monotonic())  # no peer heard: master
        assert self.roles.role == Role.MASTER
        self.faults = LocalFaults()
        self.services = AgentServices(cfg, self._local_fault, self._local_fault_cleared)

    def _pump(self, now: float) -> None:
        while self.roles.next_action() is not None:
            pass
        while (rc := self.roles.next_event()) is not None:
            self._role_changed(rc)

    def status(self) -> dict:
        return {"node": self.cfg.node.id, "role": str(self.roles.role), "reason": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reset_through_the_cli_and_the_unix_socket(tmp_path: Path, capsys) -> None:
    (tmp_path / "key").write_text("0123456789abcdef0123456789abcdef\n")
    (tmp_path / "key").chmod(0o600)
    flag, hooks, port = tmp_path / "crash", tmp_path / "hooks.log", free_port()
    flag.touch()
    path = tmp_path / "node.toml"
    path.write_text(textwrap.dedent(CONFIG.format(port=port, flag=flag, hooks=hooks)))
    cfg, _ = load_agent_config(str(path))

    async def cli(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = await asyncio.to_thread(main, ["service", "reset", *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    async def run() -> None:
        agent = FakeAgent(cfg)
        sups = {s.config.name: s for s in agent.services.supervisors}
        await agent.services.start()
        for s in sups.values():
            await s.wait_for(SvcState.CRASH_LOOP, timeout=10)
        assert agent.roles.role == Role.FAULT
        assert set(agent.faults.causes) == {"service stream-0", "service stream-1"}
        assert [(h["old"], h["new"]) for h in agent.history] == [
            ("init", "master"), ("master", "fault"),
        ]  # fmt: skip
        api = AgentApi(agent)  # type: ignore[arg-type]
        await api.start()
        sock = cfg.socket_path
        assert (Path(sock).stat().st_mode & 0o777) == 0o660
        try:
            flag.unlink()  # the operator fixed the cause
            rc, out, _ = await cli("stream-0", "--socket", sock, "--format", "json")
            doc = json.loads(out)
            assert rc == EXIT_OK and doc["changed"] is True, doc
            assert doc["instances"] == [
                {"instance": "stream-0", "was": "crash-loop", "cleared": True, "state": "ready"}
            ]
            # the other instance's crash loop still holds the node at fault, and says so
            assert doc["role_before"] == doc["role"] == "fault" and doc["role_changes"] == []
            assert doc["faults"] == ["service stream-1 crash loop (2 deaths within 60 s)"]
            assert doc["reason"] == "fault: service stream-1 crash loop (2 deaths within 60 s)"
            st = agent.services.status()
            assert st["crash_loops"] == ["service stream-1 crash loop (2 deaths within 60 s)"]
            assert st["counters"]["crash_loop_resets"] == 1

            rc, out, _ = await cli("stream", "--config", str(path))  # the service: each one
            assert rc == EXIT_OK
            recovered = (
                "recovered from the local fault: service stream-1 crash loop cleared "
                "(crash loop reset by the operator)"
            )
            assert out.splitlines() == [
                "node-a: stream-0: not in a crash loop (ready), nothing to reset",
                "node-a: stream-1: crash loop cleared, starting again (now ready)",
                f"node-a: role fault -> backup: {recovered}",
                # alone, the best candidate: master again at once (a live master would keep it)
                f"node-a: role backup -> master: {agent.roles.reason}",
            ]
            assert agent.roles.role == Role.MASTER and not agent.faults.causes
            assert agent.role_hooks[-2] == ("fault", "backup", recovered)  # the backup hook
            assert all(s.core.state is SvcState.READY for s in sups.values())

            rc, out, _ = await cli("stream", "--socket", sock, "--format", "json")
            assert rc == EXIT_OK and json.loads(out)["changed"] is False  # idempotent

            rc, _, err = await cli("nope", "--socket", sock)
            assert rc == EXIT_USAGE
            known = "(known: stream, stream-0, stream-1)"
            assert f"no supervised service 'nope' on node-a {known}" in err

            # the TCP listener only reads: no reset there
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
            await asyncio.to_thread(conn.request, "POST", "/services/stream/reset")
            resp = await asyncio.to_thread(conn.getresponse)
            assert resp.status == 404
            conn.close()
        finally:
            await api.close()
            await agent.services.stop()
        rc, out, _ = await cli("stream", "--socket", sock, "--format", "json")
        assert rc == EXIT_FAIL and "cannot reach the agent" in json.loads(out)["error"]

    asyncio.run(run())
    lines = hooks.read_text().splitlines()
    assert "crash-loop stream-1 crash-loop 2 deaths in 60 s" in lines
    assert (
        "crash-loop-cleared stream-1 starting crash loop reset by the operator "
        "(2 deaths forgotten)" in lines
    )


def test_reset_refuses_a_services_file(tmp_path: Path, capsys) -> None:
    svc = tmp_path / "svc.toml"
    svc.write_text("[[service]]\nname = 'x'\ncommand = ['true']\n")
    assert main(["service", "reset", "x", "--config", str(svc)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "a services file: `service reset` acts on a running agent" in err


@pytest.mark.parametrize("fmt", ["pretty", "json"])
def test_reset_without_an_agent(tmp_path: Path, capsys, fmt: str) -> None:
    rc = main(["service", "reset", "x", "--socket", str(tmp_path / "agent.sock"), "--format", fmt])
    out, err = capsys.readouterr()
    assert rc == EXIT_FAIL
    assert "cannot reach the agent at" in (out if fmt == "json" else err)
