"""The asyncio adapter of the supervisor: runs one ``ServiceCore`` against a runtime.

``Supervisor(config, runtime, on_event)``: ``await start()``, ``await stop()``, ``restart()``,
``reset()`` (clear a crash loop), ``status()``, ``wait_for(state)``. The core (rules, states,
events) is ``nonstop.app.supervisor``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from nonstop.app.supervisor import (
    READINESS,
    RUNNING,
    CrashLoopCleared,
    CrashLoopDetected,
    Event,
    Kill,
    Launch,
    RunCheck,
    ServiceCore,
    StateChanged,
    SvcState,
    Terminate,
)

if TYPE_CHECKING:
    from nonstop.app.runtime import Instance, Runtime
    from nonstop.app.runtime.spec import ServiceConfig

log = logging.getLogger("nonstop.service")


class Supervisor:
    """Supervises one service: ``await start()``, ``await stop()``, ``status()``.

    ``on_event(event)`` is called for every core event (state changes, deaths, crash loops), in
    order, from the event loop; it must not block. ``config`` is a ServiceConfig
    (``nonstop.app.runtime.spec``); ``runtime`` defaults to the one the config names.
    """

    def __init__(
        self,
        config: ServiceConfig,
        runtime: Runtime | None = None,
        on_event: Callable[[Event], None] | None = None,
        *,
        log_dir: str = "/run/nonstop/services/logs",
        rand: Callable[[], float] = random.random,
    ) -> None:
        from nonstop.app.runtime import runtime_for

        self.config = config
        self.runtime = runtime or runtime_for(config)
        self.on_event = on_event
        self.log_dir = log_dir
        self.core = ServiceCore(config.name, config.timing(), rand=rand)
        self.events: deque[Event] = deque(maxlen=64)  # the recent ones, for status
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._instance: tuple[int, Instance] | None = None
        self._pending_signal: dict[int, int] = {}  # generation -> signal asked before launch
        self._tasks: set[asyncio.Task[None]] = set()
        self._hooks: set[asyncio.Task[None]] = set()  # awaited on stop (they have timeouts)
        self._changed = asyncio.Condition()

    # ---- public API ----
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.start(self._loop.time())
        self._pump()

    async def restart(self) -> None:
        self.request_restart()

    def request_restart(self, reason: str = "restart requested") -> bool:
        """Stop the running instance and start a new one: a planned restart, not a death (the
        agent asks for it when its node steps down and drops the service's channel). False,
        and nothing done, unless an instance runs (a crash loop is left as it is)."""
        if self._loop is None or self.core.state not in RUNNING:
            return False
        self.core.restart(self._now(), reason)
        self._pump()
        return True

    def reset(self, reason: str = "crash loop reset by the operator") -> bool:
        """Clear a crash loop: the past deaths are forgotten and the service starts again now
        (``CrashLoopCleared``, then the state changes). False, and nothing done, if the service
        is not in a crash loop (or the supervisor was never started)."""
        if self._loop is None:
            return False
        done = self.core.reset(self._now(), reason)
        self._pump()
        return done

    async def stop(self) -> None:
        """Stop the instance (stop signal, then SIGKILL after stop_timeout) and wait for it."""
        if self._loop is None:
            return
        self.core.stop(self._now())
        self._pump()
        await self.wait_for(SvcState.STOPPED)
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.gather(*self._hooks, return_exceptions=True)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runtime.cleanup(self.config)

    def status(self) -> dict[str, object]:
        now = self._now() if self._loop is not None else 0.0
        out = self.core.status(now)
        out["runtime"] = self.runtime.name
        if self.config.runtime != "process":
            out["container"] = self.config.container_name
        out["recent"] = [  # the last state changes, oldest first; "at" is CLOCK_MONOTONIC
            {"state": str(e.new), "reason": e.reason, "at": round(e.at, 6)}
            for e in self.events
            if isinstance(e, StateChanged)
        ][-10:]
        next_t = self.core.next_timer()
        out["next_timer_s"] = None if next_t is None else round(max(0.0, next_t - now), 3)
        return out

    async def wait_for(self, *states: SvcState, timeout: float | None = None) -> SvcState:
        """Wait until the service is in one of ``states`` (for tests, the CLI and the agent)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.core.state in states)
        return self.core.state

    # ---- the loop around the core ----
    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()  # CLOCK_MONOTONIC, the clock the core is written against

    def _spawn(self, coro: Coroutine[Any, Any, None], hook: bool = False) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        owner = self._hooks if hook else self._tasks
        owner.add(t)
        t.add_done_callback(owner.discard)

    def _pump(self) -> None:
        from nonstop.app.runtime.hooks import log_event, run_service_hook

        for action in self.core.take_actions():
            if isinstance(action, Launch):
                self._spawn(self._run_instance(action.generation))
            elif isinstance(action, Terminate | Kill):
                sig = signal.SIGKILL if isinstance(action, Kill) else self.config.stop_signum
                self._spawn(self._signal(action.generation, int(sig)))
            else:
                self._spawn(self._check(action))
        events = self.core.take_events()
        for ev in events:
            self.events.append(ev)
            log_event(ev)
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception:  # a broken hook must not stop the supervision
                    log.exception("on_event failed for %s", ev)
            if self.config.hook and isinstance(
                ev, StateChanged | CrashLoopDetected | CrashLoopCleared
            ):
                self._spawn(run_service_hook(self.config, ev), hook=True)
        if events:
            self._spawn(self._notify())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        nt = self.core.next_timer()
        if nt is not None and self._loop is not None:
            self._timer = self._loop.call_at(nt, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.core.handle_timer(self._now())
        self._pump()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run_instance(self, gen: int) -> None:
        from nonstop.app.runtime import LaunchError

        try:
            inst = await self.runtime.launch(self.config, self.log_dir)
        except Exception as e:  # LaunchError, or OSError on the log directory: still a death
            why = str(e) if isinstance(e, LaunchError) else f"{type(e).__name__}: {e}"
            self.core.launch_failed(gen, why, self._now())
            self._pump()
            return
        self._instance = (gen, inst)
        self.core.instance_started(gen, inst.pid, self._now())
        self._pump()
        if gen in self._pending_signal:
            await inst.signal(self._pending_signal.pop(gen))
        try:
            status: object = await inst.wait()
        except asyncio.CancelledError:  # supervisor torn down: do not leave the instance
            await inst.signal(signal.SIGKILL)
            raise
        except Exception as e:  # cannot learn how it ends: kill it, report it lost
            log.error("service %s: waiting for instance %d failed: %s", self.config.name, gen, e)
            await inst.signal(signal.SIGKILL)
            status = f"lost ({type(e).__name__}: {e})"
        if self._instance is not None and self._instance[0] == gen:
            self._instance = None
        self.core.instance_exited(gen, str(status), self._now())
        self._pump()

    async def _signal(self, gen: int, sig: int) -> None:
        if self._instance is not None and self._instance[0] == gen:
            await self._instance[1].signal(sig)
        else:  # not launched yet: deliver once it is
            self._pending_signal[gen] = sig

    async def _check(self, action: RunCheck) -> None:
        from nonstop.app.checks import run_check

        cfg = self.config.readiness if action.kind == READINESS else self.config.liveness
        assert cfg is not None
        try:
            ok, detail = await run_check(cfg)
        except Exception as e:  # a probe bug must not stall the machine (in_flight forever)
            ok, detail = False, f"probe error: {type(e).__name__}: {e}"
        self.core.check_result(action.generation, action.kind, ok, detail, self._now())
        self._pump()
