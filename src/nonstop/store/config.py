"""Config of a store-backed node (``nonstop groups agent --config node.toml``).

A TOML file decoded into msgspec structs, then checked across fields; a bad one is rejected with
:class:`~nonstop.common.ConfigError` (file, field, reason), never adjusted. The fencing rule
(Patroni's ``loop_wait + 2 * retry_timeout <= ttl``, ours)::

    store.lease_ttl_ms > store.keepalive_interval_ms * store.keepalive_misses + store.drop_margin_ms

so a master that misses ``keepalive_misses`` renewals in a row still drops its VIPs
``drop_margin_ms`` before the store can expire its lease and let another node take the group.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated

import msgspec

from nonstop.common import ConfigError
from nonstop.config import (
    ChannelConfig,
    HeartbeatConfig,
    HooksConfig,
    Name,
    Port,
    PositiveMs,
    _check_ip,
    _decode,
    _read,
    _resolve,
    _Strict,
)

MAX_NODES = 24  # one bit per node in the failsafe "I hear you" bitmap of the heartbeat flags


class StoreNode(_Strict, kw_only=True):
    id: Name
    key_file: str
    state_dir: str = "/run/nonstop"
    cluster: Name = "default"


class StoreSettings(_Strict, kw_only=True):
    kind: str = "etcd"  # etcd | embedded
    endpoints: list[str] = []
    lease_ttl_ms: PositiveMs = 1000
    keepalive_interval_ms: PositiveMs = 100
    keepalive_misses: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    drop_margin_ms: PositiveMs = 200
    failsafe: bool = True
    timeout_ms: PositiveMs = 500  # plain calls (reads, acquire, release)
    # after its first renewal, how long a node lets better-ranked nodes come up before it takes
    # their groups (0: one lease TTL); no preemption later, so this is what spreads the groups
    startup_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=600_000)] = 0

    @property
    def ttl(self) -> float:
        return self.lease_ttl_ms / 1000

    @property
    def interval(self) -> float:
        return self.keepalive_interval_ms / 1000

    @property
    def margin(self) -> float:
        return self.drop_margin_ms / 1000

    @property
    def startup_grace(self) -> float:
        return (self.startup_grace_ms or self.lease_ttl_ms) / 1000

    @property
    def fence_timeout(self) -> float:
        """The guard's timeout, fed after each renewal: drops the VIPs a margin before the
        store can expire the lease, even when the agent hangs."""
        return (self.lease_ttl_ms - self.drop_margin_ms - self.keepalive_interval_ms) / 1000


class MemberConfig(_Strict, kw_only=True):
    id: Name
    addresses: dict[str, str]  # channel -> its address there (heartbeats)


class GroupService(_Strict, kw_only=True):
    """A protected TCP service on its group's VIP: its connections follow the group on every
    move (the session worker: sync to the group's standby, TCP_REPAIR restore on takeover)."""

    name: Name  # unique across every group (one session worker per node serves them all)
    port: Port
    sync_channel: str = ""  # "": the first channel; the standby's address there gets the sync
    sync_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # UDP; 0: 7781 + its index
    queue: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # NFQUEUE number; 0: 100 + index
    endpoint: str = ""  # the app library's unix socket ("": <state_dir>/<name>.sock)


class GroupConfig(_Strict, kw_only=True):
    name: Name
    vip: str  # with prefix length
    interface: str
    priorities: dict[str, Annotated[int, msgspec.Meta(ge=1, le=254)]]  # node -> priority
    garp_count: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    garp_interval_ms: int = 10
    services: list[GroupService] = []


class StoreAgentConfig(_Strict, kw_only=True):
    node: StoreNode
    store: StoreSettings = StoreSettings()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    channels: list[ChannelConfig]
    members: list[MemberConfig]  # every node of the cluster, this one included, same order
    groups: list[GroupConfig] = []
    hooks: HooksConfig = HooksConfig()

    @property
    def node_ids(self) -> list[str]:
        return [m.id for m in self.members]

    def services(self) -> list[tuple[GroupConfig, GroupService]]:
        """Every (group, service), in config order (the index gives the defaults below)."""
        return [(g, s) for g in self.groups for s in g.services]

    def sync_channel(self, svc: GroupService) -> str:
        return svc.sync_channel or self.channels[0].name

    def sync_port(self, index: int) -> int:
        return self.services()[index][1].sync_port or 7781 + index

    def service_queue(self, index: int) -> int:
        return self.services()[index][1].queue or 100 + index

    def service_endpoint(self, svc: GroupService) -> str:
        return svc.endpoint or os.path.join(self.node.state_dir, f"{svc.name}.sock")

    @property
    def failsafe_hold(self) -> float:
        """How long a node defers to a master it last heard in failsafe mode: longer than that
        master's guard can keep a VIP without news (fence timeout), plus detection and margin."""
        return self.store.fence_timeout + self.heartbeat.dead_interval + self.store.margin


def check_store_config(path: str, cfg: StoreAgentConfig) -> None:
    st = cfg.store
    if st.kind not in ("etcd", "embedded"):
        raise ConfigError(path, "store.kind", f"{st.kind!r} is not etcd or embedded")
    if st.kind == "etcd":
        if not st.endpoints:
            raise ConfigError(path, "store.endpoints", "etcd needs at least one endpoint")
        for i, e in enumerate(st.endpoints):
            if not e.startswith(("http://", "https://")):
                raise ConfigError(path, f"store.endpoints[{i}]", f"{e!r} is not an http(s) URL")
    if st.lease_ttl_ms % 1000:
        raise ConfigError(
            path, "store.lease_ttl_ms", f"{st.lease_ttl_ms} ms: etcd leases are whole seconds"
        )
    need = st.keepalive_interval_ms * st.keepalive_misses + st.drop_margin_ms
    if st.lease_ttl_ms <= need:
        raise ConfigError(
            path,
            "store.lease_ttl_ms",
            f"{st.lease_ttl_ms} ms must exceed keepalive_interval_ms * keepalive_misses + "
            f"drop_margin_ms = {st.keepalive_interval_ms} * {st.keepalive_misses} + "
            f"{st.drop_margin_ms} = {need} ms, or a master could keep its VIP after its lease "
            "expired",
        )
    if st.drop_margin_ms < 2 * cfg.heartbeat.interval_ms:
        raise ConfigError(
            path,
            "store.drop_margin_ms",
            f"{st.drop_margin_ms} ms is under two heartbeat intervals "
            f"({2 * cfg.heartbeat.interval_ms} ms): a failsafe flag could arrive too late",
        )
    if st.timeout_ms >= st.lease_ttl_ms:
        raise ConfigError(path, "store.timeout_ms", "must be under store.lease_ttl_ms")
    names = [c.name for c in cfg.channels]
    if not names:
        raise ConfigError(path, "channels", "at least one channel is needed")
    for i, c in enumerate(cfg.channels):
        _check_ip(path, f"channels[{i}].address", c.address)
    ids = cfg.node_ids
    if cfg.node.id not in ids:
        raise ConfigError(path, "members", f"this node {cfg.node.id!r} is not listed")
    if len(set(ids)) != len(ids):
        raise ConfigError(path, "members", "a node id is listed twice")
    if len(ids) > MAX_NODES:
        raise ConfigError(path, "members", f"at most {MAX_NODES} nodes")
    if st.kind == "embedded" and len(ids) != 2:
        raise ConfigError(path, "store.kind", "the embedded store serves a pair (two members)")
    for i, m in enumerate(cfg.members):
        for ch, addr in m.addresses.items():
            if ch not in names:
                raise ConfigError(path, f"members[{i}].addresses.{ch}", f"no channel {ch!r}")
            _check_ip(path, f"members[{i}].addresses.{ch}", addr)
    seen: set[str] = set()
    for i, g in enumerate(cfg.groups):
        if g.name in seen:
            raise ConfigError(path, f"groups[{i}].name", f"group {g.name!r} is listed twice")
        seen.add(g.name)
        try:
            ipaddress.ip_interface(g.vip)
            if "/" not in g.vip:
                raise ValueError("needs a prefix length")
        except ValueError as e:
            raise ConfigError(path, f"groups[{i}].vip", f"{g.vip!r}: {e}") from None
        for n in g.priorities:
            if n not in ids:
                raise ConfigError(path, f"groups[{i}].priorities.{n}", f"no member {n!r}")
        if not g.priorities:
            raise ConfigError(path, f"groups[{i}].priorities", "no node may serve the group")
    _check_services(path, cfg, names)


def _check_services(path: str, cfg: StoreAgentConfig, channels: list[str]) -> None:
    names: set[str] = set()
    queues: dict[int, str] = {}
    syncs: dict[tuple[str, int], str] = {}
    index = 0
    for gi, g in enumerate(cfg.groups):
        for si, svc in enumerate(g.services):
            at = f"groups[{gi}].services[{si}]"
            if svc.name in names:
                raise ConfigError(path, f"{at}.name", f"service {svc.name!r} is listed twice")
            names.add(svc.name)
            ch = cfg.sync_channel(svc)
            if ch not in channels:
                raise ConfigError(path, f"{at}.sync_channel", f"no channel named {ch!r}")
            for n in g.priorities:
                m = next(m for m in cfg.members if m.id == n)
                if ch not in m.addresses:
                    raise ConfigError(
                        path, f"{at}.sync_channel",
                        f"member {n!r} serves {g.name!r} but has no address on {ch!r}",
                    )  # fmt: skip
            port = cfg.sync_port(index)
            if port == cfg.heartbeat.port:
                raise ConfigError(path, f"{at}.sync_port", f"{port} is the heartbeat port")
            if (ch, port) in syncs:
                raise ConfigError(
                    path, f"{at}.sync_port", f"{port} on {ch!r} is used by {syncs[(ch, port)]}"
                )
            syncs[(ch, port)] = at
            q = cfg.service_queue(index)
            if q in queues:
                raise ConfigError(path, f"{at}.queue", f"NFQUEUE {q} is used by {queues[q]}")
            queues[q] = at
            index += 1


def parse_store_config(path: str, raw: bytes) -> StoreAgentConfig:
    cfg = _decode(path, raw, StoreAgentConfig)
    assert isinstance(cfg, StoreAgentConfig)
    check_store_config(path, cfg)
    return cfg


def load_store_config(path: str) -> tuple[StoreAgentConfig, bytes]:
    from nonstop.auth import load_key

    cfg = parse_store_config(path, _read(path))
    key_path = _resolve(path, cfg.node.key_file)
    key = load_key(key_path, config_file=path, field="node.key_file")
    node = msgspec.structs.replace(
        cfg.node, key_file=key_path, state_dir=_resolve(path, cfg.node.state_dir)
    )
    return msgspec.structs.replace(cfg, node=node), key
