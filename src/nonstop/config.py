"""Agent and witness configuration: TOML files decoded into msgspec structs, then checked.

A wrong config is rejected with :class:`~nonstop.common.ConfigError` naming the file, the field
(a dotted path such as ``vips[0].address``) and the reason; nothing is adjusted silently.
Durations are in milliseconds in the file (``*_ms``) and exposed in seconds by helper properties.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from typing import Annotated, Any, Literal

import msgspec

from nonstop.common import ConfigError

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Ms = Annotated[int, msgspec.Meta(ge=0)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class NodeConfig(_Strict, kw_only=True):
    id: Name
    priority: Annotated[int, msgspec.Meta(ge=1, le=254)] = 100
    group: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 1
    key_file: str
    state_dir: str = "/run/nonstop"


class HeartbeatConfig(_Strict, kw_only=True):
    interval_ms: PositiveMs = 100
    dead_after: Annotated[int, msgspec.Meta(ge=2, le=1000)] = 3
    copies: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    port: Port = 7780
    replay_window: Annotated[int, msgspec.Meta(ge=8, le=4096)] = 256
    # Lower the ARP/NDP retransmit time of the channel interfaces to the interval, so a healed
    # link carries heartbeats again at once (see nonstop.agent.neigh).
    tune_neighbours: bool = True

    @property
    def interval(self) -> float:
        return self.interval_ms / 1000

    @property
    def dead_interval(self) -> float:
        return self.interval_ms * self.dead_after / 1000


class ChannelConfig(_Strict, kw_only=True):
    name: Name
    address: str  # this node's address on the channel


class PeerConfig(_Strict, kw_only=True):
    id: Name
    addresses: dict[str, str]  # channel name -> the peer's address on it


class FailoverConfig(_Strict, kw_only=True):
    preempt: bool = True
    preempt_delay_ms: Ms = 0
    # The fence guard drops this node's VIPs when the agent has not ticked for this long
    # (0: derived, (dead_after - 1) * interval). Must stay under the dead interval.
    fence_timeout_ms: Ms = 0
    realtime: bool = True  # SCHED_FIFO, to keep ticking under CPU contention
    lock_memory: bool = False  # mlockall too (slows the agent's death, so its EOF, by ~10 ms)
    # Upper bound an operator accepts for detection + VIP move; checked against the timers.
    takeover_budget_ms: Ms = 0


class VipConfig(_Strict, kw_only=True):
    address: str  # with prefix length: 10.77.0.100/24 or fd77::100/64
    interface: str
    garp_count: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    garp_interval_ms: Ms = 10


class WitnessRef(_Strict, kw_only=True):
    addresses: dict[str, str]  # channel name -> the witness's address on it
    port: Port = 7790
    lease_ms: PositiveMs = 0  # 0: derived, (dead_after - 1/2) * interval


class ApiConfig(_Strict, kw_only=True):
    listen: str = ""  # "host:port" for /health, /master, /backup, /metrics; "" for none


class HooksConfig(_Strict, kw_only=True):
    master: str = ""
    backup: str = ""
    fault: str = ""
    stopping: str = ""
    timeout_ms: PositiveMs = 5000


class ServiceConfig(_Strict, kw_only=True):
    """A protected TCP service: its connections to vip:port survive the master's death."""

    name: Name
    vip: str  # one of the [[vips]] addresses, without the prefix length
    port: Port
    sync_channel: str = ""  # the channel the session sync runs on ("" : the first channel)
    sync_port: Port = 7781  # UDP, on this node's address on sync_channel (the backup listens)
    queue: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # NFQUEUE number (0: 100 + index)
    endpoint: str = ""  # the app library's unix socket ("": <state_dir>/<name>.sock)
    # TCP-MD5 (RFC 2385) keys: peer address -> password (e.g. a BGP session's): a restored
    # connection gets its key before repair off, and the ACK clamp signs what it rewrites again
    md5: dict[str, str] = {}
    # -- run by the agent (issue 4; nonstop.agent.services): with a command, the agent's
    # Supervisor starts it on every node (a standby on a backup), restarts it with backoff, and
    # gives the VIP up on a crash loop. The same keys as a services file (docs/app-manager.md).
    command: list[str] = []  # empty: the service is started by someone else
    runtime: Literal["process", "podman", "docker"] = "process"
    instances: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1  # > 1: warm standbys on this node
    env: dict[str, str] = {}
    cwd: str = ""  # relative: against this file's directory
    user: str = ""
    state_volume: str = ""
    hook: list[str] = []  # on every service event: HOOK... EVENT SERVICE STATE REASON
    stop_signal: str = "SIGTERM"
    stop_timeout_ms: PositiveMs = 5000
    start_timeout_ms: PositiveMs = 30000
    readiness: dict[str, Any] | None = None  # { tcp = "host:port" } | { http = URL } | ...
    liveness: dict[str, Any] | None = None
    backoff: dict[str, Any] = {}  # initial_ms, max_ms, factor, jitter, reset_after_ms
    crash_loop: dict[str, Any] = {}  # deaths, window_ms
    container: dict[str, Any] | None = None  # image, network, volumes, ... (podman, docker)


