"""Sans-IO cores of the fault-tolerance modes (seed 003): voting, DRB roles, the adaptive choice.

- ``vote(results, n)``: NVP's majority. ``results`` maps a worker to ``("ok", canonical bytes,
  value)`` or ``("error", reason)``; the winner needs more than ``n // 2`` equal values (of the
  ``n`` asked, so a crashed version counts against a majority). Returns a :class:`Voted` or raises
  :class:`NoMajority` with what each version said.
- ``drb_pick(primary, alternate)``: distributed recovery blocks; both nodes ran concurrently; the
  primary's result if its acceptance test passed, else the alternate's if its test passed, else
  an error. ``DrbPair`` keeps which node is primary and swaps the roles after the primary fails.
- ``FaultRate``: recent fault rate as an exponentially weighted moving average (time in, no clock).
- ``choose_mode(...)``: the adaptive manager's decision and its reason, a sentence.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

PB, NVP, DRB = "primary_backup", "nvp", "drb"

OkResult = tuple[str, bytes, Any]  # ("ok", canonical, value)
ErrResult = tuple[str, str]  # ("error", reason)


class NoMajority(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Voted:
    value: Any
    agree: tuple[str, ...]  # workers that returned the winning value
    disagree: tuple[str, ...]  # workers that returned another value or failed


def vote(results: dict[str, Any], n: int) -> Voted:
    if n < 1:
        raise ValueError("vote needs n >= 1")
    tally: Counter[bytes] = Counter()
    values: dict[bytes, Any] = {}
    for r in results.values():
        if r[0] == "ok":
            tally[r[1]] += 1
            values[r[1]] = r[2]
    need = n // 2 + 1
    if tally:
        (best, count), *rest = tally.most_common()
        if count >= need and not (rest and rest[0][1] == count):
            agree = tuple(sorted(w for w, r in results.items() if r[0] == "ok" and r[1] == best))
            disagree = tuple(sorted(w for w in results if w not in agree))
            return Voted(values[best], agree, disagree)
    said = ", ".join(
        f"{w}: {r[2]!r}" if r[0] == "ok" else f"{w}: error {r[1]}"
        for w, r in sorted(results.items())
    )
    top = tally.most_common(1)[0][1] if tally else 0
    raise NoMajority(f"no majority: at most {top} of {n} versions agree, {need} needed ({said})")


@dataclass(frozen=True, slots=True)
class DrbOutcome:
    value: Any
    used: str  # "primary" | "alternate"
    primary_failed: bool  # crashed, errored or failed its acceptance test


def drb_pick(
    primary: tuple[bool, bool, Any, str], alternate: tuple[bool, bool, Any, str]
) -> DrbOutcome:
    """Each side is (ok, accepted, value, error). Raises NoMajority-like ValueError if neither
    passes."""
    p_ok, p_acc, p_val, p_err = primary
    a_ok, a_acc, a_val, a_err = alternate
    if p_ok and p_acc:
        return DrbOutcome(p_val, "primary", False)
    if a_ok and a_acc:
        return DrbOutcome(a_val, "alternate", True)
    why_p = p_err if not p_ok else "acceptance test failed"
    why_a = a_err if not a_ok else "acceptance test failed"
    raise NoMajority(f"recovery block failed: primary: {why_p}; alternate: {why_a}")


class DrbPair:
    """Which worker plays primary and which alternate; roles swap when the primary fails."""

    def __init__(self) -> None:
        self.primary: str | None = None
        self.alternate: str | None = None

    def assign(self, available: list[str]) -> tuple[str, str]:
        """Keep the current pair while both are available; fill gaps from ``available``."""
        if len(available) < 2:
            raise ValueError("DRB needs two workers")
        if self.primary not in available:
            self.primary, self.alternate = self.alternate, None
        if self.primary not in available:
            self.primary = available[0]
        if self.alternate not in available or self.alternate == self.primary:
            self.alternate = next(w for w in available if w != self.primary)
        return self.primary, self.alternate

    def outcome(self, primary_failed: bool) -> str | None:
        """After a call: swap roles if the primary failed. Returns a sentence when it swapped."""
        if primary_failed and self.alternate is not None:
            old = self.primary
            self.primary, self.alternate = self.alternate, self.primary
            return f"roles swapped: {self.primary} is primary, {old} alternate"
        return None


class FaultRate:
    """Fraction of recent calls that met a fault (crash, error, wrong answer, failed test), as an
    EWMA with half-life ``half_life`` seconds of call time."""

    def __init__(self, half_life: float = 5.0) -> None:
        self.half_life = half_life
        self.rate = 0.0
        self._t: float | None = None

    def record(self, faulty: bool, now: float) -> None:
        if self._t is not None and now > self._t:
            self.rate *= math.pow(0.5, (now - self._t) / self.half_life)
        self._t = now
        self.rate = min(1.0, self.rate * 0.9 + (0.1 if faulty else 0.0))

    def value(self, now: float) -> float:
        if self._t is None:
            return 0.0
        return self.rate * math.pow(0.5, max(0.0, now - self._t) / self.half_life)


@dataclass(frozen=True, slots=True)
class Decision:
    mode: str
    reason: str


HIGH_FAULT = 0.05


def choose_mode(
    *,
    available: int,
    fault_rate: float,
    reliability: int,
    deadline_ms: int = 0,
    latency_ms: float = 0.0,
    requested: str = "auto",
) -> Decision:
    """The adaptive manager (seed 003). ``latency_ms`` is the recent per-call latency of one
    worker; a deadline under two of those leaves no time for a sequential retry."""
    if available < 1:
        raise NoMajority("no worker available")
    if requested != "auto":
        need = {PB: 1, DRB: 2, NVP: 3}[requested]
        if available < need:
            raise NoMajority(f"{requested} needs {need} workers, {available} available")
        return Decision(requested, f"{requested} requested by the client")
    tight = deadline_ms > 0 and latency_ms > 0 and deadline_ms < 2 * latency_ms
    if reliability >= 3 and available >= 3:
        return Decision(NVP, f"reliability 3 and {available} workers: vote over 3 versions")
    if available >= 2 and (reliability >= 3 or fault_rate >= HIGH_FAULT or tight):
        why = (
            f"deadline {deadline_ms} ms < 2 x {latency_ms:.1f} ms: no time to retry in sequence"
            if tight
            else f"fault rate {fault_rate:.2f} >= {HIGH_FAULT}"
            if fault_rate >= HIGH_FAULT
            else f"reliability {reliability} with only {available} workers"
        )
        return Decision(DRB, f"{why}: primary and alternate run at once")
    if available == 1:
        return Decision(PB, "one worker: primary/backup without a backup")
    return Decision(
        PB, f"reliability {reliability}, fault rate {fault_rate:.2f}: primary, backup on failure"
    )
