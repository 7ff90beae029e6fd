"""The supervisor core's state table: explicit cases, then Hypothesis over random inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.app import supervisor as S
from nonstop.common import LocalProtocolError

READY_SPEC = (0.1, 0.0, 2, 3)  # interval, initial delay, success threshold, failure threshold
LIVE_SPEC = (0.2, 0.5, 1, 2)


def core(readiness=READY_SPEC, liveness=None, draw=0.5, **kw) -> S.ServiceCore:
    timing = S.Timing(readiness=readiness, liveness=liveness, **kw)
    return S.ServiceCore("svc", timing, rand=lambda: draw)


def states(events) -> list[str]:
    return [str(e.new) for e in events if isinstance(e, S.StateChanged)]


def test_start_ready_after_success_threshold() -> None:
    c = core()
    c.start(0.0)
    assert c.take_actions() == [S.Launch(1)]
    assert c.state is S.SvcState.STARTING
    c.instance_started(1, 100, 0.01)
    c.handle_timer(0.01)
    assert c.take_actions() == [S.RunCheck(1, S.READINESS)]
    c.check_result(1, S.READINESS, True, "connected", 0.02)
    assert c.state is S.SvcState.STARTING  # threshold 2
    assert c.next_timer() == pytest.approx(0.12)
    c.handle_timer(c.next_timer())
    assert c.take_actions() == [S.RunCheck(1, S.READINESS)]
    c.check_result(1, S.READINESS, True, "connected", 0.13)
    assert c.state is S.SvcState.READY
    assert states(c.take_events()) == ["starting", "ready"]


def test_no_readiness_check_is_ready_at_once() -> None:
    c = core(readiness=None)
    c.start(0.0)
    assert c.state is S.SvcState.READY
    assert c.next_timer() is None


def test_death_backs_off_exponentially_within_jitter_bounds() -> None:
    c = core(readiness=None, backoff_initial=0.1, backoff_factor=2.0, backoff_jitter=0.2, draw=0.0)
    c.start(0.0)
    now, delays = 0.0, []
    for _ in range(4):
        c.instance_exited(c.generation, "signal SIGKILL", now)
        assert c.state is S.SvcState.BACKOFF
        ev = [e for e in c.take_events() if isinstance(e, S.BackoffScheduled)]
        delays.append(ev[0].delay)
        now = c.next_timer()
        c.handle_timer(now)
        assert c.state is S.SvcState.READY
    assert delays == pytest.approx([0.08, 0.16, 0.32, 0.64])  # (1 - jitter) * 0.1 * 2**k


def test_backoff_is_capped_and_reset_after_stable_run() -> None:
    c = core(readiness=None, backoff_initial=1.0, backoff_max=3.0, reset_after=10.0, draw=0.999)
    assert c.timing.backoff_bounds(10) == (pytest.approx(2.4), pytest.approx(3.6))
    c.start(0.0)
    c.instance_exited(1, "exit 1", 1.0)
    c.handle_timer(c.next_timer())
    assert c.consecutive == 1 and c.next_timer() == pytest.approx(c.since + 10.0)
    c.handle_timer(c.since + 10.0)
    assert c.consecutive == 0


def test_five_deaths_at_start_is_a_crash_loop() -> None:
    c = core(crash_loop_deaths=5, crash_loop_window=60.0)
    c.start(0.0)
    now = 0.0
    for i in range(5):
        c.launch_failed(c.generation, "exec: no such file", now) if i == 0 else (
            c.instance_exited(c.generation, "exit 1", now)
        )
        if i < 4:
            assert c.state is S.SvcState.BACKOFF
            now = c.next_timer()
            c.handle_timer(now)
    assert c.state is S.SvcState.CRASH_LOOP
    loops = [e for e in c.take_events() if isinstance(e, S.CrashLoopDetected)]
    assert len(loops) == 1 and loops[0].deaths == 5
    assert S.Launch(5) in c.take_actions()
    assert c.next_timer() is None  # stays down
    c.start(now + 1)  # the operator starts it again: past deaths forgotten
    assert c.state is S.SvcState.STARTING and not c.deaths


def crash_loop(c: S.ServiceCore, now: float = 0.0) -> float:
    """Drive ``c`` (readiness None) into a crash loop; return the time of the last death."""
    c.start(now)
    while True:
        c.instance_exited(c.generation, "exit 3", now)
        if c.state is S.SvcState.CRASH_LOOP:
            return now
        now = c.next_timer()
        c.handle_timer(now)


def test_reset_clears_a_crash_loop_and_starts_again_with_fresh_backoff() -> None:
    c = core(readiness=None, crash_loop_deaths=3, crash_loop_window=60.0, backoff_initial=0.1,
             backoff_factor=2.0, backoff_jitter=0.0)  # fmt: skip
    now = crash_loop(c)
    assert c.generation == 3 and len(c.deaths) == 3
    c.take_actions()
    c.take_events()
    assert c.reset(now + 5.0) is True
    assert c.take_actions() == [S.Launch(4)]  # at once: the operator fixed the cause
    ev = c.take_events()
    assert ev[0] == S.CrashLoopCleared("svc", 3, "crash loop reset by the operator", now + 5.0)
    assert [(str(e.old), str(e.new)) for e in ev if isinstance(e, S.StateChanged)] == [
        ("crash-loop", "starting"), ("starting", "ready"),
    ]  # fmt: skip
    assert c.state is S.SvcState.READY and not c.deaths and c.consecutive == 0
    assert c.reason == "running (no readiness check)"
    # the normal rules again: the first death backs off from initial, N new deaths loop again
    c.instance_exited(4, "exit 3", now + 6.0)
    assert c.state is S.SvcState.BACKOFF and c.next_timer() == pytest.approx(now + 6.1)
    crash_loop_again = [e for e in c.take_events() if isinstance(e, S.CrashLoopDetected)]
    assert not crash_loop_again
    c.handle_timer(now + 6.1)
    c.instance_exited(5, "exit 3", now + 6.2)
    c.handle_timer(c.next_timer())
    c.instance_exited(6, "exit 3", now + 6.7)
    assert c.state is S.SvcState.CRASH_LOOP


def test_reset_outside_a_crash_loop_changes_nothing() -> None:
    c = core(readiness=None, crash_loop_deaths=3)
    assert c.reset(0.0) is False and c.state is S.SvcState.STOPPED  # never started
    c.start(1.0)
    c.take_actions()
    c.take_events()
    assert c.state is S.SvcState.READY
    assert c.reset(2.0) is False
    assert c.take_actions() == [] and c.take_events() == []
    c.instance_exited(c.generation, "exit 1", 2.0)
    c.take_events()
    assert c.state is S.SvcState.BACKOFF
    assert c.reset(2.01) is False
    assert c.take_actions() == [] and c.take_events() == []
    assert len(c.deaths) == 1 and c.consecutive == 1  # for crash loops only: the deaths stay
    c.stop(3.0)
    assert c.reset(3.0) is False and c.state is S.SvcState.STOPPED


def test_a_start_out_of_a_crash_loop_is_the_same_clearing() -> None:
    c = core(readiness=None, crash_loop_deaths=2)
    now = crash_loop(c)
    c.take_events()
    c.start(now + 1)
    assert [type(e).__name__ for e in c.take_events()][:2] == ["CrashLoopCleared", "StateChanged"]
    assert c.state is S.SvcState.READY and c.reason == "running (no readiness check)"


def test_deaths_outside_the_window_do_not_count() -> None:
    c = core(readiness=None, crash_loop_deaths=3, crash_loop_window=1.0, backoff_initial=0.01)
    c.start(0.0)
    now = 0.0
    for _ in range(10):
        c.instance_exited(c.generation, "exit 1", now)
        assert c.state is S.SvcState.BACKOFF
        c.handle_timer(c.next_timer())
        now += 0.6  # two deaths per window at most
    assert not [e for e in c.take_events() if isinstance(e, S.CrashLoopDetected)]


def test_start_timeout_kills_and_counts_a_death() -> None:
    c = core(start_timeout=2.0)
    c.start(0.0)
    c.take_actions()
    c.handle_timer(2.0)
    assert S.Kill(1) in c.take_actions()
    c.instance_exited(1, "signal SIGKILL", 2.1)
    assert c.state is S.SvcState.BACKOFF and "not ready after 2 s" in c.reason


def test_liveness_failures_kill_readiness_failures_mark_unhealthy() -> None:
    c = core(readiness=(0.1, 0.0, 1, 2), liveness=LIVE_SPEC)
    c.start(0.0)
    c.check_result(1, S.READINESS, True, "ok", 0.0)
    assert c.state is S.SvcState.READY
    for t in (0.1, 0.2):
        c.check_result(1, S.READINESS, False, "refused", t)
    assert c.state is S.SvcState.UNHEALTHY
    c.check_result(1, S.READINESS, True, "ok", 0.3)
    assert c.state is S.SvcState.READY
    c.take_actions()
    c.check_result(1, S.LIVENESS, False, "HTTP 500", 0.6)
    assert not c.take_actions()
    c.check_result(1, S.LIVENESS, False, "HTTP 500", 0.8)
    assert c.take_actions() == [S.Kill(1)]
    c.instance_exited(1, "signal SIGKILL", 0.85)
    assert c.state is S.SvcState.BACKOFF and "liveness failed 2 times" in c.reason


def test_stop_terminates_then_kills_after_grace_and_is_not_a_death() -> None:
    c = core(readiness=None, stop_timeout=5.0)
    c.start(0.0)
    c.take_actions()
    c.stop(1.0)
    assert c.take_actions() == [S.Terminate(1)] and c.state is S.SvcState.STOPPING
    c.handle_timer(6.0)
    assert c.take_actions() == [S.Kill(1)]
    c.instance_exited(1, "signal SIGKILL", 6.1)
    assert c.state is S.SvcState.STOPPED and not c.deaths


def test_restart_relaunches_after_exit() -> None:
    c = core(readiness=None)
    c.start(0.0)
    c.restart(1.0)
    c.instance_exited(1, "signal SIGTERM", 1.1)
    assert c.state is S.SvcState.READY and c.generation == 2 and c.restarts == 1


def test_stale_reports_are_ignored_and_impossible_ones_raise() -> None:
    c = core(readiness=None)
    c.start(0.0)
    c.restart(0.1)
    c.instance_exited(1, "exit 0", 0.2)
    c.instance_exited(1, "exit 0", 0.3)  # stale: generation 1 again
    assert c.state is S.SvcState.READY and c.generation == 2
    c.stop(1.0)
    c.instance_exited(2, "exit 0", 1.1)
    with pytest.raises(LocalProtocolError):
        c.instance_exited(2, "exit 0", 1.2)  # no instance is running in stopped


# ---- Hypothesis: random walks through the table against a model of the world ----
OPS = ("start", "stop", "restart", "reset", "exit", "stale_exit", "launch_failed", "check", "time")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(OPS), st.booleans(), st.floats(0.0, 3.0)),
        max_size=60,
    ),
    st.floats(0.0, 0.999),
    st.booleans(),
)
def test_random_walk_keeps_invariants(steps, draw, with_liveness) -> None:
    t = S.Timing(
        start_timeout=2.0,
        stop_timeout=1.0,
        backoff_initial=0.1,
        backoff_max=1.0,
        crash_loop_deaths=4,
        crash_loop_window=5.0,
        readiness=(0.1, 0.0, 1, 2),
        liveness=(0.3, 0.2, 1, 2) if with_liveness else None,
    )
    c = S.ServiceCore("svc", t, rand=lambda: draw)
    now, alive, pending, deaths, state = 0.0, None, set(), [], c.state
    for op, flag, dt in steps:
        if op == "start":
            if c.state is S.SvcState.CRASH_LOOP:
                deaths = []  # an operator's start forgets the past deaths
            c.start(now)
        elif op == "stop":
            c.stop(now)
        elif op == "restart":
            if c.state is S.SvcState.CRASH_LOOP:
                deaths = []  # a restart out of a crash loop is a start: the same
            c.restart(now)
        elif op == "reset":
            was_loop = c.state is S.SvcState.CRASH_LOOP
            if was_loop:
                deaths = []  # a reset forgets the deaths too
            assert c.reset(now) is was_loop
        elif op in ("exit", "launch_failed") and alive is not None:
            was_death = c.state is not S.SvcState.STOPPING
            if op == "exit":
                c.instance_exited(alive, "exit 1", now)
            else:
                c.launch_failed(alive, "boom", now)
            if was_death:
                deaths.append(now)
            alive, pending = None, set()
        elif op == "stale_exit" and c.generation > 1:
            c.instance_exited(c.generation - 1, "exit 0", now)
        elif op == "check" and pending:
            kind = sorted(pending)[0]
            pending.discard(kind)
            c.check_result(c.generation, kind, flag, "probe", now)
        elif op == "time":
            now += dt
            nt = c.next_timer()
            if nt is not None and nt <= now:
                c.handle_timer(now)
        for a in c.take_actions():
            assert a.generation == c.generation
            if isinstance(a, S.Launch):
                assert alive is None, "a second instance launched while one runs"
                alive = a.generation
            elif isinstance(a, S.RunCheck):
                assert c.state in S.RUNNING and a.kind not in pending
                pending.add(a.kind)
            else:
                assert alive is not None
        for e in c.take_events():
            if isinstance(e, S.StateChanged):
                assert e.old is state and e.new is not e.old
                state = e.new
            elif isinstance(e, S.BackoffScheduled):
                lo, hi = t.backoff_bounds(e.consecutive)
                assert lo - 1e-9 <= e.delay <= hi + 1e-9 and e.delay <= t.backoff_max * 1.2
            elif isinstance(e, S.CrashLoopDetected):
                recent = [d for d in deaths if d > now - t.crash_loop_window]
                assert len(recent) >= t.crash_loop_deaths
            elif isinstance(e, S.CrashLoopCleared):
                assert state is S.SvcState.CRASH_LOOP  # only a crash loop is cleared
        assert state is c.state
        if c.state in (S.SvcState.STOPPED, S.SvcState.BACKOFF, S.SvcState.CRASH_LOOP):
            assert alive is None
        else:
            assert alive == c.generation
        if c.state is S.SvcState.BACKOFF:
            recent = [d for d in deaths if d > now - t.crash_loop_window]
            assert len(recent) < t.crash_loop_deaths