class AgentConfig(_Strict, kw_only=True):
    node: NodeConfig
    channels: list[ChannelConfig]
    peers: list[PeerConfig]
    vips: list[VipConfig] = []
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    failover: FailoverConfig = FailoverConfig()
    witness: WitnessRef | None = None
    api: ApiConfig = ApiConfig()
    hooks: HooksConfig = HooksConfig()
    services: list[ServiceConfig] = []

    # Filled in by load_agent_config: where the file was (relative paths resolve against it).
    @property
    def fence_timeout(self) -> float:
        ms = self.failover.fence_timeout_ms or (self.heartbeat.dead_after - 1) * (
            self.heartbeat.interval_ms
        )
        return ms / 1000

    @property
    def lease(self) -> float:
        """The witness lease a master renews every half interval. Default: half an interval
        under the dead interval. A master's last renewal reaches the witness at most half an
        interval before it dies, so its lease there runs out at most half an interval after a
        backup can first detect the silence (the backup asks again right at the expiry the
        denial names). And a master keeps it through a stall of 0.95 * lease - interval / 2
        (18.75 ms at 10 ms x 3), past the 15 ms at which its stall check steps it down anyway:
        it was (dead_after - 1) intervals renewed every interval, which a 10 ms hiccup of the
        machine lapsed (a lone master then demoted itself and dropped its service)."""
        assert self.witness is not None
        hb = self.heartbeat
        ms = self.witness.lease_ms or (hb.dead_after - 0.5) * hb.interval_ms
        return ms / 1000

    @property
    def socket_path(self) -> str:
        return os.path.join(self.node.state_dir, "agent.sock")

    def service_endpoint(self, svc: ServiceConfig) -> str:
        return svc.endpoint or os.path.join(self.node.state_dir, f"{svc.name}.sock")

    def service_queue(self, index: int) -> int:
        return self.services[index].queue or 100 + index

    def sync_channel(self, svc: ServiceConfig) -> str:
        return svc.sync_channel or self.channels[0].name


class WitnessListen(_Strict, kw_only=True):
    id: Name = "witness"
    key_file: str
    listen: list[str]  # "address:port" on every channel
    state_dir: str = "/run/nonstop"


class WitnessConfig(_Strict, kw_only=True):
    witness: WitnessListen


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _decode(path: str, raw: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, "<syntax>", str(e)) from e
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as e:
        m = _AT.match(str(e))
        assert m is not None
        field = (m.group("path") or "").lstrip(".") or "<root>"
        raise ConfigError(path, field, m.group("msg")) from e


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(path, "<file>", e.strerror or str(e)) from e


def _resolve(path: str, value: str) -> str:
    return value if os.path.isabs(value) else os.path.join(os.path.dirname(path), value)


def _check_ip(path: str, field: str, value: str, *, prefix: bool = False) -> None:
    try:
        if prefix:
            if "/" not in value:
                raise ValueError("needs a prefix length, e.g. 10.77.0.100/24")
            ipaddress.ip_interface(value)
        else:
            ipaddress.ip_address(value)
    except ValueError as e:
        raise ConfigError(path, field, f"{value!r} is not a valid address: {e}") from e


