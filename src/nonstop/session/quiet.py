"""The quiet rule: a node that does not serve VIP:port lets no segment from it leave.

While a node is backup (and after it stepped down) every connection it parked or holds is in
repair mode or disconnected, and so silent. A socket the session worker never heard of is not:
a connection the service accepted but had not yet registered when the node stepped down, a
service that closes what it still has. One FIN or RST from such a socket would reset a peer that
the new master now serves. So, on every node that is not the master::

    iptables -I OUTPUT -p tcp -s VIP --sport PORT \
        -m comment --comment nonstop-ackclamp:quiet -j DROP

added when the worker takes the backup side and removed at promotion, while the restored
sockets are built in repair mode: gone before they leave it (their first segments must leave).
The comment shares the ACK clamp's prefix; a new worker adds its own quiet rule first, then
clears a crashed worker's clamp rules (``nfq.remove_rules(keep_quiet=True)``). The rule stays
when the agent dies (the node is not master any more: keeping it is the point) and goes on a
graceful stop. A master killed outright (agent and worker at once) installs nothing: its clamp
rule, left behind with nobody bound to the queue, drops every segment of VIP:port (no
``--queue-bypass``), which is as quiet.
"""

from __future__ import annotations

import subprocess
import threading

from nonstop.session.nfq import COMMENT


class QuietRule:
    def __init__(self, vip: str, port: int, family: int) -> None:
        self.vip, self.port = vip, port
        self.cmd = "iptables" if family == 4 else "ip6tables"
        self._pending: subprocess.Popen[bytes] | None = None  # a deletion under way
        self._first: subprocess.Popen[bytes] | None = None  # the removal's first deletion
        # the removal may finish on another thread (``finish_in_background``): an ``add`` must
        # never run while a deletion is under way, or that deletion takes the new copy out
        self._lock = threading.RLock()

    def spec(self) -> list[str]:
        return ["-p", "tcp", "-s", self.vip, "--sport", str(self.port),
                "-m", "comment", "--comment", f"{COMMENT}:quiet", "-j", "DROP"]  # fmt: skip

    def _run(self, op: str) -> bool:
        r = subprocess.run([self.cmd, "-w", op, "OUTPUT", *self.spec()], capture_output=True)
        return r.returncode == 0

    def add(self) -> None:
        """Install it (once: an existing copy is kept). Raises CalledProcessError on failure."""
        with self._lock:
            self.wait()
            if not self._run("-C"):
                subprocess.run([self.cmd, "-w", "-I", "OUTPUT", *self.spec()], check=True,
                               capture_output=True)  # fmt: skip

    def start_removal(self) -> None:
        """Begin deleting every copy in the background (the caller prepares the restore
        meanwhile); ``lifted()`` before anything must leave. A child process, not a thread: the
        promotion runs at real-time priority, and a normal thread that wants the GIL back in the
        middle of the restore (to read a pipe, to reap its child) stalls it for milliseconds."""
        with self._lock:
            self.wait()
            self._pending = self._first = self._spawn("-D")

    def _spawn(self, op: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.cmd, "-w", op, "OUTPUT", *self.spec()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def lifted(self) -> None:
        """Until the background removal deleted the first copy (or found none). ``add`` keeps
        one copy, so that is the rule gone. Looking for a second copy (the same ~7 ms again) is
        left to ``wait``, off the promotion's critical path: even spawning it cost 11 ms once
        (vfork waits for the child's exec, and the child waits for a CPU on a busy node)."""
        with self._lock:
            p, self._first = self._first, None
            if p is not None and p is self._pending and p.wait() != 0:
                self._pending = None  # none was there: nothing more to look for

    def wait(self) -> None:
        """Until the background removal is over (every copy deleted)."""
        with self._lock:
            while (p := self._pending) is not None:
                self._pending = self._spawn("-D") if p.wait() == 0 else None

    def finish_in_background(self) -> None:
        """``wait`` on a thread of its own (after a promotion: the worker reads the agent's next
        request meanwhile); ``add``, ``remove`` and a new removal wait for it."""
        if self._pending is not None:
            threading.Thread(target=self.wait, name="nonstop-quiet", daemon=True).start()

    def remove(self) -> None:
        with self._lock:
            self.wait()
            while self._run("-D"):
                pass

    def reap(self, *, orphans: bool = False) -> int:
        """Abort every established socket of VIP:port on this node (SOCK_DESTROY, ``ss -K``):
        call with the rule in place, so their RSTs die here. A socket the session worker never
        held (accepted, not yet registered, at a step-down) would otherwise keep its 4-tuple
        and make a later restore of it fail with EADDRNOTAVAIL. ``orphans``: every state but
        listening and time-wait too (what a killed worker and service left closing). Returns
        how many (best effort: 0 if ss cannot)."""
        src = f"[{self.vip}]" if ":" in self.vip else self.vip
        states = ["state", "established"]
        if orphans:
            for st in ("syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack",
                       "closing"):  # fmt: skip
                states += ["state", st]
        try:
            r = subprocess.run(
                ["ss", "-K", "-tnH", *states, "src", src, "sport", "=", f":{self.port}"],
                capture_output=True, text=True, timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            return 0
        return sum(1 for ln in r.stdout.splitlines() if ln.strip()) if r.returncode == 0 else 0
