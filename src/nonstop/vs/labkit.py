"""Drive fronts and workers inside a lab (nonstop.lab): configs, processes, status, load.

Shared by the netns tests and ``nonstop bench vs`` so both run the front the way an operator does
(``nonstop vs run --config front.toml``) and the workers as real processes in their own hosts.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from typing import TYPE_CHECKING, Any

from nonstop.lab import Topology

if TYPE_CHECKING:
    from nonstop.lab import Lab, LabProcess

CONTROL_PORT = 7800
ADMIN_PORT = 7801
HTTP_PORT = 8080
L4_PORT = 9000
RPC_PORT = 7900
JOURNAL_PORT = 7802
WORKER_HTTP = 8080
WORKER_RPC = 7901
WORKER_SINK = 9001


def vs_topology(
    workers: int = 3,
    fronts: tuple[str, ...] = ("front",),
    witness: bool = False,
    source: str = "<vs>",
) -> Topology:
    """client (lan .1); fronts (.11, .12, on lan and hb); workers w1.. (.21.., lan and hb)."""
    topo = Topology(source=source)
    topo.channel("lan", v4="10.77.0.0/24")
    topo.channel("hb", v4="10.77.1.0/24")
    topo.host("client", channels={"lan": 1})
    for i, f in enumerate(fronts):
        topo.host(f, channels={"lan": 11 + i, "hb": 11 + i})
    if witness:
        topo.host("witness", channels={"lan": 13, "hb": 13})
    for i in range(1, workers + 1):
        topo.host(f"w{i}", channels={"lan": 20 + i, "hb": 20 + i})
    return topo


class VsLab:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.key_path = os.path.join(lab.workdir, "vs.key")
        with open(os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.procs: dict[str, LabProcess] = {}
        self.fronts: list[str] = []
        self.configs: dict[str, str] = {}

    # -- front ----------------------------------------------------------------------------------
    def front_config(
        self,
        host: str,
        *,
        listen: str | None = None,
        policy: str = "round_robin",
        workers: list[str] = (),  # type: ignore[assignment]
        health: str = "tcp",
        rpc: bool = True,
        l4: bool = True,
        extra: str = "",
        heartbeat: bool = True,
        agent: str | None = None,
        journal_peer: str | None = None,
    ) -> str:
        """``agent``: the node agent's service endpoint: the HTTP listener is protected (front
        takeover); ``journal_peer``: the other front's host (both fronts journal on ``hb``)."""
        h = self.lab.host(host)
        addr = listen or h.addr("lan")
        lines = [
            "[front]",
            f'key_file = "{self.key_path}"',
            f'control = "0.0.0.0:{CONTROL_PORT}"',
            f'admin = "0.0.0.0:{ADMIN_PORT}"',
            extra,
        ]
        if journal_peer:
            lines += [
                f'journal_listen = "{h.addr("hb")}:{JOURNAL_PORT}"',
                f'journal_peer = "{self.lab.host(journal_peer).addr("hb")}:{JOURNAL_PORT}"',
            ]
        lines += [
            "",
            "[[listeners]]",
            'name = "web"',
            'mode = "http"',
            f'listen = "{addr}:{HTTP_PORT}"',
            f'policy = "{policy}"',
        ]
        if agent:
            lines.append(f'agent = "{agent}"')
        if l4:
            lines += [
                "[[listeners]]",
                'name = "l4"',
                'mode = "tcp"',
                f'listen = "{addr}:{L4_PORT}"',
                f"worker_port = {WORKER_SINK}",
            ]
        if rpc:
            lines += [
                "[[listeners]]",
                'name = "rpc"',
                'mode = "rpc"',
                f'listen = "{addr}:{RPC_PORT}"',
            ]
        lines += [
            "",
            "[health]",
            f'kind = "{health}"',
            "interval_ms = 200",
            "timeout_ms = 300",
            "",
            "[heartbeat]",
            "dead_ms = 80",
            "drain_timeout_ms = 3000",
            "",
            "[passive]",
            "max_fails = 1",
            "cooldown_ms = 1000",
        ]
        for w in workers:
            wh = self.lab.host(w)
            lines += [
                "",
                "[[workers]]",
                f'id = "{w}"',
                f'addresses = {{ lan = "{wh.addr("lan")}", hb = "{wh.addr("hb")}" }}',
                f"port = {WORKER_HTTP}",
                f"rpc_port = {WORKER_RPC}",
                f"heartbeat = {str(heartbeat).lower()}",
            ]
        path = os.path.join(h.workdir, "front.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.configs[host] = path
        return path

    def start_front(
        self, host: str, config: str | None = None, *, uvloop: bool = False, wait: bool = True
    ) -> LabProcess:
        cfg = config or self.configs.get(host) or self.front_config(host)
        argv = [sys.executable, "-m", "nonstop", "-v", "vs", "run", "--config", cfg]
        if uvloop:
            argv.append("--uvloop")
        p = self.lab.host(host).run(argv, name=f"front-{host}")
        self.procs[f"front-{host}"] = p
        if host not in self.fronts:
            self.fronts.append(host)
        if wait:
            self.wait(lambda: self.status(host) is not None, 10, f"front on {host} up")
        return p

    def status(self, host: str) -> dict[str, Any] | None:
        h = self.lab.host(host)
        try:
            with h.socket() as s:
                s.settimeout(2)
                s.connect((h.addr("lan"), ADMIN_PORT))
                s.sendall(b"GET /status HTTP/1.1\r\nhost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return None
        _, _, body = data.partition(b"\r\n\r\n")
        try:
            return json.loads(body)
        except ValueError:
            return None

    def worker_states(self, host: str) -> dict[str, str]:
        st = self.status(host) or {"workers": []}
        return {w["id"]: w["state"] for w in st["workers"]}

    # -- workers --------------------------------------------------------------------------------
    def start_worker(
        self,
        name: str,
        *,
        fronts: list[str] | None = None,
        register: bool = True,
        wrong: bool = False,
        bad_primary: bool = False,
        wait: bool = True,
    ) -> LabProcess:
        h = self.lab.host(name)
        argv = [
            sys.executable,
            "-m",
            "nonstop",
            "vs",
            "worker",
            "--id",
            name,
            "--http",
            f"0.0.0.0:{WORKER_HTTP}",
            "--rpc-port",
            str(WORKER_RPC),
            "--sink-port",
            str(WORKER_SINK),
            "--channel",
            f"lan={h.addr('lan')}",
            "--channel",
            f"hb={h.addr('hb')}",
            "--key-file",
            self.key_path,
        ]
        if register:
            for f in fronts if fronts is not None else self.fronts:
                fh = self.lab.host(f)
                argv += ["--front", f"lan={fh.addr('lan')},hb={fh.addr('hb')}"]
        if wrong:
            argv.append("--wrong")
        if bad_primary:
            argv.append("--bad-primary")
        p = h.run(argv, name=f"worker-{name}")
        self.procs[name] = p
        if wait:
            self.wait(lambda: "ready" in p.output(), 10, f"worker {name} ready")
        return p

    def wait_states(self, front: str, want: dict[str, str | None], timeout: float = 5.0) -> float:
        """Wait until the front reports these states (None: the worker is gone)."""

        def ok() -> bool:
            st = self.worker_states(front)
            return all(st.get(w) == s for w, s in want.items())

        return self.wait(ok, timeout, f"{front}: workers {want} (now {self.worker_states(front)})")

    @staticmethod
    def wait(pred: Any, timeout: float, what: str, poll: float = 0.02) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if pred():
                return time.monotonic() - t0
            time.sleep(poll)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    # -- load -----------------------------------------------------------------------------------
    def load(
        self,
        kind: str,
        target: str,
        *,
        duration: float,
        conns: int = 16,
        procs: int = 1,
        until_file: str | None = None,
        extra: list[str] | None = None,
        host: str = "client",
    ) -> LabProcess:
        flag = "--url" if kind == "http" else "--addr"
        argv = [
            sys.executable,
            "-m",
            "nonstop.bench.vs",
            kind,
            flag,
            target,
            "--duration",
            str(duration),
            "--conns",
            str(conns),
        ]
        if kind == "http":
            argv += ["--procs", str(procs)]
        if until_file:
            argv += ["--until-file", until_file]
        argv += extra or []
        return self.lab.host(host).run(argv, name=f"load-{kind}", stdout=None)

    @staticmethod
    def result(p: LabProcess, timeout: float = 60) -> dict[str, Any]:
        p.wait(timeout)
        out = p.output().strip().splitlines()
        for line in reversed(out):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"load generator printed no JSON: {out[-5:]}")