def _check_family(path: str, field: str, value: str, ours: str, what: str) -> None:
    """``value`` is reached from ``ours`` (this node's address on a channel): same IP version."""
    v, o = ipaddress.ip_address(value).version, ipaddress.ip_address(ours).version
    if v != o:
        raise ConfigError(path, field, f"{value} is IPv{v}, {what} is IPv{o} ({ours})")


def check_agent_config(path: str, cfg: AgentConfig) -> None:
    """Cross-field checks (Patroni's _validate_and_adjust_timeouts, minus the adjusting)."""
    hb, fo = cfg.heartbeat, cfg.failover
    if not cfg.channels:
        raise ConfigError(path, "channels", "at least one channel is needed (two for redundancy)")
    names = [c.name for c in cfg.channels]
    for i, c in enumerate(cfg.channels):
        if names.index(c.name) != i:
            raise ConfigError(path, f"channels[{i}].name", f"channel {c.name!r} is listed twice")
        _check_ip(path, f"channels[{i}].address", c.address)
    if not cfg.peers:
        raise ConfigError(path, "peers", "at least one peer is needed")
    ids = [cfg.node.id]
    for i, p in enumerate(cfg.peers):
        if p.id in ids:
            raise ConfigError(path, f"peers[{i}].id", f"node id {p.id!r} is used twice")
        ids.append(p.id)
        for ch, addr in p.addresses.items():
            if ch not in names:
                raise ConfigError(path, f"peers[{i}].addresses.{ch}", f"no channel named {ch!r}")
            _check_ip(path, f"peers[{i}].addresses.{ch}", addr)
            _check_family(path, f"peers[{i}].addresses.{ch}", addr,
                          cfg.channels[names.index(ch)].address, f"this node's address on {ch}")
        if not p.addresses:
            raise ConfigError(
                path, f"peers[{i}].addresses", "the peer has no address on any channel"
            )
    for i, v in enumerate(cfg.vips):
        _check_ip(path, f"vips[{i}].address", v.address, prefix=True)
    if cfg.witness is not None:
        for ch, addr in cfg.witness.addresses.items():
            if ch not in names:
                raise ConfigError(path, f"witness.addresses.{ch}", f"no channel named {ch!r}")
            _check_ip(path, f"witness.addresses.{ch}", addr)
            _check_family(path, f"witness.addresses.{ch}", addr,
                          cfg.channels[names.index(ch)].address, f"this node's address on {ch}")
        if not cfg.witness.addresses:
            raise ConfigError(path, "witness.addresses", "the witness has no address")
        lease_ms = cfg.lease * 1000
        if lease_ms < 2 * hb.interval_ms:
            raise ConfigError(
                path,
                "witness.lease_ms",
                f"{lease_ms:.0f} ms cannot be renewed in time at a {hb.interval_ms} ms interval; "
                f"use at least 2 * heartbeat.interval_ms = {2 * hb.interval_ms}",
            )
    dead_ms = hb.interval_ms * hb.dead_after
    fence_ms = cfg.fence_timeout * 1000
    if fence_ms < hb.interval_ms:
        raise ConfigError(
            path,
            "failover.fence_timeout_ms",
            f"{fence_ms:.0f} ms is shorter than one heartbeat interval ({hb.interval_ms} ms): "
            "the guard would fence a healthy agent",
        )
    if fence_ms >= dead_ms:
        raise ConfigError(
            path,
            "failover.fence_timeout_ms",
            f"{fence_ms:.0f} ms must be under the dead interval (interval_ms * dead_after = "
            f"{dead_ms} ms), or a hung master keeps its VIP after the backup has taken it",
        )
    if fo.takeover_budget_ms:
        garp_ms = max((v.garp_interval_ms for v in cfg.vips), default=0)
        need = dead_ms + hb.interval_ms + garp_ms
        if need > fo.takeover_budget_ms:
            raise ConfigError(
                path,
                "failover.takeover_budget_ms",
                f"{fo.takeover_budget_ms} ms is less than the worst case of the timers: "
                f"interval_ms * dead_after ({dead_ms}) + one interval of phase ({hb.interval_ms}) "
                f"+ first GARP spacing ({garp_ms}) = {need} ms",
            )
    _check_services(path, cfg, names)
    if cfg.api.listen:
        host, _, port = cfg.api.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(path, "api.listen", f"{cfg.api.listen!r} is not host:port")


