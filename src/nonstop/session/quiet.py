"""The quiet rule: a node that does not serve VIP:port lets no segment from it leave.

While a node is backup (and after it stepped down) every connection it parked or holds is in
repair mode or disconnected, and so silent. A socket the session worker never heard of is not:
a connection the service accepted but had not yet registered when the node stepped down, a
service that closes what it still has. One FIN or RST from such a socket would reset a peer that
the new master now serves.

The quiet rule is the ACK clamp's own pair of rules (``nfq.clamp_rule``: OUTPUT for the
segments leaving VIP:port, INPUT for the peer's), standing on every node for the session
worker's whole life, with nobody bound to their queue unless the node is master. No
``--queue-bypass``: an unbound queue drops every segment, and that is the quiet. So a role
change runs no ``iptables``:

- promotion: the new ``MasterSession`` binds the queue when it opens, after the restore: the
  restored sockets' first segments (a window probe, their bytes in flight again) die in the
  rules, and the kick after the first gratuitous ARP moves the peer (``session.kick``).
  Deleting a DROP rule and inserting the clamp's two rules cost 11-20 ms of a 35 ms
  promotion of 256 connections (two ``iptables`` processes on a loaded node);
- step-down: the master session unbinds; from the next segment on, every one is dropped. At a
  step-down every established socket of VIP:port the worker did not hold is then aborted with
  SOCK_DESTROY (``ss -K``, ``reap``): its RST dies in the rule, and its 4-tuple is free for a
  later restore. The INPUT rule drops the peer's segments meanwhile, so the kernel does not
  answer them with an RST for a socket that is gone.

The rules stay when the agent dies (the node is not master any more: keeping them is the
point) and go on a graceful stop. A master killed outright (agent and worker at once) leaves
them with nobody bound: as quiet. A new worker adds what is missing of its own rules first,
then clears every other rule of the clamp's (``nfq.remove_rules(keep=...)``): a crashed
predecessor's of another queue, or an older version's ``:quiet`` DROP rule. Segments the kick
crafts (``KICK_MARK``) pass the OUTPUT rule; only a master sends them.
"""

from __future__ import annotations

import contextlib
import subprocess

from nonstop.session.nfnl import COMMENT, listed_rules, remove_rules, restore_rules
from nonstop.session.nfq import clamp_rule

CHAINS = ("OUTPUT", "INPUT")


class QuietRule:
    def __init__(self, vip: str, port: int, family: int, queue_num: int) -> None:
        self.vip, self.port, self.family, self.queue_num = vip, port, family, queue_num
        self.comment = f"{COMMENT}:q{queue_num}"

    def specs(self) -> list[tuple[str, list[str]]]:
        """(chain, rule spec) of each rule, as ``iptables -I CHAIN`` takes it."""
        return [(c, clamp_rule(self.vip, self.port, self.queue_num, c)) for c in CHAINS]

    def add(self) -> None:
        """Install what is missing (an existing copy is kept): one ``iptables -S`` and, when
        something is missing, one ``iptables-restore``. Raises OSError or CalledProcessError."""
        have = {spec[0] for comment, spec in listed_rules(self.family) if comment == self.comment}
        missing = [(c, spec) for c, spec in self.specs() if c not in have]
        if missing:
            restore_rules("-I", self.family, missing)

    def remove(self) -> None:
        """Delete every copy (best effort: what cannot be deleted is left)."""
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            remove_rules(self.family, only=self.comment)

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
