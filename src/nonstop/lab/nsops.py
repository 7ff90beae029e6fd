"""Kernel-side helpers of the lab: namespaces, sysctls, commands inside a namespace, state files.

Nothing here touches the root namespace's links, addresses, routes or firewall: namespaces are
created and removed by name, sysctls are written from a short-lived thread that has joined the
target namespace (``/proc/sys/net`` follows the calling thread's namespace), and commands run
through ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
STATE_DIR = Path(os.environ.get("NONSTOP_LAB_STATE_DIR", "/run/nonstop-lab"))

_libc = ctypes.CDLL(None, use_errno=True)

# Per-namespace sysctls of every lab host (see README section in lab/__init__.py):
HOST_SYSCTLS = {
    # IPv6 addresses usable at once: no duplicate address detection, no router solicitations.
    "ipv6/conf/all/accept_dad": "0",
    "ipv6/conf/default/accept_dad": "0",
    "ipv6/conf/all/accept_ra": "0",
    "ipv6/conf/default/accept_ra": "0",
    # Keep IPv6 addresses when a link goes admin-down (IPv4 keeps them anyway).
    "ipv6/conf/all/keep_addr_on_down": "1",
    "ipv6/conf/default/keep_addr_on_down": "1",
    # Gratuitous ARP when a link comes up or its address changes.
    "ipv4/conf/all/arp_notify": "1",
    "ipv4/conf/default/arp_notify": "1",
    # No ARP flux between a host's channels: answer only for addresses on the asking interface,
    # and source ARP requests from the address of the outgoing interface (usual for VIP hosts).
    "ipv4/conf/all/arp_ignore": "1",
    "ipv4/conf/all/arp_announce": "2",
    # Unprivileged ICMP echo sockets (SOCK_DGRAM) for everyone: LabHost.ping uses them.
    "ipv4/ping_group_range": "0 2147483647",
}
SWITCH_SYSCTLS = {
    # The switch namespace only bridges frames: it has no addresses and sends nothing itself.
    "ipv6/conf/all/disable_ipv6": "1",
    "ipv6/conf/default/disable_ipv6": "1",
}


def ns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
_rundir_ready = False


def _prepare_rundir() -> None:
    """Make /run/netns a shared mount point, as ``ip netns add`` does, so namespace bind mounts
    propagate to every mount namespace."""
    global _rundir_ready
    if _rundir_ready:
        return
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    d = bytes(NETNS_DIR)
    if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
        if _libc.mount(d, d, b"none", MS_BIND | MS_REC, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount --bind {NETNS_DIR}: {os.strerror(err)}")
        if _libc.mount(b"", d, b"none", MS_SHARED | MS_REC, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount --make-rshared {NETNS_DIR}: {os.strerror(err)}")
    _rundir_ready = True


def _create_here(path: bytes) -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
    if _libc.mount(b"/proc/thread-self/ns/net", path, b"none", MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {path!r}: {os.strerror(err)}")


def create_ns(name: str) -> None:
    """Create ``/run/netns/<name>``: a short-lived thread unshares its network namespace and
    bind-mounts it there (no fork: ~0.3 ms instead of ~10 ms for pyroute2's netns.create)."""
    _prepare_rundir()
    path = NETNS_DIR / name
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)  # EEXIST if taken
    os.close(fd)
    box: dict[str, BaseException] = {}

    def body() -> None:
        try:
            _create_here(bytes(path))
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-create-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        with contextlib.suppress(OSError):
            path.unlink()
        raise box["error"]


