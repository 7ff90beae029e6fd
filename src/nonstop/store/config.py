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
from typing import Annotated

import msgspec

from nonstop.common import ConfigError
from nonstop.config import (
    ChannelConfig,
    HeartbeatConfig,
    HooksConfig,
    Name,
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


class GroupConfig(_Strict, kw_only=True):
    name: Name
    vip: str  # with prefix length
    interface: str
    priorities: dict[str, Annotated[int, msgspec.Meta(ge=1, le=254)]]  # node -> priority
    garp_count: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    garp_interval_ms: int = 10


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
