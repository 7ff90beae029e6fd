"""Drive fronts and workers inside a lab (nonstop.lab): configs, processes, status, load.

Shared by the netns tests and ``nonstop bench vs`` so both run the front the way an operator does
(``nonstop vs run --config front.toml``) and the workers as real processes in their own hosts.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nonstop
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
CONTAINER_LABEL = "nonstop.vs-lab"  # value: the lab's prefix
_PODMAN = ["podman", "--runtime", "runc"]


@dataclass(eq=False)
class ContainerWorker:
    """A worker running in a podman container (``VsLab.start_container_worker``)."""

    name: str  # the worker's id and lab host
    container: str  # podman's container name
    pid: int | None  # its main process as the host sees it
    log_path: str  # podman's k8s-file log of the container's output

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def leftover_containers(prefix: str) -> list[str]:
    """Names of the containers (any state) labelled with this lab's prefix."""
    r = subprocess.run(
        [*_PODMAN, "ps", "-a", "--filter", f"label={CONTAINER_LABEL}={prefix}",
         "--format", "{{.Names}}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return r.stdout.split()


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
        self.containers: dict[str, ContainerWorker] = {}

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
        argv = [sys.executable, "-m", "nonstop", "vs", "worker"]
        argv += self.worker_args(
            name, fronts=fronts, register=register, wrong=wrong, bad_primary=bad_primary
        )
        p = self.lab.host(name).run(argv, name=f"worker-{name}")
        self.procs[name] = p
        if wait:
            self.wait(lambda: "ready" in p.output(), 10, f"worker {name} ready")
        return p

    def worker_args(
        self,
        name: str,
        *,
        fronts: list[str] | None = None,
        register: bool = True,
        wrong: bool = False,
        bad_primary: bool = False,
    ) -> list[str]:
        """The arguments of ``nonstop vs worker`` for the worker of host ``name``."""
        h = self.lab.host(name)
        argv = [
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
        return argv

    # -- workers in podman containers -----------------------------------------------------------
    def start_container_worker(
        self,
        name: str,
        *,
        image: str | None = None,
        fronts: list[str] | None = None,
        wrong: bool = False,
        wait: bool = True,
        timeout: float = 30.0,
    ) -> ContainerWorker:
        """Run host ``name``'s worker (the same ``nonstop vs worker``) in a podman container that
        joins the host's network namespace (``--network ns:/run/netns/<ns>``), through the
        application manager's PodmanRuntime (runc, nofile 20000). The image is the local Python
        base image (built once, cached); the code, the venv's packages and the key file are
        bind-mounted read-only. Remove them with ``remove_containers()`` (also at exit)."""
        import asyncio

        from nonstop.app.runtime.container import PodmanRuntime, ensure_python_image
        from nonstop.app.runtime.spec import ContainerConfig, ServiceConfig

        image = image or ensure_python_image()
        h = self.lab.host(name)
        src = os.path.dirname(os.path.dirname(os.path.abspath(nonstop.__file__)))
        purelib = sysconfig.get_paths()["purelib"]  # the venv's: pyroute2, rich... (the CLI)
        mounts = dict.fromkeys([src, purelib, self.key_path])
        args = self.worker_args(name, fronts=fronts, wrong=wrong)
        svc = ServiceConfig(
            name=f"vs-{self.lab.prefix}-{name}",
            command=["/usr/bin/python3", "-m", "nonstop", "vs", "worker", *args],
            runtime="podman",
            env={"PYTHONPATH": f"{src}:{purelib}", "PYTHONUNBUFFERED": "1"},
            container=ContainerConfig(
                image=image,
                network=f"ns:/run/netns/{h.ns}",
                volumes=[f"{m}:{m}:ro" for m in mounts],
                extra_args=["--label", f"{CONTAINER_LABEL}={self.lab.prefix}"],
            ),
        )
        log_dir = os.path.join(h.workdir, "containers")
        if not self.containers:
            atexit.register(self.remove_containers)
        log_path = os.path.join(log_dir, svc.name + ".log")
        cw = ContainerWorker(name, svc.container_name, None, log_path)
        self.containers[name] = cw  # before the launch: a half-started one is removed too
        inst = asyncio.run(PodmanRuntime().launch(svc, log_dir))
        cw.pid = inst.pid
        if wait:
            self.wait(lambda: "ready" in cw.output(), timeout, f"container worker {name} ready",
                      poll=0.05)  # fmt: skip
        return cw

    def kill_container(self, name: str, sig: str = "KILL") -> None:
        """``podman kill --signal SIG`` the container of worker ``name``."""
        cw = self.containers[name]
        r = subprocess.run(
            [*_PODMAN, "kill", "--signal", sig, cw.container], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise RuntimeError(f"podman kill {cw.container}: {r.stderr.strip()[-200:]}")

    def container_state(self, name: str) -> str:
        """podman's state of worker ``name``'s container (running, exited, ...; "" if none)."""
        r = subprocess.run(
            [*_PODMAN, "inspect", "--format", "{{.State.Status}}", self.containers[name].container],
            capture_output=True,
            text=True,
        )
        return r.stdout.strip() if r.returncode == 0 else ""

    def remove_containers(self) -> list[str]:
        """Remove every container this VsLab started (idempotent); the names still there after."""
        names = [c.container for c in self.containers.values()]
        if names:
            subprocess.run([*_PODMAN, "rm", "-f", "-t", "0", "--ignore", *names],
                           capture_output=True, timeout=120)  # fmt: skip
        return leftover_containers(self.lab.prefix)

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
