"""The speaker's TOML configuration (msgspec); errors carry the file, the field and the reason."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path

import msgspec

from nonstop.bgp.policy import Policy, PolicyConfig, parse_community
from nonstop.common import ConfigError

FAMILY_NAMES = {"ipv4": (1, 1), "ipv6": (2, 1)}


class PeerConfig(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    address: str
    asn: int
    port: int = 179
    passive: bool = False
    hold_time: int = 90
    connect_retry: float = 5.0
    families: list[str] = msgspec.field(default_factory=lambda: ["ipv4", "ipv6"])
    md5_password: str | None = None
    next_hop: str | None = None  # IPv4 next hop we announce (default: the session's address)
    next_hop6: str | None = None  # IPv6 next hop we announce (default: session's, if IPv6)
    import_policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig, name="import")
    export_policy: PolicyConfig = msgspec.field(default_factory=PolicyConfig, name="export")


class OriginateConfig(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str
    communities: list[str] = []
    med: int | None = None


class SpeakerConfig(msgspec.Struct, forbid_unknown_fields=True):
    asn: int
    router_id: str
    listen: str | None = None  # address to accept passive sessions on (None: no listener)
    port: int = 179
    api_socket: str = "/run/nonstop/bgp.sock"
    replica_socket: str | None = None  # serve a hot standby (journal + sockets) here
    kernel_table: int = 0  # 0: do not install routes; else the kernel table number
    # run as a protected service under the nonstop agent (takeover to another node):
    agent: str | None = None  # the agent's app endpoint for this service (unix socket)
    key_file: str | None = None  # the cluster key: authenticates the journal between nodes
    journal_listen: str | None = None  # "host:port" where this node serves its journal
    journal_peer: str | None = None  # "host:port" of the other node's journal (to follow)
    peers: list[PeerConfig] = []
    originate: list[OriginateConfig] = []


def validate(cfg: SpeakerConfig, source: str = "<config>") -> SpeakerConfig:
    def bad(field: str, reason: str) -> ConfigError:
        return ConfigError(source, field, reason)

    if not 1 <= cfg.asn <= 0xFFFFFFFF:
        raise bad("asn", "must be 1..4294967295")
    try:
        ipaddress.IPv4Address(cfg.router_id)
    except ValueError as e:
        raise bad("router_id", str(e)) from None
    if cfg.agent is not None:
        if cfg.listen is None:
            raise bad("listen", "needed with agent (the VIP the peers connect to)")
        for fld in ("key_file", "journal_listen", "journal_peer"):
            v = getattr(cfg, fld)
            if v is None:
                raise bad(fld, "needed with agent")
            if fld != "key_file":
                host, _, port = v.rpartition(":")
                try:
                    ipaddress.ip_address(host.strip("[]"))
                    if not 0 < int(port) < 65536:
                        raise ValueError(f"port {port} out of range")
                except ValueError as e:
                    raise bad(fld, f"host:port: {e}") from None
    names = set()
    for i, p in enumerate(cfg.peers):
        w = f"peers[{i}]"
        if p.name in names:
            raise bad(f"{w}.name", f"{p.name!r} defined twice")
        names.add(p.name)
        try:
            ipaddress.ip_address(p.address)
        except ValueError as e:
            raise bad(f"{w}.address", str(e)) from None
        if not 1 <= p.asn <= 0xFFFFFFFF:
            raise bad(f"{w}.asn", "must be 1..4294967295")
        if p.hold_time != 0 and p.hold_time < 3:
            raise bad(f"{w}.hold_time", "0 or at least 3 seconds")
        for f in p.families:
            if f not in FAMILY_NAMES:
                raise bad(f"{w}.families", f"{f!r}: ipv4 or ipv6")
        if p.md5_password is not None and not 1 <= len(p.md5_password) <= 80:
            raise bad(f"{w}.md5_password", "1..80 characters (TCP_MD5SIG_MAXKEYLEN)")
        for fld in ("next_hop", "next_hop6"):
            v = getattr(p, fld)
            if v is not None:
                try:
                    a = ipaddress.ip_address(v)
                except ValueError as e:
                    raise bad(f"{w}.{fld}", str(e)) from None
                if a.version != (4 if fld == "next_hop" else 6):
                    raise bad(f"{w}.{fld}", "wrong address family")
        for pol in ("import", "export"):
            try:
                Policy(getattr(p, f"{pol}_policy"))
            except ValueError as e:
                raise bad(f"{w}.{pol}", str(e)) from None
    for i, o in enumerate(cfg.originate):
        try:
            ipaddress.ip_network(o.prefix, strict=True)
        except ValueError as e:
            raise bad(f"originate[{i}].prefix", str(e)) from None
        try:
            for c in o.communities:
                parse_community(c)
        except ValueError as e:
            raise bad(f"originate[{i}].communities", str(e)) from None
    return cfg


def load(path: str | Path) -> SpeakerConfig:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), "", e.strerror or str(e)) from None
    return loads(text, str(p))


def loads(text: bytes | str, source: str = "<config>") -> SpeakerConfig:
    try:
        data = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"invalid TOML: {e}") from None
    try:
        cfg = msgspec.convert(data, SpeakerConfig)
    except msgspec.ValidationError as e:
        msg = str(e)
        field = ""
        if "at `$." in msg:
            field = msg.split("at `$.", 1)[1].rstrip("`")
            msg = msg.split(" - at ", 1)[0]
        raise ConfigError(source, field, msg) from None
    return validate(cfg, source)
