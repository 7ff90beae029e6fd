"""Virtual-server configuration: a TOML file decoded with msgspec, then checked across fields.

Errors are :class:`~nonstop.common.ConfigError` with the file, the dotted field and the reason.
Durations are milliseconds in the file. See examples/vs/front.toml for every key.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import msgspec

from nonstop.common import ConfigError
from nonstop.config import _decode, _read, _resolve
from nonstop.vs.pool import Policy, PoolConfig, WorkerSpec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class FrontSection(_Strict):
    key_file: str  # shared HMAC key of the registration and heartbeat datagrams
    control: str = "0.0.0.0:7800"  # UDP: worker registrations and heartbeats
    admin: str | None = None  # "addr:port": GET /status (JSON), for `nonstop vs status`
    registration: bool = True  # accept workers that register at run time
    freebind: bool = True  # IP_FREEBIND: listen on a VIP this node does not hold yet
    retries: Annotated[int, msgspec.Meta(ge=0, le=16)] = 3  # other workers tried per request
    connect_timeout_ms: PositiveMs = 500
    response_timeout_ms: PositiveMs = 10_000
    idle_per_worker: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 64  # keep-alive pool size
    splice: bool = True  # L4 data path through a pipe with os.splice (zero copy)
    # front takeover (docs/vs.md): the response journal between the two fronts of an HA pair
    journal_listen: str | None = None  # "addr:port" (TCP): the standby receives the journal here
    journal_peer: str | None = None  # "addr:port": the other front's journal_listen
    journal_timeout_ms: PositiveMs = 500  # no Ack in time: the standby is dropped, unjournaled
    journal_keep_ms: PositiveMs = 10_000  # how long the standby keeps a journaled response
    # fault injection (tests): hold each commit this long after its response is written, which
    # widens the window in which the client has bytes the backup's last commit does not cover
    test_commit_delay_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0


class ListenerConfig(_Strict):
    name: Name
    mode: Literal["http", "tcp", "rpc"]
    listen: str  # "address:port"
    policy: Policy = Policy.ROUND_ROBIN
    worker_port: Port | None = None  # default: the worker's port (rpc: its rpc_port)
    # http only: the agent's [[services]] endpoint (unix socket) for this VIP:port; the listener
    # then uses the prefixed socket API and its client connections survive a front takeover
    agent: str | None = None


class HealthConfig(_Strict):
    kind: Literal["none", "tcp", "http", "command"] = "tcp"
    interval_ms: PositiveMs = 500
    timeout_ms: PositiveMs = 500
    fall: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    rise: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    path: str = "/health"  # http
    expect_status: Annotated[int, msgspec.Meta(ge=100, le=599)] = 200
    command: list[str] = []  # command: argv; $WORKER_ADDR $WORKER_PORT in the environment


class PassiveConfig(_Strict):
    max_fails: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    cooldown_ms: PositiveMs = 2000


class HeartbeatSection(_Strict):
    dead_ms: PositiveMs = 60  # silence that takes one channel of a worker down
    drain_timeout_ms: PositiveMs = 10_000


class WorkerConfig(_Strict):
    id: Name
    addresses: dict[Name, str]  # channel -> address, in order of preference
    port: Port
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    rpc_port: Port | None = None
    heartbeat: bool = False  # the worker sends heartbeats on its channels (nonstop vs worker)


class VsConfig(_Strict):
    front: FrontSection
    listeners: list[ListenerConfig]
    health: HealthConfig = HealthConfig()
    passive: PassiveConfig = PassiveConfig()
    heartbeat: HeartbeatSection = HeartbeatSection()
    workers: list[WorkerConfig] = []

    def pool_config(self, policy: Policy = Policy.ROUND_ROBIN) -> PoolConfig:
        return PoolConfig(
            policy=policy,
            dead_interval=self.heartbeat.dead_ms / 1000,
            fall=self.health.fall,
            rise=self.health.rise,
            max_fails=self.passive.max_fails,
            cooldown=self.passive.cooldown_ms / 1000,
            drain_timeout=self.heartbeat.drain_timeout_ms / 1000,
        )

    def worker_specs(self) -> list[WorkerSpec]:
        return [
            WorkerSpec(
                id=w.id,
                addresses=dict(w.addresses),
                port=w.port,
                weight=w.weight,
                rpc_port=w.rpc_port,
                heartbeat=w.heartbeat,
            )
            for w in self.workers
        ]


def split_hostport(path: str, field: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(path, field, f"{value!r} is not address:port") from None
    return host, int(port)


def check_vs_config(path: str, cfg: VsConfig) -> None:
    split_hostport(path, "front.control", cfg.front.control)
    if cfg.front.admin is not None:
        split_hostport(path, "front.admin", cfg.front.admin)
    if not cfg.listeners:
        raise ConfigError(path, "listeners", "at least one listener")
    names = set()
    for i, ls in enumerate(cfg.listeners):
        split_hostport(path, f"listeners[{i}].listen", ls.listen)
        if ls.name in names:
            raise ConfigError(path, f"listeners[{i}].name", f"{ls.name!r} used twice")
        names.add(ls.name)
        if ls.agent is not None and ls.mode != "http":
            raise ConfigError(path, f"listeners[{i}].agent", "only an http listener is protected")
    for field in ("journal_listen", "journal_peer"):
        if (v := getattr(cfg.front, field)) is not None:
            split_hostport(path, f"front.{field}", v)
    if cfg.health.kind == "command" and not cfg.health.command:
        raise ConfigError(path, "health.command", "kind = 'command' needs a command")
    if cfg.health.timeout_ms > cfg.health.interval_ms * 4:
        raise ConfigError(path, "health.timeout_ms", "more than 4 check intervals")
    ids = set()
    for i, w in enumerate(cfg.workers):
        if w.id in ids:
            raise ConfigError(path, f"workers[{i}].id", f"{w.id!r} used twice")
        ids.add(w.id)
        if not w.addresses:
            raise ConfigError(path, f"workers[{i}].addresses", "at least one channel address")
        for ch, a in w.addresses.items():
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise ConfigError(
                    path, f"workers[{i}].addresses.{ch}", f"{a!r} is not an IP address"
                ) from None
    if any(ls.mode == "rpc" for ls in cfg.listeners):
        for i, w in enumerate(cfg.workers):
            if w.rpc_port is None:
                raise ConfigError(path, f"workers[{i}].rpc_port", "an rpc listener needs it")


def load_vs_config(path: str) -> tuple[VsConfig, bytes]:
    """Load, check and return a front config and its key."""
    from nonstop.auth import load_key

    cfg = _decode(path, _read(path), VsConfig)
    assert isinstance(cfg, VsConfig)
    check_vs_config(path, cfg)
    key = load_key(_resolve(path, cfg.front.key_file), config_file=path, field="front.key_file")
    return cfg, key
