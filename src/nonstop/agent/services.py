"""The agent's side of the application manager: it runs the ``[[services]]`` that name a command.

- ``supervised_config(path, cfg, i)`` turns a ``[[services]]`` entry of the agent config into the
  supervisor's ``ServiceConfig`` (the services file's structs and checks, so the errors name
  ``services[i].readiness.tcp`` and the like). ``{vip}``, ``{port}``, ``{endpoint}``, ``{node}``
  and ``{instance}`` in the command are replaced by the service's values; the environment gets
  NONSTOP_ENDPOINT, NONSTOP_VIP, NONSTOP_PORT, NONSTOP_NODE and NONSTOP_INSTANCE.
- ``AgentServices`` starts one ``Supervisor`` per instance on every node, whatever the role: on a
  backup the service waits as a standby for the connections its node restores on promotion; on
  the master a restarted instance adopts the connections the session worker's endpoint held
  across the crash. ``instances = 2`` keeps a warm standby on the same node, which takes the
  connections at once when the active instance dies (no process start in the peer's pause).
- A crash loop (``crash_loop.deaths`` deaths in the window) calls ``on_fault(source, reason)``:
  the daemon declares a local fault, so a master gives its VIP (and its connections) to the
  backup instead of flapping. The supervisor then stays in ``crash-loop`` until ``reset(name)``
  (``nonstop service reset NAME``, through the agent's unix socket): the supervisor forgets the
  deaths and starts the instance again, and its ``CrashLoopCleared`` calls
  ``on_cleared(source, why)``, which withdraws exactly that fault (the node leaves FAULT when no
  other cause is left).
- ``status()`` is what ``nonstop status`` shows under ``services``: per instance the service,
  the instance number, the state, reason, restarts, last exit, pid or container; the crash loops
  in force; counters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from nonstop.app.runtime.spec import ServiceConfig as SupervisedConfig
from nonstop.app.runtime.spec import check_service
from nonstop.app.supervisor import CrashLoopCleared, CrashLoopDetected, Event, InstanceExited
from nonstop.common import ConfigError
from nonstop.config import AgentConfig

log = logging.getLogger("nonstop.agent")

# the [[services]] keys the supervisor takes as they are (the rest is the session takeover's)
_PASSED = (
    "command", "runtime", "env", "cwd", "user", "state_volume", "hook", "stop_signal",
    "stop_timeout_ms", "start_timeout_ms", "readiness", "liveness", "backoff", "crash_loop",
    "container",
)  # fmt: skip


def instance_name(name: str, instances: int, k: int) -> str:
    return name if instances == 1 else f"{name}-{k}"


def supervised_config(path: str, cfg: AgentConfig, index: int, k: int = 0) -> SupervisedConfig:
    """The supervisor's view of ``cfg.services[index]`` (instance ``k``); ConfigError if wrong."""
    svc = cfg.services[index]
    at = f"services[{index}]"
    name = instance_name(svc.name, svc.instances, k)
    endpoint = cfg.service_endpoint(svc)
    values = {
        "{vip}": svc.vip, "{port}": str(svc.port), "{endpoint}": endpoint,
        "{node}": cfg.node.id, "{instance}": str(k),
    }  # fmt: skip
    raw: dict[str, Any] = {key: getattr(svc, key) for key in _PASSED}
    raw = {key: v for key, v in raw.items() if v is not None}
    raw["name"] = name
    raw["command"] = [_subst(a, values) for a in svc.command]
    raw["env"] = dict(
        svc.env, NONSTOP_ENDPOINT=endpoint, NONSTOP_VIP=svc.vip, NONSTOP_PORT=str(svc.port),
        NONSTOP_NODE=cfg.node.id, NONSTOP_INSTANCE=str(k),
    )  # fmt: skip
    if svc.container is not None:
        c = dict(svc.container)
        # one container name per node and instance: lab nodes share the engine's storage
        c.setdefault("name", f"nonstop-{cfg.node.id}-{name}")
        # the endpoint's socket must be reachable inside the container, at the same path
        d = os.path.dirname(endpoint)
        c["volumes"] = [*c.get("volumes", []), f"{d}:{d}"]
        raw["container"] = c
    try:
        out = msgspec.convert(raw, SupervisedConfig)
    except msgspec.ValidationError as e:
        msg, _, where = str(e).partition(" - at `$")
        field = where.rstrip("`").lstrip(".")
        raise ConfigError(path, f"{at}.{field}" if field else at, msg) from e
    check_service(path, at, out)
    return out


