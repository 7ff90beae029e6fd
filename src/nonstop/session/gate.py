"""The service gate: one NFQUEUE queue per protected service (VIP:port), bound for the whole life
of the session worker, whose mode follows the node's role. No iptables call at a role change.

Its rules (the ACK clamp's, ``nfq.AckClamp``) go in when the worker starts and stay::

    iptables -I OUTPUT -p tcp -s VIP --sport PORT ... -j NFQUEUE --queue-num N   (ours)
    iptables -I INPUT  -p tcp -d VIP --dport PORT ... -j NFQUEUE --queue-num N   (the peer's)

- **quiet** (backup, after a step-down, fenced): every segment leaving VIP:port is dropped. A
  socket the worker never heard of (a connection the service accepted but had not registered
  when the node stepped down, a service that closes what it still has) cannot send one FIN or
  RST to a peer that the new master now serves.
- **pass** (a promotion, from the moment the states are computed): everything passes, so the
  restored sockets' first segments (the window probe at repair off, the resent flight) leave.
- **serve** (master): the master session's hooks judge every segment: the ACK clamp, the send
  hold, the capture of both directions for the backup.

A worker that dies leaves the rules with nobody bound to the queue: the kernel drops every
segment of VIP:port (no ``--queue-bypass``), as quiet as the quiet mode; so does a worker that
exits because its agent is gone (``close(keep_rules=True)``). The next worker binds the same
queue (quiet), then keeps one copy of its rules and deletes the rest (``nfq.remove_rules``).

This replaced a DROP rule added at every step-down and deleted at every promotion, and the
clamp's rules inserted at every promotion: three iptables runs (7-13 ms each on a busy node,
nft backend) on the takeover's critical path, 14-20 ms of a 40 ms promotion of 256
connections.

Changing modes takes the clamp's mode lock: when ``serve``, ``pass_all`` or ``silence``
returns, no segment is judged by the old mode. Never call them holding a lock that a hook takes
(the master session's): the verdict thread may be waiting for it inside a hook.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from nonstop.session.nfnl import NF_ACCEPT, NF_DROP, send_packed
from nonstop.session.nfq import AckClamp, Capture, Limit

__all__ = ["ServiceGate", "reap"]


class ServiceGate(AckClamp):
    """An AckClamp whose hooks come and go with the role; starts quiet. Both chains, whole
    copies (the capture needs payloads once it serves)."""

    def __init__(self, queue_num: int, *, vip: str, port: int, family: int = 4,
                 md5: Mapping[str, bytes] | None = None, netns: str | None = None) -> None:
        super().__init__(queue_num, vip=vip, port=port, family=family, limit=None, md5=md5,
                         netns=netns, header_copy=0, quiet=True)
        self.chains = ("OUTPUT", "INPUT")

    @property
    def mode(self) -> str:
        return "quiet" if self.quiet else "serve" if self.limit is not None else "pass"

    def serve(self, *, limit: Limit, capture: Capture | None = None,
              capture_out: Capture | None = None, hold: Limit | None = None) -> None:
        """Master: every segment goes through these hooks from now on."""
        with self._mode:
            self.limit, self.capture, self.capture_out = limit, capture, capture_out
            self.hold = hold
            self.quiet = False

    def pass_all(self) -> None:
        """Let everything through, unjudged (a promotion, before the master's hooks are up)."""
        self._set(quiet=False)

    def silence(self) -> None:
        """Quiet: drop every outgoing segment from now on, also those held by the send hold."""
        self._set(quiet=True)

    def _set(self, *, quiet: bool) -> None:
        with self._mode:
            self.limit = self.capture = self.capture_out = self.hold = None
            self.quiet = quiet
            held, self._held = self._held, []
            self.stats.held_now = 0
            sock = self._sock
            if held and sock is not None:
                self._release(sock)  # passes first: the kernel keeps the queue in order
                verdict = NF_DROP if quiet else NF_ACCEPT
                send_packed(sock, [self._verdict_msg(pid, verdict) for pid, *_ in held])


def reap(vip: str, port: int, *, orphans: bool = False) -> int:
    """Abort every established socket of VIP:port on this node (SOCK_DESTROY, ``ss -K``): call
    while the gate is quiet, so their RSTs die here. A socket the session worker never held
    (accepted, not yet registered, at a step-down) would otherwise keep its 4-tuple and make a
    later restore of it fail with EADDRNOTAVAIL. ``orphans``: every state but listening and
    time-wait too (what a killed worker and service left closing). Returns how many (best
    effort: 0 if ss cannot)."""
    src = f"[{vip}]" if ":" in vip else vip
    states = ["state", "established"]
    if orphans:
        for st in ("syn-recv", "fin-wait-1", "fin-wait-2", "close-wait", "last-ack", "closing"):
            states += ["state", st]
    try:
        r = subprocess.run(
            ["ss", "-K", "-tnH", *states, "src", src, "sport", "=", f":{port}"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for ln in r.stdout.splitlines() if ln.strip()) if r.returncode == 0 else 0
