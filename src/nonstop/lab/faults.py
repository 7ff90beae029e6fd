"""Fault handles: each fault the lab injects returns one, and ``heal()`` undoes it.

Links are cut on the switch side (like pulling the cable: the host keeps its addresses and sees
NO-CARRIER). Packet drops are iptables rules inserted at the top of the host's INPUT/OUTPUT
chains, tagged with the comment ``nonstop-lab:<id>``; they are removed with the exact same rule
spec. Rate limits are a ``tbf`` root qdisc on the host's interface (egress). Everything lives in
the lab's own namespaces, so deleting the namespaces on ``down()`` removes whatever was not healed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from nonstop.lab import nsops

_ids = itertools.count(1)


@dataclass(eq=False)
class Fault:
    """An injected fault; ``heal()`` is idempotent and safe after the lab is down."""

    kind: str
    description: str
    _undo: Callable[[], None] | None = field(default=None, repr=False)
    active: bool = True

    def heal(self) -> None:
        if not self.active:
            return
        self.active = False
        if self._undo is not None:
            self._undo()

    def discard(self) -> None:
        """Forget the fault without undoing it (its namespace is about to go)."""
        self.active = False

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()


@dataclass(frozen=True, slots=True)
class Rule:
    """One iptables rule: family 4 or 6, chain, match arguments (without -j)."""

    family: int
    chain: str
    match: tuple[str, ...]


def new_tag() -> str:
    return f"nonstop-lab:{next(_ids)}"


def apply_rules(ns: str, rules: list[Rule], tag: str, *, add: bool) -> None:
    """Insert (or delete) ``rules`` in namespace ``ns``: one iptables-restore per family."""
    for family, tool in ((4, "iptables-restore"), (6, "ip6tables-restore")):
        mine = [r for r in rules if r.family == family]
        if not mine:
            continue
        op = "-I" if add else "-D"
        lines = ["*filter"]
        for r in mine:
            lines.append(
                " ".join([op, r.chain, *r.match, "-m", "comment", "--comment", tag, "-j", "DROP"])
            )
        lines.append("COMMIT")
        nsops.ns_run(ns, [tool, "-w", "--noflush"], input="\n".join(lines) + "\n", check=add)


_RATE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)(bit|bps)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bytes_per_s(rate: str) -> float:
    """Parse a tc rate ("1gbit", "500mbit", "10mbps" = bytes): bytes per second."""
    m = _RATE_RE.match(rate)
    if not m:
        raise ValueError(f"bad rate {rate!r} (try '100mbit')")
    value = float(m.group(1)) * _SCALE[m.group(2).lower()]
    unit = (m.group(3) or "bit").lower()
    return value if unit == "bps" else value / 8


def tbf_burst(rate: str) -> int:
    """A burst of ~4 ms at the rate, at least 64 KiB (one GSO packet on a veth)."""
    return max(int(rate_bytes_per_s(rate) * 0.004), 65536)