def remove_ns(name: str) -> bool:
    """Unmount and unlink ``/run/netns/<name>``; False when it was not there."""
    if not ns_exists(name):
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def in_netns(name: str, fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh thread that has joined namespace ``name``; return its result.

    Only that thread changes namespace, and it ends right after, so the caller never moves.
    """
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), name)
            finally:
                os.close(fd)
            box["result"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _netlink_fd() -> int:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0).detach()  # NETLINK_ROUTE


def open_iproute(ns: str) -> IPRoute:
    """An IPRoute whose netlink socket lives in ``ns`` (~1 ms; ``IPRoute(netns=...)`` forks a
    helper to make the socket and takes ~4 ms). Never creates a missing namespace."""
    return IPRoute(fileno=in_netns(ns, _netlink_fd))


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        with open(f"/proc/sys/net/{key}", "w") as f:
            f.write(value)


def set_sysctls(ns: str, values: dict[str, str]) -> None:
    in_netns(ns, _write_sysctls, values)


def ns_argv(ns: str, argv: list[str]) -> list[str]:
    """argv that runs ``argv`` inside ``ns`` (``ip netns exec`` execs it: same pid, and /sys
    shows the namespace's own interfaces)."""
    return ["ip", "netns", "exec", ns, *argv]


def ns_run(
    ns: str, argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ns_argv(ns, argv), input=input, text=True, capture_output=True, check=check, timeout=timeout
    )


def pids_in(namespaces: list[str]) -> list[int]:
    """Every pid whose network namespace is one of ``namespaces`` (as ``ip netns pids``),
    never our own."""
    wanted = set(namespaces)
    me = os.getpid()
    try:
        by_ns = pr_netns.ns_pids()
    except OSError:
        return []
    return sorted(p for n, pids in by_ns.items() if n in wanted for p in pids if p != me)


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (guards against pid reuse); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":
        return None  # a zombie is dead for our purposes
    return int(fields[19])


def pid_alive(pid: int | None, start: int | None) -> bool:
    if pid is None:
        return False
    now = proc_start_time(pid)
    return now is not None and (start is None or now == start)


def kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: list[int], timeout: float = 2.0) -> list[int]:
    """Wait until none of ``pids`` exists (zombies count as gone); return those still there."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left:
        left = [p for p in left if proc_start_time(p) is not None]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.005)
    return left


# -- state files ------------------------------------------------------------------------------


def state_path(prefix: str, state_dir: Path | None = None) -> Path:
    return (state_dir or STATE_DIR) / f"{prefix}.json"


def write_state(state: dict[str, Any], state_dir: Path | None = None) -> None:
    d = state_dir or STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = state_path(state["prefix"], d)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def read_states(state_dir: Path | None = None) -> list[dict[str, Any]]:
    d = state_dir or STATE_DIR
    out = []
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # half-written by a dying owner: its namespaces carry its prefix anyway
        if isinstance(state, dict) and isinstance(state.get("prefix"), str):
            out.append(state)
    return out


def read_state(prefix: str, state_dir: Path | None = None) -> dict[str, Any] | None:
    try:
        state = json.loads(state_path(prefix, state_dir).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def remove_state(prefix: str, state_dir: Path | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(prefix, state_dir).unlink()


def teardown_state(state: dict[str, Any], state_dir: Path | None = None) -> list[str]:
    """Remove everything a state file lists: processes, namespaces, workdir, the file itself.

    Never raises; returns a list of problems (empty when all went well). Used by ``Lab.down`` and
    for labs whose owner died.
    """
    problems: list[str] = []
    namespaces = [n for n in state.get("namespaces", []) if isinstance(n, str)]
    victims = [
        int(p["pid"])
        for p in state.get("processes", [])
        if isinstance(p, dict) and pid_alive(p.get("pid"), p.get("start"))
    ]
    for _ in range(3):  # a process may fork while we kill: look again
        victims = sorted(set(victims) | set(pids_in(namespaces)))
        if not victims:
            break
        kill_pids(victims)
        victims = wait_gone(victims)
    if victims:
        problems.append(f"pids still alive: {victims}")
    for ns in namespaces:
        try:
            remove_ns(ns)
        except OSError as e:
            problems.append(f"netns {ns}: {e}")
    workdir = state.get("workdir")
    if isinstance(workdir, str) and workdir and os.path.isdir(workdir):
        shutil.rmtree(workdir, ignore_errors=True)
    if not problems:
        remove_state(state["prefix"], state_dir)
    return problems
