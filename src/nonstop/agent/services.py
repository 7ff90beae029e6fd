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
- A crash loop (``crash_loop.deaths`` deaths in the window) calls ``on_fault(reason)``: the daemon
  declares a local fault, so a master gives its VIP (and its connections) to the backup instead
  of flapping. The supervisor then stays in ``crash-loop``; restarting the agent clears it.
- ``status()`` is what ``nonstop status`` shows under ``services``: per instance the state,
  reason, restarts, last exit, pid or container.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from nonstop.app.runtime.spec import ServiceConfig as SupervisedConfig
from nonstop.app.runtime.spec import check_service
from nonstop.app.supervisor import CrashLoopDetected, Event, InstanceExited
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
    """The supervised services of one agent. ``on_fault(reason)`` is called on a crash loop."""

    def __init__(self, cfg: AgentConfig, on_fault: Callable[[str], None]) -> None:
        from nonstop.app.supervisor_io import Supervisor

        self.cfg, self.on_fault = cfg, on_fault
        self.log_dir = os.path.join(cfg.node.state_dir, "services", "logs")
        self.supervisors: list[Supervisor] = []
        self.crash_loops: list[str] = []  # the sentences, for status
        self.counters: dict[str, int] = {"deaths": 0, "crash_loops": 0}
        for i, s in enumerate(cfg.services):
            if not s.command:
                continue
            for k in range(s.instances):
                conf = supervised_config("<agent config>", cfg, i, k)
                sup = Supervisor(conf, on_event=self._event, log_dir=self.log_dir)
                self.supervisors.append(sup)

    async def start(self) -> None:
        for sup in self.supervisors:
            await sup.start()

    async def stop(self) -> None:
        for sup in self.supervisors:
            try:
                await sup.stop()
            except Exception:  # one broken runtime must not keep the others running
                log.exception("service %s: stop failed", sup.config.name)

    def _event(self, ev: Event) -> None:
        if isinstance(ev, InstanceExited) and ev.death:
            self.counters["deaths"] += 1
        elif isinstance(ev, CrashLoopDetected):
            self.counters["crash_loops"] += 1
            reason = (
                f"service {ev.service} crash loop ({ev.deaths} deaths within {ev.window:g} s)"
            )
            self.crash_loops.append(reason)
            log.error("%s: declaring a local fault, the VIP goes to the backup", reason)
            self.on_fault(reason)

    def status(self) -> dict[str, Any]:
        return {
            "instances": [sup.status() for sup in self.supervisors],
            "crash_loops": list(self.crash_loops),
            "counters": dict(self.counters),
        }
