"""Lab topologies: channels (one Linux bridge each) and hosts (one network namespace each).

A topology is plain data. It is declared in code (``Topology().channel(...)``, ``.host(...)``) or
read from TOML (``Topology.from_toml``); ``to_dict`` / ``from_dict`` round-trip it, which is how a
lab's state file remembers what it built. Every address lies in 10.77.0.0/16 or fd77::/16: the lab
never configures anything else.

Host number ``n`` on a channel gives the IPv4 address ``net[n]`` and the IPv6 address whose last
group reads like the decimal number (``11`` -> ``fd77::11``), so both families are easy to read.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nonstop.common import ConfigError

LAB_V4 = ipaddress.IPv4Network("10.77.0.0/16")
LAB_V6 = ipaddress.IPv6Network("fd77::/16")

# A channel name is the host-side interface name and part of the switch-side one ("h12-lan"):
# keep it short enough that both fit in IFNAMSIZ (15 characters).
_CHANNEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,9}$")
_HOST_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAX_HOSTS = 999


@dataclass(frozen=True, slots=True)
class Channel:
    """One broadcast domain: a bridge in the lab's switch namespace."""

    name: str
    v4: ipaddress.IPv4Network | None
    v6: ipaddress.IPv6Network | None


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One host: a namespace joined to each of its channels with host number ``channels[c]``."""

    name: str
    channels: dict[str, int] = field(default_factory=dict)


def v6_host_id(number: int) -> int:
    """Host number 11 -> interface id 0x11, so the address reads ``fd77::11``."""
    return int(str(number), 16)


class Topology:
    """Channels and hosts of a lab, validated as they are added."""

    def __init__(self, *, source: str = "<topology>") -> None:
        self.source = source
        self.channels: dict[str, Channel] = {}
        self.hosts: dict[str, HostSpec] = {}

    # -- building -------------------------------------------------------------------------------

    def channel(self, name: str, *, v4: str | None = None, v6: str | None = None) -> Channel:
        where = f"channels.{name}"
        if not _CHANNEL_RE.match(name):
            raise ConfigError(self.source, where, "name must match [a-z][a-z0-9_]{0,9}")
        if name in self.channels:
            raise ConfigError(self.source, where, "defined twice")
        if v4 is None and v6 is None:
            raise ConfigError(self.source, where, "needs v4 or v6 (or both)")
        net4 = net6 = None
        if v4 is not None:
            net4 = self._net(v4, ipaddress.IPv4Network, LAB_V4, f"{where}.v4")
        if v6 is not None:
            net6 = self._net(v6, ipaddress.IPv6Network, LAB_V6, f"{where}.v6")
        for other in self.channels.values():
            for mine, theirs in ((net4, other.v4), (net6, other.v6)):
                if mine is not None and theirs is not None and mine.overlaps(theirs):
                    raise ConfigError(self.source, where, f"overlaps channel {other.name}")
        ch = Channel(name, net4, net6)
        self.channels[name] = ch
        return ch

    def host(self, name: str, *, channels: dict[str, int]) -> HostSpec:
        where = f"hosts.{name}"
        if not _HOST_RE.match(name) or name == "sw":
            raise ConfigError(self.source, where, "name must match [a-z][a-z0-9-]{0,30}, not 'sw'")
        if name in self.hosts:
            raise ConfigError(self.source, where, "defined twice")
        if len(self.hosts) >= MAX_HOSTS:
            raise ConfigError(self.source, where, f"at most {MAX_HOSTS} hosts")
        for cname, number in channels.items():
            cwhere = f"{where}.channels.{cname}"
            ch = self.channels.get(cname)
            if ch is None:
                raise ConfigError(self.source, cwhere, "no such channel (declare channels first)")
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ConfigError(self.source, cwhere, "host number must be a positive integer")
            if ch.v4 is not None and number >= ch.v4.num_addresses - 1:
                raise ConfigError(self.source, cwhere, f"{number} does not fit in {ch.v4}")
            if ch.v6 is not None and v6_host_id(number) >= ch.v6.num_addresses - 1:
                raise ConfigError(self.source, cwhere, f"{number} does not fit in {ch.v6}")
            for other in self.hosts.values():
                if other.channels.get(cname) == number:
                    raise ConfigError(self.source, cwhere, f"number {number} taken by {other.name}")
        spec = HostSpec(name, dict(channels))
        self.hosts[name] = spec
        return spec

    def _net(self, text: str, kind: type, within: Any, where: str) -> Any:
        try:
            net = kind(text, strict=True)
        except ValueError as e:
            raise ConfigError(self.source, where, str(e)) from None
        if not net.subnet_of(within):
            raise ConfigError(self.source, where, f"{net} is outside the lab range {within}")
        return net

    # -- addresses ------------------------------------------------------------------------------

    def addr(self, host: str, channel: str) -> str | None:
        net = self.channels[channel].v4
        return None if net is None else str(net[self.hosts[host].channels[channel]])

    def addr6(self, host: str, channel: str) -> str | None:
        net = self.channels[channel].v6
        if net is None:
            return None
        return str(net[v6_host_id(self.hosts[host].channels[channel])])

    def mac(self, host: str, channel: str) -> str:
        """Deterministic, locally administered: 02:77:<channel index>:<host number>:<host index>."""
        number = self.hosts[host].channels[channel]
        ci = list(self.channels).index(channel)
        hi = list(self.hosts).index(host)
        return f"02:77:{ci:02x}:{number >> 8 & 0xFF:02x}:{number & 0xFF:02x}:{hi & 0xFF:02x}"

    def switch_port(self, host: str, channel: str) -> str:
        """Name of the switch-side veth end: ``h<host index>-<channel>`` (at most 15 chars)."""
        return f"h{list(self.hosts).index(host)}-{channel}"

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        chans: dict[str, Any] = {}
        for ch in self.channels.values():
            d: dict[str, str] = {}
            if ch.v4 is not None:
                d["v4"] = str(ch.v4)
            if ch.v6 is not None:
                d["v6"] = str(ch.v6)
            chans[ch.name] = d
        hosts = {h.name: {"channels": dict(h.channels)} for h in self.hosts.values()}
        return {"channels": chans, "hosts": hosts}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "<topology>") -> Topology:
        topo = cls(source=source)
        if not isinstance(d, dict):
            raise ConfigError(source, "", "topology must be a table")
        unknown = set(d) - {"channels", "hosts"}
        if unknown:
            raise ConfigError(source, sorted(unknown)[0], "unknown key")
        for name, c in (d.get("channels") or {}).items():
            if not isinstance(c, dict) or set(c) - {"v4", "v6"}:
                raise ConfigError(source, f"channels.{name}", "expects a table with v4 and/or v6")
            topo.channel(name, v4=c.get("v4"), v6=c.get("v6"))
        for name, h in (d.get("hosts") or {}).items():
            if not isinstance(h, dict) or set(h) != {"channels"}:
                raise ConfigError(source, f"hosts.{name}", "expects a table with channels = {...}")
            if not isinstance(h["channels"], dict):
                raise ConfigError(source, f"hosts.{name}.channels", "expects a table")
            topo.host(name, channels=h["channels"])
        if not topo.hosts:
            raise ConfigError(source, "hosts", "a topology needs at least one host")
        return topo

    @classmethod
    def from_toml(cls, path: str | Path) -> Topology:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as e:
            raise ConfigError(str(p), "", e.strerror or str(e)) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(p), "", f"invalid TOML: {e}") from None
        return cls.from_dict(data, source=str(p))

    def __repr__(self) -> str:
        return f"Topology(channels={list(self.channels)}, hosts={list(self.hosts)})"


def demo_topology() -> Topology:
    """peer, node-a, node-b, witness on ``lan`` (v4 + v6); node-a, node-b, witness on ``hb``."""
    topo = Topology(source="<demo>")
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.channel("hb", v4="10.77.1.0/24")
    topo.host("peer", channels={"lan": 1})
    topo.host("node-a", channels={"lan": 11, "hb": 11})
    topo.host("node-b", channels={"lan": 12, "hb": 12})
    topo.host("witness", channels={"lan": 13, "hb": 13})
    return topo
