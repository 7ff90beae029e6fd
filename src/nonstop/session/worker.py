"""The session worker: the process that runs a node's protected services for the agent.

Why a process of its own: its NFQUEUE verdicts, sync traffic and app channel would otherwise
share the agent's interpreter (and GIL) with the heartbeats, and a busy stream would delay
failure detection. And why it outlives the agent: when the agent is SIGKILLed the kernel would
close every socket the agent's process held and send the peers a FIN or RST. The worker runs in
its own session (a kill of the agent's process group leaves it), holds a duplicate of every
protected socket, and on the agent's EOF silences them all (repair mode, then close: nothing
reaches the peers, which the new master now serves) and exits.

Control: a SOCK_SEQPACKET socketpair; each message is one msgpack map. The agent sends
``{"op": "init", "services": [...], "key": bytes}`` first, then requests
(``promote`` with ``own`` = restore what this node parked at its last step-down, ``demote``;
both with an optional ``services`` = [names] to act on those only (a store group's services),
``set_backup`` with ``peers`` = per service [host, port] or None,
``status``, ``shutdown``); the worker answers each, in order, with ``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``, except a request with ``"reply": false``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from nonstop.common import LocalProtocolError, raise_fd_limit

log = logging.getLogger("nonstop.session")

_MAX = 1 << 16
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


# ---- the worker process --------------------------------------------------------------------


def serve(sock: socket.socket) -> int:
    from nonstop.session.nfq import remove_rules
    from nonstop.session.service import ProtectedService, ServiceSpec

    init = _dec.decode(sock.recv(_MAX))
    if init.get("op") != "init":
        return 2
    specs = [ServiceSpec(**s) for s in init["services"]]
    services: list[ProtectedService] = []
    try:
        for spec in specs:  # each starts quiet (a backup): its standing rules go in first ...
            services.append(ProtectedService(spec, init["key"]).start())
    except Exception as e:
        sock.send(_enc.encode({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        for svc in services:
            svc.close()
        return 1
    for fam in sorted({s.family for s in specs}):  # ... then every other rule of the clamp's
        # goes: a crashed predecessor's of another queue (they drop everything of VIP:port while
        # nobody is bound: fail closed), an older version's ``:quiet`` DROP rule
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            remove_rules(fam, keep={s.quiet.comment for s in services if s.spec.family == fam})
    for svc in services:  # and the sockets it left: nobody holds them, their 4-tuples would
        # make a later restore of the same connections fail (their RSTs die on the quiet rule)
        if n := svc.quiet.reap(orphans=True):
            log.warning("session worker: %s: %d sockets left by a predecessor aborted",
                        svc.spec.name, n)
    sock.send(_enc.encode({"ok": True, "pid": os.getpid()}))
    try:
        while True:
            try:
                raw = sock.recv(_MAX)
            except OSError:
                raw = b""
            if not raw:  # the agent is gone: silence everything before anyone else can speak
                n = sum(svc.silence(agent_gone=True) for svc in services)
                log.warning("session worker: agent gone, %d connections silenced", n)
                return 0
            req = _dec.decode(raw)
            try:
                reply = _handle(services, req)
            except Exception as e:  # reported to the agent, which decides
                log.exception("session worker: %s failed", req.get("op"))
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            if req.get("reply", True):
                sock.send(_enc.encode(reply))
            if req.get("op") == "shutdown":
                return 0
    finally:
        for svc in services:
            with contextlib.suppress(Exception):
                svc.close()


PROMOTE_PRIORITY = 40  # below the agent (50) and its fence guard (60)


@contextlib.contextmanager
def _urgent() -> Iterator[None]:
    """Run this thread SCHED_FIFO while the connections are restored: every peer waits on it,
    and on a busy node (the peers' traffic, the services) a normal thread gets a fraction of a
    CPU. Only for the restore: the clamp's packet path stays at normal priority, so a traffic
    flood cannot starve the node. Best effort (no privilege: normal priority)."""
    try:
        old = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(PROMOTE_PRIORITY))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, old[0], old[1])


def _handle(services: list[Any], req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    names = req.get("services")  # promote/demote: only these services (a group's), else all
    chosen = services if names is None else [s for s in services if s.spec.name in names]
    if op == "promote":
        own = bool(req.get("own", False))
        with _urgent():
            return {"ok": True, "services": [s.promote(own) for s in chosen]}
    if op == "kick":  # the VIPs answer here now: provoke both ends of what was restored
        return {"ok": True, "kicked": sum(s.kick() for s in chosen)}
    if op == "demote":
        return {"ok": True, "services": [s.demote() for s in chosen]}
    if op == "hush":  # VIPs down while the agent asks the witness (rule 9): nothing leaves
        return {"ok": True, "hushed": sum(s.hush(bool(req.get("on"))) for s in chosen)}
    if op == "set_backup":
        for s, peer in zip(services, req["peers"], strict=True):
            s.set_backup(None if peer is None else (peer[0], int(peer[1])))
        return {"ok": True}
    if op == "status":
        return {"ok": True, "services": [s.status() for s in services]}
    if op == "shutdown":
        n = sum(s.silence() for s in services)
        return {"ok": True, "silenced": n}
    return {"ok": False, "error": f"unknown op {op!r}"}


def _die_with_parent(parent: int) -> bool:
    """PR_SET_PDEATHSIG(SIGKILL); False if ``parent`` is already gone (0: nothing to watch)."""
    if not parent:
        return True
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        log.warning("session worker: PR_SET_PDEATHSIG failed (errno %d)", ctypes.get_errno())
    return os.getppid() == parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nonstop.session.worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, default=0, help="the agent's pid (0: do not watch)")
    ap.add_argument("-v", "--verbose", action="count", default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s session-worker[%(process)d] %(levelname)s %(message)s",
    )
    with contextlib.suppress(OSError):
        os.setsid()  # Ctrl-C at the agent's terminal is the agent's
    raise_fd_limit()  # a socket per protected connection, and the endpoint's duplicates
    # Die with the agent, at once. A master's worker that outlived its agent kept its kernel
    # sending for ~100 ms while the backup took over (it learns of the death from an EOF it
    # reads late on a busy node): segments with bytes the new master never had reached the
    # peer, whose ACKs the new master's kernel then refused forever. Dead, the worker's NFQUEUE
    # rules stay with nobody bound, and they drop everything of VIP:port (fail closed, and the
    # quiet rule of a node that is not master); the next worker keeps them and aborts the
    # orphans.
    if not _die_with_parent(args.parent):
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the agent's; we act on its EOF
    sock = socket.socket(fileno=args.fd)
    return serve(sock)


# ---- the agent's side ----------------------------------------------------------------------


class SessionWorker:
    """The agent's handle on its session worker (blocking calls with a timeout)."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock, self.proc = sock, proc

    @classmethod
    def spawn(
        cls, services: list[dict[str, Any]], key: bytes, *, timeout: float = 10.0,
        verbose: int = 0,
    ) -> SessionWorker:  # fmt: skip
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-m", "nonstop.session.worker", "--fd", str(theirs.fileno()),
               "--parent", str(os.getpid())]  # fmt: skip
        cmd += ["-v"] * verbose
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()])
        theirs.close()
        w = cls(ours, proc)
        try:
            w.call({"op": "init", "services": services, "key": key}, timeout=timeout)
        except BaseException:
            w.close(timeout=1)
            raise
        return w

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, req: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        try:
            self.sock.send(_enc.encode(req))
            raw = self.sock.recv(_MAX)
        except TimeoutError as e:
            op = req["op"]
            raise LocalProtocolError(f"session worker: no answer to {op} in {timeout}s") from e
        except OSError as e:
            raise LocalProtocolError(f"session worker: {req['op']}: {e}") from e
        if not raw:
            raise LocalProtocolError(f"session worker exited during {req['op']}")
        reply = _dec.decode(raw)
        if not reply.get("ok"):
            raise LocalProtocolError(f"session worker: {req['op']}: {reply.get('error')}")
        return reply

    def send(self, req: dict[str, Any]) -> bool:
        """Send without waiting (the agent's loop reads the replies: ``read_replies``). False:
        the worker has not read the earlier requests yet (the socket is full); send it later.
        Never blocks: it used to wait up to a second, and a busy worker held the agent's loop,
        heartbeats and all, a second per request."""
        self.sock.setblocking(False)
        try:
            self.sock.send(_enc.encode(req))
        except BlockingIOError:
            return False
        except OSError as e:
            raise LocalProtocolError(f"session worker: {req['op']}: {e}") from e
        finally:
            self.sock.setblocking(True)
        return True

    def read_replies(self) -> list[dict[str, Any]] | None:
        """Every reply ready now (non-blocking); None at EOF (the worker is gone)."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    raw = self.sock.recv(_MAX)
                except BlockingIOError:
                    return out
                except OSError:
                    return None
                if not raw:
                    return None
                out.append(_dec.decode(raw))
        finally:
            self.sock.setblocking(True)

    def close(self, timeout: float = 3.0) -> int | None:
        """Orderly stop (silences what it holds), then wait; kill if it hangs."""
        with contextlib.suppress(LocalProtocolError, OSError):
            self.call({"op": "shutdown"}, timeout=timeout)
        self.sock.close()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