def _check_services(path: str, cfg: AgentConfig, channels: list[str]) -> None:
    vips = {ipaddress.ip_interface(v.address).ip for v in cfg.vips}
    seen: dict[str, int] = {}
    queues: dict[int, int] = {}
    for i, svc in enumerate(cfg.services):
        at = f"services[{i}]"
        if svc.name in seen:
            raise ConfigError(path, f"{at}.name", f"service {svc.name!r} is listed twice")
        seen[svc.name] = i
        _check_ip(path, f"{at}.vip", svc.vip)
        if ipaddress.ip_address(svc.vip) not in vips:
            raise ConfigError(path, f"{at}.vip", f"{svc.vip} is not one of the [[vips]] addresses")
        ch = cfg.sync_channel(svc)
        if ch not in channels:
            raise ConfigError(path, f"{at}.sync_channel", f"no channel named {ch!r}")
        if svc.sync_port == cfg.heartbeat.port:
            raise ConfigError(path, f"{at}.sync_port", "is the heartbeat port")
        q = cfg.service_queue(i)
        if q in queues:
            raise ConfigError(path, f"{at}.queue", f"NFQUEUE {q} is used by services[{queues[q]}]")
        queues[q] = i
        for addr, pw in svc.md5.items():
            _check_ip(path, f"{at}.md5", addr)
            _check_family(path, f"{at}.md5", addr, svc.vip, "the service's vip")
            if not 1 <= len(pw.encode()) <= 80:
                raise ConfigError(path, f"{at}.md5", f"the key for {addr} is not 1..80 bytes")
        if svc.command:  # the supervised part: checked with the services file's own rules
            from nonstop.agent.services import supervised_config

            supervised_config(path, cfg, i)
    ports = [(s.sync_channel or channels[0], s.sync_port) for s in cfg.services]
    for i, p in enumerate(ports):
        if ports.index(p) != i:
            raise ConfigError(path, f"services[{i}].sync_port", f"{p[1]} is used twice on {p[0]}")


def load_agent_config(path: str) -> tuple[AgentConfig, bytes]:
    """Load, check and return an agent config and its shared key."""
    from nonstop.auth import load_key

    cfg = _decode(path, _read(path), AgentConfig)
    assert isinstance(cfg, AgentConfig)
    check_agent_config(path, cfg)
    key_path = _resolve(path, cfg.node.key_file)
    key = load_key(key_path, config_file=path, field="node.key_file")
    node = msgspec.structs.replace(
        cfg.node, key_file=key_path, state_dir=_resolve(path, cfg.node.state_dir)
    )
    services = [  # a supervised service's relative cwd: against this file
        msgspec.structs.replace(s, cwd=_resolve(path, s.cwd or ".")) if s.command else s
        for s in cfg.services
    ]
    return msgspec.structs.replace(cfg, node=node, services=services), key


def load_witness_config(path: str) -> tuple[WitnessConfig, bytes]:
    from nonstop.auth import load_key

    cfg = _decode(path, _read(path), WitnessConfig)
    assert isinstance(cfg, WitnessConfig)
    for i, item in enumerate(cfg.witness.listen):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(path, f"witness.listen[{i}]", f"{item!r} is not address:port")
        _check_ip(path, f"witness.listen[{i}]", host.strip("[]"))
    key_path = _resolve(path, cfg.witness.key_file)
    key = load_key(key_path, config_file=path, field="witness.key_file")
    w = msgspec.structs.replace(
        cfg.witness, key_file=key_path, state_dir=_resolve(path, cfg.witness.state_dir)
    )
    return msgspec.structs.replace(cfg, witness=w), key
