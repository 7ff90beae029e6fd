"""The causes of a node's local fault.

The role machine has one FAULT role and two inputs, ``local_fault(reason)`` and ``local_ok()``.
A node can be at fault for several reasons at once (its fence guard exited, its session worker
exited, a supervised service is in a crash loop), and only some of them can be cleared: a crash
loop by ``nonstop service reset``; the guard and the worker never. ``LocalFaults`` keeps each
cause under its source so that clearing one withdraws exactly that one: the node leaves FAULT
(``local_ok``) only when no cause is left, otherwise it stays FAULT and its reason names what is
left.
"""

from __future__ import annotations

from nonstop.failover.roles import RoleMachine


class LocalFaults:
    def __init__(self) -> None:
        self.causes: dict[str, str] = {}  # source -> the sentence, in the order declared

    def declare(self, roles: RoleMachine, source: str, reason: str, now: float) -> None:
        self.causes[source] = reason
        roles.local_fault(reason, now)

    def clear(self, roles: RoleMachine, source: str, why: str, now: float) -> bool:
        """Withdraw ``source``'s fault; False if it had declared none."""
        if self.causes.pop(source, None) is None:
            return False
        if self.causes:
            roles.local_fault(self.summary(), now)  # still FAULT: the reason names what is left
        else:
            roles.local_ok(now, why)
        return True

    def reapply(self, roles: RoleMachine, now: float) -> None:
        """Declare every cause again on a new role machine (the daemon makes its cores again
        once its sockets are open; a crash loop seen during start-up must not be lost)."""
        if self.causes:
            roles.local_fault(self.summary(), now)

    def summary(self) -> str:
        return "; ".join(self.causes.values())
