"""Service definitions: ``svc.toml`` decoded into msgspec structs, then checked across fields.

    state_dir = "/run/nonstop/services"      # status file and default log directory

    [[service]]
    name = "chat"
    command = ["python3", "examples/chat/server.py", "--port", "7000"]
    runtime = "process"                       # process (default) | podman | docker
    cwd = "."                                 # relative paths resolve against this file
    env = { PYTHONUNBUFFERED = "1" }
    state_volume = "/var/lib/chat"            # NONSTOP_STATE_DIR (/state in a container)
    readiness = { tcp = "127.0.0.1:7000", interval_ms = 100 }
    liveness = { http = "http://127.0.0.1:8080/health", failure_threshold = 3 }
    backoff = { initial_ms = 100, max_ms = 30000, factor = 2.0, jitter = 0.2 }
    crash_loop = { deaths = 5, window_ms = 60000 }
    container = { image = "localhost/nonstop-python:3.11", network = "ns:/run/netns/lab-a" }

A wrong file raises ConfigError(file, field, reason), e.g. ``service[0].readiness.tcp``.
"""

from __future__ import annotations

import os
import signal
from typing import Annotated, Literal

import msgspec

from nonstop.app.checks import CheckConfig
from nonstop.app.supervisor import Timing
from nonstop.common import ConfigError
from nonstop.config import _decode, _read, _resolve

Ms = Annotated[int, msgspec.Meta(ge=0)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=48, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class BackoffConfig(_Strict, kw_only=True):
    initial_ms: PositiveMs = 100
    max_ms: PositiveMs = 30000
    factor: Annotated[float, msgspec.Meta(ge=1.0, le=10.0)] = 2.0
    jitter: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.2
    reset_after_ms: Ms = 10000  # this long ready resets the backoff exponent


class CrashLoopConfig(_Strict, kw_only=True):
    deaths: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    window_ms: PositiveMs = 60000


class ContainerConfig(_Strict, kw_only=True):
    image: str
    name: str = ""  # default: nonstop-<service name>
    oci_runtime: str = "runc"  # crun fails on this machine kind; runc works
    network: str = "host"  # host | none | ns:/run/netns/NAME (podman)
    volumes: list[str] = []  # "host:container[:options]"
    workdir: str = ""  # inside the container (``cwd`` is for processes)
    nofile: Annotated[int, msgspec.Meta(ge=64)] = 20000  # must not exceed the host's hard limit
    nproc: Annotated[int, msgspec.Meta(ge=16)] = 4096
    extra_args: list[str] = []


class ServiceConfig(_Strict, kw_only=True):
    name: Name
    command: Annotated[list[str], msgspec.Meta(min_length=1)]
    runtime: Literal["process", "podman", "docker"] = "process"
    cwd: str = ""
    env: dict[str, str] = {}
    user: str = ""
    log_dir: str = ""  # default: <state_dir>/logs
    state_volume: str = ""
    # Run on every state change and crash loop: HOOK... EVENT SERVICE STATE REASON, and in the
    # environment NONSTOP_SERVICE, NONSTOP_EVENT, NONSTOP_STATE, NONSTOP_REASON (runtime.hooks).
    hook: list[str] = []
    hook_timeout_ms: PositiveMs = 5000
    stop_signal: str = "SIGTERM"
    stop_timeout_ms: PositiveMs = 5000
    start_timeout_ms: PositiveMs = 30000
    backoff: BackoffConfig = BackoffConfig()
    crash_loop: CrashLoopConfig = CrashLoopConfig()
    readiness: CheckConfig | None = None
    liveness: CheckConfig | None = None
    container: ContainerConfig | None = None

    @property
    def stop_signum(self) -> int:
        return int(signal.Signals[self.stop_signal])

    @property
    def container_name(self) -> str:
        return (self.container.name if self.container else "") or f"nonstop-{self.name}"

    def timing(self) -> Timing:
        b, c = self.backoff, self.crash_loop
        return Timing(
            start_timeout=self.start_timeout_ms / 1000,
            stop_timeout=self.stop_timeout_ms / 1000,
            backoff_initial=b.initial_ms / 1000,
            backoff_max=b.max_ms / 1000,
            backoff_factor=b.factor,
            backoff_jitter=b.jitter,
            reset_after=b.reset_after_ms / 1000,
            crash_loop_deaths=c.deaths,
            crash_loop_window=c.window_ms / 1000,
            readiness=self.readiness.spec() if self.readiness else None,
            liveness=self.liveness.spec() if self.liveness else None,
        )


class ServicesFile(_Strict, kw_only=True):
    state_dir: str = "/run/nonstop/services"
    service: Annotated[list[ServiceConfig], msgspec.Meta(min_length=1)]


def check_service(path: str, field: str, svc: ServiceConfig) -> None:
    if svc.stop_signal not in signal.Signals.__members__:
        raise ConfigError(path, f"{field}.stop_signal", f"{svc.stop_signal!r} is not a signal name")
    for kind in ("readiness", "liveness"):
        chk = getattr(svc, kind)
        if chk is not None and (p := chk.problem()) is not None:
            raise ConfigError(path, f"{field}.{kind}.{p[0]}", p[1])
    if svc.runtime != "process" and svc.container is None:
        raise ConfigError(path, f"{field}.container", f"runtime {svc.runtime} needs an image")
    if svc.runtime == "process" and svc.container is not None:
        raise ConfigError(path, f"{field}.runtime", "a container section needs podman or docker")
    if svc.backoff.initial_ms > svc.backoff.max_ms:
        raise ConfigError(path, f"{field}.backoff.initial_ms", "is above backoff.max_ms")
    for i, v in enumerate(svc.container.volumes if svc.container else []):
        if ":" not in v:
            raise ConfigError(path, f"{field}.container.volumes[{i}]", f"{v!r} is not host:path")


def load_services(path: str) -> ServicesFile:
    """Load and check a services file; relative paths resolve against the file's directory."""
    path = os.path.abspath(path)  # every path resolved from it is absolute (a mount needs it)
    cfg = _decode(path, _read(path), ServicesFile)
    assert isinstance(cfg, ServicesFile)
    names: list[str] = []
    out = []
    for i, svc in enumerate(cfg.service):
        field = f"service[{i}]"
        if svc.name in names:
            raise ConfigError(path, f"{field}.name", f"service {svc.name!r} is defined twice")
        names.append(svc.name)
        check_service(path, field, svc)
        vols = [
            _resolve(path, host) + sep + rest
            for host, sep, rest in (
                v.partition(":") for v in (svc.container.volumes if svc.container else [])
            )
        ]
        svc = msgspec.structs.replace(
            svc,
            cwd=os.path.normpath(_resolve(path, svc.cwd or ".")),
            log_dir=_resolve(path, svc.log_dir) if svc.log_dir else "",
            state_volume=_resolve(path, svc.state_volume) if svc.state_volume else "",
            container=msgspec.structs.replace(svc.container, volumes=vols)
            if svc.container
            else None,
        )
        out.append(svc)
    return msgspec.structs.replace(cfg, state_dir=_resolve(path, cfg.state_dir), service=out)


def log_dir(svc: ServiceConfig, state_dir: str) -> str:
    return svc.log_dir or os.path.join(state_dir, "logs")
