"""Drive a nonstop HA group inside a lab: write each node's config and key, start the agents and
the witness as real processes in their hosts, read their status, wait for roles.

Shared by ``make demo``, the netns tests and the benchmarks, so all three exercise the same agent
the way an operator runs it (``nonstop agent --config node.toml``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nonstop.agent.cli import fetch_status

if TYPE_CHECKING:
    from nonstop.lab import Lab, LabProcess

PORT = 7780
# the source tree, for a service run from it (a container mounts it, a process gets PYTHONPATH)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITNESS_PORT = 7790
# Heartbeat timers for lab runs that check what happens to connections, services and routes,
# not how fast a failure is found (the benchmarks measure that, at 10 ms). The 2-CPU VMs this
# runs on freeze as a whole, every namespace at once, the guard and the witness included: a
# SCHED_FIFO 1 ms sleeper on an idle guest woke up to 224 ms late, 16 times over 80 ms in 60 s
# (2026-11-22). The timers must outlast that: a master's guard fences it after
# (dead_after - 1) * interval without a tick, and a lone master steps down when its witness
# lease, (dead_after - 1/2) * interval, lapses. At 50 ms x 3 the CI run of 2026-11-22 lost 7
# tests to fences and lapses no fault had caused; 50 ms x 10 gives 450 ms and 475 ms. A process
# or node that dies is still found at once (its agent link closes) or after 500 ms.
STEADY_TIMERS: dict[str, int] = {"interval_ms": 50, "dead_after": 10}


@dataclass
class ClusterSpec:
    nodes: tuple[str, ...] = ("node-a", "node-b")
    priorities: dict[str, int] = field(default_factory=lambda: {"node-a": 200, "node-b": 100})
    channels: tuple[str, ...] = ("lan", "hb")
    witness: str | None = "witness"  # host name of the witness, None for none
    vip: str = "10.77.0.100/24"
    vip6: str | None = None
    vip_channel: str = "lan"
    interval_ms: int = 10
    dead_after: int = 3
    copies: int = 1
    preempt: bool = True
    preempt_delay_ms: int = 0
    realtime: bool = True
    garp_count: int = 3
    garp_interval_ms: int = 10
    hooks: dict[str, str] = field(default_factory=dict)  # role -> command
    api_port: int | None = 8780
    # protected TCP services: name -> port on the VIP; their session sync runs on sync_channel
    services: dict[str, int] = field(default_factory=dict)
    sync_channel: str = "hb"
    service_family: int = 4  # the services listen on vip (4) or vip6 (6)

    @property
    def service_vip(self) -> str:
        """The address the protected services listen on (``vip`` or ``vip6``, no prefix)."""
        vip = self.vip6 if self.service_family == 6 else self.vip
        if not vip:
            raise ValueError(f"service_family {self.service_family} needs vip6")
        return vip.split("/")[0]


class Cluster:
    def __init__(self, lab: Lab, spec: ClusterSpec | None = None) -> None:
        self.lab = lab
        self.spec = spec or ClusterSpec()
        self.key_path = os.path.join(lab.workdir, "cluster.key")
        with open(os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.procs: dict[str, LabProcess] = {}
        self.config_paths: dict[str, str] = {}
        for n in self.spec.nodes:
            self.config_paths[n] = self._write_node_config(n)
        if self.spec.witness:
            self.config_paths[self.spec.witness] = self._write_witness_config()

    # -- configs ----------------------------------------------------------------------------
    def _write_node_config(self, name: str) -> str:
        s, host = self.spec, self.lab.host(name)
        lines = [
            "[node]",
            f'id = "{name}"',
            f"priority = {s.priorities.get(name, 100)}",
            f'key_file = "{self.key_path}"',
            f'state_dir = "{os.path.join(host.workdir, "state")}"',
            "",
            "[heartbeat]",
            f"interval_ms = {s.interval_ms}",
            f"dead_after = {s.dead_after}",
            f"copies = {s.copies}",
            f"port = {PORT}",
            "",
            "[failover]",
            f"preempt = {str(s.preempt).lower()}",
            f"preempt_delay_ms = {s.preempt_delay_ms}",
            f"realtime = {str(s.realtime).lower()}",
            "",
        ]
        for ch in s.channels:
            lines += ["[[channels]]", f'name = "{ch}"', f'address = "{host.addr(ch)}"', ""]
        for other in s.nodes:
            if other == name:
                continue
            oh = self.lab.host(other)
            addrs = ", ".join(f'{ch} = "{oh.addr(ch)}"' for ch in s.channels)
            lines += ["[[peers]]", f'id = "{other}"', f"addresses = {{ {addrs} }}", ""]
        for vip in (s.vip, s.vip6):
            if vip:
                lines += [
                    "[[vips]]",
                    f'address = "{vip}"',
                    f'interface = "{host.ifname(s.vip_channel)}"',
                    f"garp_count = {s.garp_count}",
                    f"garp_interval_ms = {s.garp_interval_ms}",
                    "",
                ]
        if s.witness:
            wh = self.lab.host(s.witness)
            addrs = ", ".join(f'{ch} = "{wh.addr(ch)}"' for ch in s.channels)
            lines += ["[witness]", f"addresses = {{ {addrs} }}", f"port = {WITNESS_PORT}", ""]
        if s.api_port:
            lines += ["[api]", f'listen = "{host.addr(s.vip_channel)}:{s.api_port}"', ""]
        for svc, port in s.services.items():
            lines += [
                "[[services]]",
                f'name = "{svc}"',
                f'vip = "{s.service_vip}"',
                f"port = {port}",
                f'sync_channel = "{s.sync_channel}"',
                "",
            ]
        if s.hooks:
            lines += ["[hooks]", *(f'{role} = "{cmd}"' for role, cmd in s.hooks.items()), ""]
        path = os.path.join(host.workdir, f"{name}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def _write_witness_config(self) -> str:
        s = self.spec
        assert s.witness
        wh = self.lab.host(s.witness)
        listen = ", ".join(f'"{wh.addr(ch)}:{WITNESS_PORT}"' for ch in s.channels)
        text = (
            f'[witness]\nid = "{s.witness}"\nkey_file = "{self.key_path}"\n'
            f'listen = [{listen}]\nstate_dir = "{os.path.join(wh.workdir, "state")}"\n'
        )
        path = os.path.join(wh.workdir, "witness.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- processes --------------------------------------------------------------------------
    def _log(self, name: str) -> Any:
        return open(os.path.join(self.lab.host(name).workdir, f"{name}.log"), "ab")

    def start_witness(self) -> None:
        w = self.spec.witness
        if w:
            self.procs[w] = self.lab.host(w).run(
                [
                    sys.executable,
                    "-m",
                    "nonstop",
                    "witness",
                    "--config",
                    self.config_paths[w],
                    # the longest lease it grants, also its grace period after a restart
                    "--max-lease-ms",
                    str(max(100, 2 * self.spec.interval_ms * self.spec.dead_after)),
                ],
                stdout=self._log(w),
                stderr=None,
                name="witness",
            )

    def start_agent(self, name: str) -> LabProcess:
        with self._log(name) as out:
            p = self.lab.host(name).run(
                [
                    sys.executable,
                    "-m",
                    "nonstop",
                    "-v",
                    "agent",
                    "--config",
                    self.config_paths[name],
                ],
                stdout=out,
                stderr=out,
                name=f"agent-{name}",
            )
        self.procs[name] = p
        return p

    def endpoint(self, name: str, service: str) -> str:
        """The unix socket a service on node ``name`` talks to its agent through."""
        return os.path.join(self.lab.host(name).workdir, "state", f"{service}.sock")

    def start_stream_service(
        self, name: str, service: str, *, rate: float = 10.0, size: int = 100, tag: str = ""
    ) -> LabProcess:
        """The stream checker's protected server for ``service`` on node ``name`` (a standby on
        a backup: it waits for the connections its node restores). Start the agent first."""
        path = self.endpoint(name, service)
        self.wait(lambda: os.path.exists(path), 10.0, f"{path} to exist", poll=0.02)
        host = self.lab.host(name)
        report = os.path.join(host.workdir, f"{service}{tag}.json")
        return host.run(
            [
                sys.executable, "-m", "nonstop.streams", "protected-server",
                "--host", self.spec.service_vip,
                "--port", str(self.spec.services[service]), "--agent", path,
                "--rate", str(rate), "--size", str(size), "--report", report,
            ],
            name=f"{service}-{name}{tag}",
        )  # fmt: skip

    def wait_serving(self, proc: LabProcess, timeout: float = 10.0) -> None:
        """Until a stream service started by ``start_stream_service`` serves (a standby on a
        backup only does once its node promotes)."""
        proc.wait_output("serving", timeout)

    def start(self) -> None:
        self.start_witness()
        for n in self.spec.nodes:
            self.start_agent(n)

    def log_text(self, name: str) -> str:
        with open(os.path.join(self.lab.host(name).workdir, f"{name}.log"), errors="replace") as f:
            return f.read()

    # -- observation ------------------------------------------------------------------------
    def socket_path(self, name: str) -> str:
        return os.path.join(self.lab.host(name).workdir, "state", "agent.sock")

    def status(self, name: str) -> dict[str, Any] | None:
        try:
            return fetch_status(socket_path=self.socket_path(name))
        except (OSError, ValueError):
            return None

    def role(self, name: str) -> str | None:
        st = self.status(name)
        return None if st is None else st["role"]

    def wait(self, predicate: Any, timeout: float, what: str, poll: float = 0.005) -> float:
        """Poll ``predicate()`` until true; return the monotonic time it became true."""
        end = time.monotonic() + timeout
        while True:
            if predicate():
                return time.monotonic()
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(poll)

    def wait_role(self, name: str, role: str, timeout: float = 5.0) -> float:
        return self.wait(lambda: self.role(name) == role, timeout, f"{name} to be {role}")

    def wait_ready(self, timeout: float = 10.0, settle: float = 0.3) -> str:
        """Wait until exactly one master and every other node backup, unchanged for ``settle``
        seconds; return the master. With preemption on, the master must be the node of
        highest priority (the settled state). (Agents just started on a loaded 2-CPU box may
        stall past a 20 ms fence and hand the role back and forth once: a test that acts on
        the first master seen then acts on a node that is already stepping down.)"""
        want = None
        if self.spec.preempt:
            want = max(self.spec.nodes, key=lambda n: (self.spec.priorities.get(n, 100), n))
        since: list[Any] = [None, 0.0]  # (the roles seen, since when)

        def ready() -> bool:
            roles = [self.role(n) for n in self.spec.nodes]
            now = time.monotonic()
            if roles != since[0]:
                since[:] = [roles, now]
            if want is not None and self.role(want) != "master":
                return False
            good = roles.count("master") == 1 and roles.count("backup") == len(roles) - 1
            return good and now - since[1] >= settle

        self.wait(ready, timeout, "one master and the rest backups", poll=0.02)
        return self.master() or ""

    def master(self) -> str | None:
        masters = [n for n in self.spec.nodes if self.role(n) == "master"]
        return masters[0] if len(masters) == 1 else None

    def vip_holders(self) -> list[str]:
        """Hosts whose lan interface carries the VIP right now (read from the kernel)."""
        ip = self.spec.vip.split("/")[0]
        out = []
        for n in self.spec.nodes:
            r = self.lab.host(n).sh(f"ip -o addr show to {ip}", check=False)
            if ip in r.stdout:
                out.append(n)
        return out

    def history(self, name: str) -> list[dict[str, Any]]:
        st = self.status(name)
        return [] if st is None else st["history"]


class SupervisedCluster(Cluster):
    """A Cluster whose ``[[services]]`` entries carry extra lines (a command, its runtime...)."""

    def __init__(self, lab: Lab, spec: ClusterSpec, extra: dict[str, list[str]]) -> None:
        self.extra = extra
        super().__init__(lab, spec)

    def _write_node_config(self, name: str) -> str:
        path = super()._write_node_config(name)
        with open(path) as f:
            text = f.read()
        for svc, lines in self.extra.items():
            head = f'[[services]]\nname = "{svc}"\n'
            assert head in text
            text = text.replace(head, head + "\n".join(lines) + "\n")
        with open(path, "w") as f:
            f.write(text)
        return path


def service_lines(*, runtime: str = "process", instances: int = 2, rate: float = 50.0,
                  size: int = 100, crash_if: str = "", image: str = "",
                  crash_loop_deaths: int = 1000) -> list[str]:  # fmt: skip
    """The ``[[services]]`` lines running the protected stream server. ``crash_if``: a path; when
    it exists an instance exits at start (status 3), for crash-loop tests."""
    py = sys.executable if runtime == "process" else os.path.realpath(sys.executable)
    argv = [py, "-m", "nonstop.streams", "protected-server", "--host", "{vip}", "--port",
            "{port}", "--agent", "{endpoint}", "--rate", str(rate),
            "--size", str(size)]  # fmt: skip
    if crash_if:
        argv = ["sh", "-c", f'test -e "{crash_if}" && exit 3; exec "$@"', "sh", *argv]
    lines = [
        f"command = {json.dumps(argv)}",
        f'runtime = "{runtime}"',
        f"instances = {instances}",
        "stop_timeout_ms = 2000",
        # SIGKILLs in a row: restart after the same delay every time (no growing backoff):
        # at once when the restart is the takeover (one instance); 250 ms behind a warm
        # standby, whose takeover then has the CPU to itself (a Python start-up is ~0.5 s of
        # CPU, and on 2 CPUs it took it from the takeover of 256 connections) ...
        f"backoff = {{ initial_ms = {1 if instances == 1 else 250}, max_ms = 1000, "
        "factor = 1.0, jitter = 0.0 }",
        # ... and 20 kills in a minute are the test, not a crash loop (unless asked for)
        f"crash_loop = {{ deaths = {crash_loop_deaths}, window_ms = 60000 }}",
    ]
    if runtime != "process":
        lines.append("env = { PYTHONPATH = " + json.dumps(SRC) + " }")
        lines.append(
            f'container = {{ image = "{image}", network = "host", '
            f'volumes = [{json.dumps(SRC + ":" + SRC + ":ro")}] }}'
        )
    else:
        lines.append("env = { PYTHONPATH = " + json.dumps(SRC) + " }")
    return lines


def listener_pid(c: Cluster, node: str, port: int) -> int | None:
    """The pid of the process listening on ``port`` in ``node`` (the active instance)."""
    r = c.lab.host(node).sh(f"ss -Hltnp 'sport = :{port}'", check=False)
    m = re.search(r"pid=(\d+)", r.stdout)
    return int(m.group(1)) if m else None