def _subst(arg: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        arg = arg.replace(k, v)
    return arg


class AgentServices:
    """The supervised services of one agent. A crash loop calls ``on_fault(source, reason)``;
    clearing it (``reset``) calls ``on_cleared(source, why)``, with the same ``source``."""

    def __init__(
        self,
        cfg: AgentConfig,
        on_fault: Callable[[str, str], None],
        on_cleared: Callable[[str, str], None] | None = None,
    ) -> None:
        from nonstop.app.supervisor_io import Supervisor

        self.cfg, self.on_fault, self.on_cleared = cfg, on_fault, on_cleared
        self.log_dir = os.path.join(cfg.node.state_dir, "services", "logs")
        self.supervisors: list[Supervisor] = []
        self._of: dict[str, tuple[str, int]] = {}  # instance name -> (service name, k)
        self.crash_loops: dict[str, str] = {}  # instance -> the sentence, while in force
        self.counters: dict[str, int] = {"deaths": 0, "crash_loops": 0, "crash_loop_resets": 0}
        for i, s in enumerate(cfg.services):
            if not s.command:
                continue
            for k in range(s.instances):
                conf = supervised_config("<agent config>", cfg, i, k)
                sup = Supervisor(conf, on_event=self._event, log_dir=self.log_dir)
                self.supervisors.append(sup)
                self._of[conf.name] = (s.name, k)

    async def start(self) -> None:
        for sup in self.supervisors:
            await sup.start()

    async def stop(self) -> None:
        for sup in self.supervisors:
            try:
                await sup.stop()
            except Exception:  # one broken runtime must not keep the others running
                log.exception("service %s: stop failed", sup.config.name)

    def restart_running(self, reason: str) -> None:
        """A planned restart of every running instance (not a death): this node stepped down and
        its session worker dropped every service's channel, so each exits and must come back as
        a standby. Counted as deaths, 5 step-downs in a minute (a node preempted back and forth)
        were a crash loop that took the node out."""
        for sup in self.supervisors:
            sup.request_restart(reason)

    @staticmethod
    def fault_source(instance: str) -> str:
        """The key of an instance's crash loop among the node's local faults."""
        return f"service {instance}"

    def reset(self, name: str, reason: str = "crash loop reset by the operator") -> list[dict]:
        """Clear the crash loop of service ``name`` (every instance) or of instance ``name``.
        One row per instance: ``instance``, ``was`` (its state before), ``cleared`` (it was in a
        crash loop and starts again), ``state`` (after). KeyError if no such service."""
        sups = [s for s in self.supervisors if name in (s.config.name, self._of[s.config.name][0])]
        if not sups:
            known = sorted({svc for svc, _ in self._of.values()} | set(self._of))
            raise KeyError(
                f"no supervised service {name!r} on {self.cfg.node.id} "
                f"(known: {', '.join(known) or 'none'})"
            )
        rows = []
        for sup in sups:
            was = str(sup.core.state)
            cleared = sup.reset(reason)
            if not cleared:
                log.info("service %s: reset asked, not in a crash loop (%s)", sup.config.name, was)
            rows.append(
                {"instance": sup.config.name, "was": was, "cleared": cleared,
                 "state": str(sup.core.state)}
            )  # fmt: skip
        return rows

    def _event(self, ev: Event) -> None:
        if isinstance(ev, InstanceExited) and ev.death:
            self.counters["deaths"] += 1
        elif isinstance(ev, CrashLoopDetected):
            self.counters["crash_loops"] += 1
            reason = (
                f"service {ev.service} crash loop ({ev.deaths} deaths within {ev.window:g} s)"
            )
            self.crash_loops[ev.service] = reason
            log.error("%s: declaring a local fault, the VIP goes to the backup", reason)
            self.on_fault(self.fault_source(ev.service), reason)
        elif isinstance(ev, CrashLoopCleared):
            self.counters["crash_loop_resets"] += 1
            self.crash_loops.pop(ev.service, None)
            why = f"service {ev.service} crash loop cleared ({ev.reason})"
            log.warning("%s: withdrawing its local fault", why)
            if self.on_cleared is not None:
                self.on_cleared(self.fault_source(ev.service), why)

    def status(self) -> dict[str, Any]:
        rows = []
        for sup in self.supervisors:
            svc, k = self._of[sup.config.name]
            rows.append(dict(sup.status(), service=svc, instance=k))
        return {
            "instances": rows,
            "crash_loops": list(self.crash_loops.values()),
            "counters": dict(self.counters),
        }
