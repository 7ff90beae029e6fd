"""The service supervisor's core: a sans-IO state machine (time is an input; no clock, no process).

States (``SvcState``)::

    stopped --start--> starting --ready checks pass--> ready <--readiness--> unhealthy
       ^                   |  \\                          |                     |
       |            died / start timeout / liveness failed: the death is recorded
       |                   v                              v                     v
    stopping <--stop-- backoff --delay over--> starting     crash-loop (N deaths in the window)
                                                  ^            |
                                                  +------------+ reset / start: deaths forgotten

Rules, in one place (h11's _state.py is the model):

- ``start`` launches an instance (``Launch``); from crash-loop it forgets the past deaths.
- ``reset`` (the operator fixed the cause: ``nonstop service reset``) clears a crash loop: the
  past deaths are forgotten, ``CrashLoopCleared`` is emitted and the service starts at once; a
  death after that backs off from ``initial`` again, and N new deaths are a new crash loop. In
  any other state ``reset`` changes nothing and returns False. Leaving crash-loop through
  ``start``/``restart`` is the same clearing (the same event), with their reason.
- An instance that exits while the supervisor did not ask for it is a *death*. Deaths are kept
  for ``crash_loop.window``; the N-th death inside the window moves to ``crash-loop`` and emits
  ``CrashLoopDetected`` (the agent gives its VIP up instead of flapping). Otherwise the next start
  waits ``backoff``: ``initial * factor ** (consecutive deaths - 1)``, capped at ``max``, times a
  jitter factor drawn in ``[1 - jitter, 1 + jitter]`` (the draw comes from the injected ``rand``).
  An instance that stayed ``ready`` for ``reset_after`` resets the consecutive count (not the
  crash-loop window).
- ``starting`` becomes ``ready`` after ``success_threshold`` readiness passes in a row (at once
  without a readiness check). No readiness by ``start_timeout``: the instance is killed, a death.
- In ``ready``, ``failure_threshold`` readiness failures in a row: ``unhealthy`` (not restarted;
  passes bring it back). ``failure_threshold`` liveness failures in a row (any running state):
  the instance is killed and the death recorded.
- ``stop`` sends ``Terminate`` (the stop signal) and, after ``stop_timeout``, ``Kill``. The exit
  then leads to ``stopped`` (or to a new start for ``restart``); it is not a death.
- Every state change emits ``StateChanged(old, new, reason)``: hooks and logs share the reason.
- Reports carry the instance's ``generation``; a report about an older instance is ignored.

The core returns actions (``Launch``, ``Terminate``, ``Kill``, ``RunCheck``) from
``take_actions()`` and events from ``take_events()``; ``next_timer()`` is the next deadline to call
``handle_timer(now)`` at. The asyncio adapter, ``Supervisor``, is in ``supervisor_io``.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nonstop.common import LocalProtocolError

log = logging.getLogger("nonstop.service")


class SvcState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    BACKOFF = "backoff"
    CRASH_LOOP = "crash-loop"
    STOPPING = "stopping"


RUNNING = frozenset({SvcState.STARTING, SvcState.READY, SvcState.UNHEALTHY})
READINESS, LIVENESS = "readiness", "liveness"

# Inputs, for the table and the property tests.
INPUTS = (
    "start", "stop", "restart", "reset", "started", "launch_failed", "exited", "check", "timer",
)  # fmt: skip
START, STOP, RESTART, RESET, STARTED, LAUNCH_FAILED, EXITED, CHECK, TIMER = INPUTS

# (state, input) pairs that are allowed; anything else with a current generation is a bug in the
# caller (LocalProtocolError). start/stop/restart/reset/timer are allowed everywhere (idempotent).
_ALLOWED: frozenset[tuple[SvcState, str]] = frozenset(
    [(s, i) for s in SvcState for i in (START, STOP, RESTART, RESET, TIMER)]
    + [(s, i) for s in (*RUNNING, SvcState.STOPPING) for i in (STARTED, EXITED, LAUNCH_FAILED)]
    + [(s, CHECK) for s in (*RUNNING, SvcState.STOPPING)]
)


@dataclass(frozen=True, slots=True)
class Timing:
    """Supervisor timings in seconds, thresholds in counts (ServiceConfig converts from ms)."""

    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    backoff_factor: float = 2.0
    backoff_jitter: float = 0.2
    reset_after: float = 10.0
    crash_loop_deaths: int = 5
    crash_loop_window: float = 60.0
    # Per check kind: (interval, initial_delay, success_threshold, failure_threshold)
    readiness: tuple[float, float, int, int] | None = None
    liveness: tuple[float, float, int, int] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.backoff_jitter < 1:
            raise LocalProtocolError("backoff_jitter must be in [0, 1)")
        if self.backoff_factor < 1 or self.backoff_initial <= 0:
            raise LocalProtocolError("backoff needs factor >= 1 and initial > 0")
        if self.crash_loop_deaths < 1:
            raise LocalProtocolError("crash_loop_deaths must be >= 1")

    def backoff_bounds(self, consecutive: int) -> tuple[float, float]:
        """The interval a delay after ``consecutive`` deaths in a row is drawn from."""
        base = self.backoff_initial * self.backoff_factor ** max(0, consecutive - 1)
        base = min(base, self.backoff_max)
        return base * (1 - self.backoff_jitter), base * (1 + self.backoff_jitter)


# ---- actions (what the adapter must do) ----
@dataclass(frozen=True, slots=True)
class Launch:
    generation: int


@dataclass(frozen=True, slots=True)
class Terminate:
    generation: int


@dataclass(frozen=True, slots=True)
class Kill:
    generation: int


@dataclass(frozen=True, slots=True)
class RunCheck:
    generation: int
    kind: str  # readiness | liveness


Action = Launch | Terminate | Kill | RunCheck


# ---- events (past tense; for hooks, logs, status) ----
@dataclass(frozen=True, slots=True)
class StateChanged:
    service: str
    old: SvcState
    new: SvcState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class InstanceStarted:
    service: str
    generation: int
    pid: int | None
    at: float


@dataclass(frozen=True, slots=True)
class InstanceExited:
    service: str
    generation: int
    status: str  # "exit 3", "signal SIGKILL", "launch failed: ..."
    death: bool  # not asked for by the supervisor
    at: float


@dataclass(frozen=True, slots=True)
class CheckFailed:
    service: str
    kind: str
    detail: str
    consecutive: int
    at: float


@dataclass(frozen=True, slots=True)
class BackoffScheduled:
    service: str
    delay: float
    consecutive: int
    at: float


@dataclass(frozen=True, slots=True)
class CrashLoopDetected:
    """N deaths within the window: the agent should give its VIP up instead of flapping."""

    service: str
    deaths: int
    window: float
    at: float


@dataclass(frozen=True, slots=True)
class CrashLoopCleared:
    """A crash loop was cleared (``reset`` by the operator, or a ``start``): ``deaths`` deaths
    were forgotten and the service starts again. The agent withdraws the fault it declared."""

    service: str
    deaths: int
    reason: str
    at: float


Event = (
    StateChanged
    | InstanceStarted
    | InstanceExited
    | CheckFailed
    | BackoffScheduled
    | CrashLoopDetected
    | CrashLoopCleared
)


@dataclass(slots=True)
class _Probe:
    interval: float
    initial_delay: float
    success_threshold: int
    failure_threshold: int
    due: float = 0.0
    in_flight: bool = False
    passes: int = 0
    fails: int = 0


@dataclass(slots=True)
class ServiceCore:
    """One supervised service. Feed it inputs with ``now``; take its actions and events."""

    name: str
    timing: Timing = field(default_factory=Timing)
    # Jitter source: a number in [0, 1) per death (random.random; tests pass their own).
    rand: Callable[[], float] = random.random
    state: SvcState = SvcState.STOPPED
    generation: int = 0
    pid: int | None = None
    reason: str = "not started"
    since: float = 0.0
    consecutive: int = 0  # deaths in a row (backoff exponent)
    deaths: deque[float] = field(default_factory=deque)  # times of deaths in the window
    restarts: int = 0
    last_exit: str = ""
    _deadline: float | None = None  # start timeout / stop grace / backoff end
    _ready_at: float | None = None  # when the current instance became ready
    _restart_after_stop: bool = False
    _kill_sent: bool = False
    _probes: dict[str, _Probe] = field(default_factory=dict)
    _actions: list[Action] = field(default_factory=list)
    _events: list[Event] = field(default_factory=list)

    # ---- outputs ----
    def take_actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def next_timer(self) -> float | None:
        times = [self._deadline] if self._deadline is not None else []
        if self.state in RUNNING:
            times += [p.due for p in self._probes.values() if not p.in_flight]
            if self.state is SvcState.READY and self._ready_at is not None and self.consecutive:
                times.append(self._ready_at + self.timing.reset_after)
        return min(times) if times else None

    def status(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "state": str(self.state),
            "reason": self.reason,
            "since_s": round(now - self.since, 3),
            "generation": self.generation,
            "pid": self.pid,
            "restarts": self.restarts,
            "consecutive_deaths": self.consecutive,
            "deaths_in_window": len(self.deaths),
            "last_exit": self.last_exit,
            "checks": {k: {"passes": p.passes, "fails": p.fails} for k, p in self._probes.items()},
        }

    # ---- inputs from the operator ----
    def start(self, now: float) -> None:
        self._check(START, None)
        if self.state is SvcState.CRASH_LOOP:
            self._clear_crash_loop(now, "start requested")
        elif self.state is SvcState.STOPPED:
            self._launch(now, "start requested")
        elif self.state is SvcState.BACKOFF:
            self._launch(now, "start requested during backoff")
        elif self.state is SvcState.STOPPING:
            self._restart_after_stop = True

    def stop(self, now: float) -> None:
        self._check(STOP, None)
        self._restart_after_stop = False
        if self.state in RUNNING:
            self._terminate(now, "stop requested")
        elif self.state in (SvcState.BACKOFF, SvcState.CRASH_LOOP):
            self._deadline = None
            self._goto(SvcState.STOPPED, now, "stop requested")

    def restart(self, now: float, reason: str = "restart requested") -> None:
        self._check(RESTART, None)
        if self.state in RUNNING:
            self._terminate(now, reason)
            self._restart_after_stop = True
        elif self.state is SvcState.STOPPING:
            self._restart_after_stop = True
        else:
            self.start(now)

    def reset(self, now: float, reason: str = "crash loop reset by the operator") -> bool:
        """Clear a crash loop and start again (True); in any other state, nothing (False)."""
        self._check(RESET, None)
        if self.state is not SvcState.CRASH_LOOP:
            return False
        self._clear_crash_loop(now, reason)
        return True

    # ---- inputs from the runtime ----
    def instance_started(self, generation: int, pid: int | None, now: float) -> None:
        if self._stale(STARTED, generation):
            return
        self.pid = pid
        self._events.append(InstanceStarted(self.name, generation, pid, now))

    def launch_failed(self, generation: int, reason: str, now: float) -> None:
        if self._stale(LAUNCH_FAILED, generation):
            return
        self._exited(f"launch failed: {reason}", now)

    def instance_exited(self, generation: int, status: str, now: float) -> None:
        if self._stale(EXITED, generation):
            return
        self._exited(status, now)

    def check_result(self, generation: int, kind: str, ok: bool, detail: str, now: float) -> None:
        if self._stale(CHECK, generation):
            return
        probe = self._probes.get(kind)
        if probe is None:
            raise LocalProtocolError(f"no {kind} check configured")
        probe.in_flight = False
        probe.due = now + probe.interval
        if self.state is SvcState.STOPPING:
            return
        if ok:
            probe.passes, probe.fails = probe.passes + 1, 0
        else:
            probe.passes, probe.fails = 0, probe.fails + 1
            self._events.append(CheckFailed(self.name, kind, detail, probe.fails, now))
        if kind == LIVENESS:
            if probe.fails >= probe.failure_threshold:
                self._kill_for_death(now, f"liveness failed {probe.fails} times: {detail}")
            return
        if self.state is SvcState.STARTING and probe.passes >= probe.success_threshold:
            self._became_ready(now, f"readiness passed: {detail}")
        elif self.state is SvcState.READY and probe.fails >= probe.failure_threshold:
            self._ready_at = None
            self._goto(SvcState.UNHEALTHY, now, f"readiness failed {probe.fails} times: {detail}")
        elif self.state is SvcState.UNHEALTHY and probe.passes >= probe.success_threshold:
            self._became_ready(now, f"readiness passed again: {detail}")

    # ---- time ----
    def handle_timer(self, now: float) -> None:
        self._check(TIMER, None)
        t = self.timing
        if self._deadline is not None and now >= self._deadline:
            self._deadline = None
            if self.state is SvcState.BACKOFF:
                self._launch(now, "backoff over")
            elif self.state is SvcState.STARTING:
                self._kill_for_death(now, f"not ready after {t.start_timeout:g} s")
            elif self.state is SvcState.STOPPING and not self._kill_sent:
                self._kill_sent = True
                self._actions.append(Kill(self.generation))
                self.reason += f"; killed after {t.stop_timeout:g} s"
        if self.state in RUNNING:
            if (
                self.state is SvcState.READY
                and self.consecutive
                and self._ready_at is not None
                and now >= self._ready_at + t.reset_after
            ):
                self.consecutive = 0
            for kind, p in self._probes.items():
                if not p.in_flight and now >= p.due:
                    p.in_flight = True
                    self._actions.append(RunCheck(self.generation, kind))

    # ---- internals ----
    def _check(self, inp: str, generation: int | None) -> None:
        if (self.state, inp) not in _ALLOWED:
            raise LocalProtocolError(f"{inp} in state {self.state} (generation {generation})")

    def _stale(self, inp: str, generation: int) -> bool:
        if generation != self.generation:
            return True  # a report about an older instance
        self._check(inp, generation)
        return False

    def _goto(self, new: SvcState, now: float, reason: str) -> None:
        old, self.state, self.reason, self.since = self.state, new, reason, now
        if old is not new:
            self._events.append(StateChanged(self.name, old, new, reason, now))

    def _clear_crash_loop(self, now: float, reason: str) -> None:
        forgotten = len(self.deaths)
        self.deaths.clear()
        self.consecutive = 0
        self._events.append(CrashLoopCleared(self.name, forgotten, reason, now))
        self._launch(now, reason)

    def _launch(self, now: float, reason: str) -> None:
        t = self.timing
        self.generation += 1
        self.pid = None
        self._kill_sent = False
        self._ready_at = None
        self._deadline = now + t.start_timeout if t.readiness else None
        self._probes = {}
        for kind, spec in ((READINESS, t.readiness), (LIVENESS, t.liveness)):
            if spec is not None:
                interval, delay, succ, fail = spec
                self._probes[kind] = _Probe(interval, delay, succ, fail, due=now + delay)
        self._actions.append(Launch(self.generation))
        self._goto(SvcState.STARTING, now, reason)
        if t.readiness is None:
            self._became_ready(now, "running (no readiness check)")

    def _became_ready(self, now: float, reason: str) -> None:
        self._deadline = None
        self._ready_at = now
        self._goto(SvcState.READY, now, reason)

    def _terminate(self, now: float, reason: str) -> None:
        self._deadline = now + self.timing.stop_timeout
        self._kill_sent = False
        self._actions.append(Terminate(self.generation))
        self._goto(SvcState.STOPPING, now, reason)

    def _kill_for_death(self, now: float, reason: str) -> None:
        """Kill a misbehaving instance; its exit will count as a death."""
        if self._kill_sent:
            return
        self._kill_sent = True
        self._deadline = None
        for p in self._probes.values():
            p.in_flight = True  # no more checks for this instance
        self.reason = reason
        self._actions.append(Kill(self.generation))

    def _exited(self, status: str, now: float) -> None:
        t = self.timing
        self.pid = None
        self.last_exit = status
        self._deadline = None
        self._probes = {}
        if self.state is SvcState.STOPPING:
            self._events.append(InstanceExited(self.name, self.generation, status, False, now))
            if self._restart_after_stop:
                self._restart_after_stop = False
                self.restarts += 1
                self._launch(now, f"restarted ({status})")
            else:
                self._goto(SvcState.STOPPED, now, f"stopped ({status})")
            return
        self._events.append(InstanceExited(self.name, self.generation, status, True, now))
        why = status if not self._kill_sent else f"{self.reason} ({status})"
        self.deaths.append(now)
        while self.deaths and self.deaths[0] <= now - t.crash_loop_window:
            self.deaths.popleft()
        self.consecutive += 1
        if len(self.deaths) >= t.crash_loop_deaths:
            self._events.append(
                CrashLoopDetected(self.name, len(self.deaths), t.crash_loop_window, now)
            )
            self._goto(
                SvcState.CRASH_LOOP,
                now,
                f"{len(self.deaths)} deaths within {t.crash_loop_window:g} s, last: {why}",
            )
            return
        draw = self.rand()
        if not 0 <= draw < 1:
            raise LocalProtocolError(f"jitter draw {draw} not in [0, 1)")
        lo, hi = t.backoff_bounds(self.consecutive)
        delay = lo + (hi - lo) * draw
        self._deadline = now + delay
        self.restarts += 1
        self._goto(SvcState.BACKOFF, now, f"died: {why}; next start in {delay:.3f} s")
        self._events.append(BackoffScheduled(self.name, delay, self.consecutive, now))
