"""The lab: builds a Topology out of network namespaces, veths and bridges, runs processes in it,
injects faults, and always tears everything down again.

Layout of a lab with prefix ``P``: one switch namespace ``P-sw`` holding one bridge per channel
(named after the channel), and one namespace ``P-<host>`` per host. A host joins a channel through
a veth whose host end is named after the channel (``lan``) and whose switch end (``h<i>-lan``) is
a port of that channel's bridge. Nothing is created in the root namespace.

Teardown runs from ``Lab.__exit__``, from ``atexit`` and from SIGINT/SIGTERM handlers (installed
only over default handlers, then chained). Each lab is recorded in ``/run/nonstop-lab/P.json``
with its owner's pid, so a lab whose owner was SIGKILLed is removed by ``Lab.sweep_stale()`` or
``nonstop lab down``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from nonstop.lab import nsops
from nonstop.lab.faults import Fault, Rule, apply_rules, new_tag, tbf_burst
from nonstop.lab.host import LabError, LabHost
from nonstop.lab.process import LabProcess
from nonstop.lab.topology import Topology

log = logging.getLogger(__name__)

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_CPU_HOG = (
    "import os, sys\n"
    "for _ in range(int(sys.argv[1]) - 1):\n"
    "    if os.fork() == 0:\n"
    "        break\n"
    "while True:\n"
    "    pass\n"
)


# -- teardown hooks -------------------------------------------------------------------------------

_LIVE: dict[str, Lab] = {}
_HOOK_LOCK = threading.Lock()
_PREV_HANDLERS: dict[int, Any] = {}
_hooks_installed = False


def _down_all_live() -> None:
    for lab in list(_LIVE.values()):
        if lab.owner_pid == os.getpid():  # never from a forked child
            lab.down()


def _on_signal(signum: int, frame: Any) -> None:
    _down_all_live()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)  # e.g. default_int_handler -> KeyboardInterrupt
    elif prev != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed
    with _HOOK_LOCK:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_down_all_live)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            prev = signal.getsignal(sig)
            if prev in (signal.SIG_DFL, signal.default_int_handler):
                _PREV_HANDLERS[sig] = prev
                signal.signal(sig, _on_signal)


# -- the lab --------------------------------------------------------------------------------------


class Lab:
    """A running topology. Use as a context manager, or call up() and down() yourself."""

    def __init__(
        self,
        topology: Topology,
        prefix: str | None = None,
        *,
        state_dir: str | Path | None = None,
        workdir_root: str | Path | None = None,
    ) -> None:
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise LabError(f"prefix {prefix!r} must match [a-z][a-z0-9]{{0,7}}")
        self.topology = topology
        self._want_prefix = prefix
        self.prefix = prefix or ""
        self.state_dir = Path(state_dir) if state_dir else nsops.STATE_DIR
        self._workdir_root = str(workdir_root) if workdir_root else None
        self.workdir = Path()
        self.hosts: dict[str, LabHost] = {}
        self.processes: list[LabProcess] = []
        self.faults: list[Fault] = []
        self.owner_pid: int | None = os.getpid()
        self.build_seconds: float | None = None
        self.down_seconds: float | None = None
        self._sw: IPRoute | None = None
        self._state_lock = threading.Lock()
        self._is_up = False
        self._is_down = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns, *(f"{self.prefix}-{h}" for h in self.topology.hosts)]

    def _choose_prefix(self) -> str:
        taken = {s["prefix"] for s in nsops.read_states(self.state_dir)}
        existing = set(pr_netns.listnetns())
        for _ in range(100):
            p = self._want_prefix or f"ns{secrets.token_hex(2)}"
            clash = p in taken or any(n.startswith(p + "-") for n in existing)
            if not clash:
                return p
            if self._want_prefix:
                raise LabError(f"a lab with prefix {p!r} exists (nonstop lab down --prefix {p})")
        raise LabError("no free random prefix")

    def up(self) -> Lab:
        if self._is_up or self._is_down:
            raise LabError("a Lab object is built once; make a new one")
        t0 = time.perf_counter()
        self.prefix = self._choose_prefix()
        root = self._workdir_root or tempfile.gettempdir()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"nonstop-lab-{self.prefix}-", dir=root))
        self.hosts = {h: LabHost(self, h) for h in self.topology.hosts}
        _LIVE[self.prefix] = self
        _install_hooks()
        self._is_up = True
        try:
            self._save_state("building")  # first, so a crash mid-build is still recorded
            for h in self.hosts.values():
                h.workdir.mkdir()
            self._build()
            self._save_state("up")
        except BaseException:
            self.down()
            raise
        self.build_seconds = time.perf_counter() - t0
        log.info("lab %s up in %.3f s", self.prefix, self.build_seconds)
        return self

    def _build(self) -> None:
        topo = self.topology
        for ns in self.namespaces:
            nsops.create_ns(ns)
        nsops.set_sysctls(self.switch_ns, nsops.SWITCH_SYSCTLS)
        for h in self.hosts.values():
            nsops.set_sysctls(h.ns, nsops.HOST_SYSCTLS)
        sw = self._sw = nsops.open_iproute(self.switch_ns)
        sw.link("set", index=1, state="up")  # lo is always index 1
        bridges: dict[str, int] = {}
        for ch in topo.channels:
            sw.link(
                "add", ifname=ch, kind="bridge", br_mcast_snooping=0, br_forward_delay=0, state="up"
            )
            bridges[ch] = sw.link("get", ifname=ch)[0]["index"]
        for h in self.hosts.values():
            for ch in h.channels:
                port = topo.switch_port(h.name, ch)
                peer = {"ifname": ch, "net_ns_fd": h.ns, "address": topo.mac(h.name, ch)}
                sw.link("add", ifname=port, kind="veth", peer=peer, master=bridges[ch], state="up")
        for h in self.hosts.values():
            ipr = h.iproute()
            ipr.link("set", index=1, state="up")
            for ch in h.channels:
                idx = h._index(ch)
                net4, net6 = topo.channels[ch].v4, topo.channels[ch].v6
                if net4 is not None:
                    ipr.addr("add", index=idx, address=h.addr(ch), prefixlen=net4.prefixlen)
                if net6 is not None:
                    ipr.addr("add", index=idx, address=h.addr6(ch), prefixlen=net6.prefixlen)
                ipr.link("set", index=idx, state="up")

    def down(self) -> list[str]:
        """Kill every process, delete the namespaces and the workdir. Idempotent; never raises.
        Returns the problems met (empty when everything went)."""
        if self._is_down or not self._is_up:
            self._is_down = True
            return []
        self._is_down = True
        t0 = time.perf_counter()
        problems: list[str] = []
        try:
            for f in self.faults:
                f.discard()
            for p in self.processes:
                p.kill()
            for h in self.hosts.values():
                h.close()
            if self._sw is not None:
                with contextlib.suppress(Exception):
                    self._sw.close()
                self._sw = None
            problems = nsops.teardown_state(self._state_dict("down"), self.state_dir)
            for p in self.processes:
                p.reap()
            if self.workdir.parts and self.workdir.is_dir():
                shutil.rmtree(self.workdir, ignore_errors=True)
        except BaseException as e:  # never raise from teardown; report instead
            problems.append(f"teardown: {e!r}")
        finally:
            _LIVE.pop(self.prefix, None)
        if problems:
            log.warning("lab %s teardown left: %s", self.prefix, "; ".join(problems))
        self.down_seconds = time.perf_counter() - t0
        return problems

    def detach(self) -> None:
        """Leave the lab up after this process exits (owner recorded as none): the CLI's
        ``lab up``. Tracked processes are forgotten, not killed."""
        self.owner_pid = None
        _LIVE.pop(self.prefix, None)
        for h in self.hosts.values():
            h.close()
        if self._sw is not None:
            self._sw.close()
            self._sw = None
        self._save_state("up")
        self._is_down = True  # this object no longer manages it

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- state file -----------------------------------------------------------------------------

    def _state_dict(self, status: str) -> dict[str, Any]:
        owner = self.owner_pid
        return {
            "version": 1,
            "prefix": self.prefix,
            "status": status,
            "owner": None
            if owner is None
            else {"pid": owner, "start": nsops.proc_start_time(owner), "argv": sys.argv[:4]},
            "created": time.time(),
            "workdir": str(self.workdir),
            "switch": self.switch_ns,
            "namespaces": self.namespaces,
            "hosts": {h.name: h.ns for h in self.hosts.values()},
            "topology": self.topology.to_dict(),
            "processes": [
                {"name": p.name, "host": p.host, "pid": p.pid, "start": p.start, "argv": p.argv}
                for p in self.processes
            ],
        }

    def _save_state(self, status: str) -> None:
        with self._state_lock:
            nsops.write_state(self._state_dict(status), self.state_dir)

    # -- hosts and processes --------------------------------------------------------------------

    def host(self, name: str) -> LabHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in lab {self.prefix}") from None

    def _host(self, h: str | LabHost) -> LabHost:
        return h if isinstance(h, LabHost) else self.host(h)

    def _start(
        self,
        h: LabHost,
        argv: list[str],
        env: dict[str, str] | None,
        stdout: Any,
        stderr: Any,
        name: str | None,
        cwd: str | Path | None,
    ) -> LabProcess:
        if not self._is_up or self._is_down:
            raise LabError("the lab is not up")
        base = name or os.path.basename(argv[0])
        taken = {p.name for p in self.processes}
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        log_path = None
        log_file = None
        if stdout is None:
            log_path = h.workdir / f"{name}.log"
            log_file = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            stdout = log_file
            stderr = subprocess.STDOUT if stderr is None else stderr
        full_env = None if env is None else {**os.environ, **env}
        try:
            popen = subprocess.Popen(
                h.ns_argv(argv),
                env=full_env,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                cwd=str(cwd or h.workdir),
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        proc = LabProcess(name, h.name, argv, popen, log_path, nsops.proc_start_time(popen.pid))
        self.processes.append(proc)
        self._save_state("up")
        return proc

    # -- faults ---------------------------------------------------------------------------------

    def _port_state(self, h: LabHost, channel: str, state: str) -> None:
        if self._sw is None:
            raise LabError("the lab is not up")
        port = self.topology.switch_port(h.name, channel)
        self._sw.link("set", ifname=port, state=state)

    def _track(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def link_down(self, host: str | LabHost, channel: str) -> Fault:
        """Cut one link on the switch side (the cable is pulled; the host keeps its config and
        sees NO-CARRIER). ``heal()`` or ``link_up`` restores it."""
        h = self._host(host)
        h._check(channel)
        self._port_state(h, channel, "down")
        return self._track(
            Fault(
                "link_down",
                f"{h.name}/{channel} down",
                lambda: self._port_state(h, channel, "up") if not self._is_down else None,
            )
        )

    def link_up(self, host: str | LabHost, channel: str) -> None:
        """Bring the link up on both ends (also after someone set the host end down)."""
        h = self._host(host)
        h._check(channel)
        self._port_state(h, channel, "up")
        h.iproute().link("set", index=h._index(channel), state="up")
        for f in self.faults:
            if f.kind == "link_down" and f.description == f"{h.name}/{channel} down":
                f.discard()

    def isolate(self, host: str | LabHost) -> Fault:
        """Every link of ``host`` down: the node is gone for everyone, its processes still run."""
        h = self._host(host)
        for ch in h.channels:
            self._port_state(h, ch, "down")

        def undo() -> None:
            if not self._is_down:
                for ch in h.channels:
                    self._port_state(h, ch, "up")

        return self._track(Fault("isolate", f"{h.name} isolated", undo))

    def _rules_fault(self, kind: str, desc: str, rules: dict[str, list[Rule]]) -> Fault:
        tag = new_tag()
        done: list[str] = []
        try:
            for ns, rs in rules.items():
                apply_rules(ns, rs, tag, add=True)
                done.append(ns)
        except BaseException:
            for ns in done:
                apply_rules(ns, rules[ns], tag, add=False)
            raise

        def undo() -> None:
            if not self._is_down:
                for ns, rs in rules.items():
                    apply_rules(ns, rs, tag, add=False)

        return self._track(Fault(kind, desc, undo))

    def partition(
        self, a: str | LabHost, b: str | LabHost, channels: list[str] | None = None
    ) -> Fault:
        """Drop all IP traffic between ``a`` and ``b`` on ``channels`` (None: every channel they
        share), both directions, in both hosts: by the peer's addresses and by its MAC (so a VIP
        or multicast from the peer is dropped too). ARP still passes."""
        ha, hb = self._host(a), self._host(b)
        shared = [c for c in ha.channels if c in hb.channels]
        chans = shared if channels is None else list(channels)
        for c in chans:
            if c not in shared:
                raise LabError(f"{ha.name} and {hb.name} do not share channel {c!r}")
        if not chans:
            raise LabError(f"{ha.name} and {hb.name} share no channel")
        rules: dict[str, list[Rule]] = {}
        for me, other in ((ha, hb), (hb, ha)):
            rs: list[Rule] = []
            for c in chans:
                mac = other.mac(c)
                for fam, addr in ((4, self.topology.addr(other.name, c)), (6, other.addr6(c))):
                    rs.append(Rule(fam, "INPUT", ("-i", c, "-m", "mac", "--mac-source", mac)))
                    if addr is not None:
                        rs.append(Rule(fam, "INPUT", ("-i", c, "-s", addr)))
                        rs.append(Rule(fam, "OUTPUT", ("-o", c, "-d", addr)))
            rules[me.ns] = rs
        desc = f"{ha.name} x {hb.name} on {','.join(chans)}"
        return self._rules_fault("partition", desc, rules)

    def loss(self, host: str | LabHost, channel: str, percent: float) -> Fault:
        """Drop ``percent`` % of the packets arriving on the host's ``channel`` interface."""
        h = self._host(host)
        h._check(channel)
        if not 0 <= percent <= 100:
            raise LabError(f"loss percent {percent} not in 0..100")
        match: tuple[str, ...] = ("-i", channel)
        if percent < 100:
            p = f"{percent / 100:.6f}"
            match += ("-m", "statistic", "--mode", "random", "--probability", p)
        rules = [Rule(4, "INPUT", match), Rule(6, "INPUT", match)] if percent > 0 else []
        return self._rules_fault("loss", f"{h.name}/{channel} {percent}% loss", {h.ns: rules})

    def rate(
        self, host: str | LabHost, channel: str, rate: str = "1gbit", *, latency: str = "50ms"
    ) -> Fault:
        """Limit what the host sends on ``channel`` to ``rate`` with a tbf root qdisc."""
        h = self._host(host)
        h._check(channel)
        burst = tbf_burst(rate)
        argv = ["tc", "qdisc", "replace", "dev", channel, "root", "tbf", "rate", rate]
        nsops.ns_run(h.ns, [*argv, "burst", str(burst), "latency", latency])

        def undo() -> None:
            if not self._is_down:
                nsops.ns_run(h.ns, ["tc", "qdisc", "del", "dev", channel, "root"], check=False)

        return self._track(Fault("rate", f"{h.name}/{channel} {rate}", undo))

    def cpu_hog(self, host: str | LabHost, workers: int = 1) -> LabProcess:
        """``workers`` busy-looping Python processes in ``host`` (one process group)."""
        h = self._host(host)
        return h.run([sys.executable, "-c", _CPU_HOG, str(max(1, workers))], name="cpu-hog")

    # -- labs on this machine -------------------------------------------------------------------

    @staticmethod
    def states(state_dir: str | Path | None = None) -> list[dict[str, Any]]:
        return nsops.read_states(Path(state_dir) if state_dir else None)

    @staticmethod
    def owner_alive(state: dict[str, Any]) -> bool | None:
        """True/False for an owned lab, None for a detached one."""
        owner = state.get("owner")
        if not isinstance(owner, dict):
            return None
        return nsops.pid_alive(owner.get("pid"), owner.get("start"))

    @staticmethod
    def sweep_stale(state_dir: str | Path | None = None) -> list[str]:
        """Remove every lab whose owner process is dead; return their prefixes.
        Detached labs (``nonstop lab up``) are left alone."""
        removed = []
        for state in Lab.states(state_dir):
            if Lab.owner_alive(state) is False and state["prefix"] not in _LIVE:
                nsops.teardown_state(state, Path(state_dir) if state_dir else None)
                removed.append(state["prefix"])
        return removed

    @staticmethod
    def remove(prefix: str, state_dir: str | Path | None = None) -> list[str]:
        """Tear down lab ``prefix`` whoever owns it; returns the problems met.
        Raises LabError if no such lab is recorded."""
        if prefix in _LIVE:
            return _LIVE[prefix].down()
        for state in Lab.states(state_dir):
            if state["prefix"] == prefix:
                return nsops.teardown_state(state, Path(state_dir) if state_dir else None)
        raise LabError(f"no lab with prefix {prefix!r}")
