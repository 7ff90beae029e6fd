"""Import/export policy: ordered terms matching prefix lists (ge/le) and communities, acting by
accept/reject and setting communities, LOCAL_PREF and MED. The first matching term decides;
no match -> the policy's default."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

import msgspec

from nonstop.bgp.attrs import Attrs


def parse_community(text: str) -> int:
    """'65001:100' -> 32-bit value; also the well-known names."""
    names = {"no-export": 0xFFFFFF01, "no-advertise": 0xFFFFFF02, "no-export-subconfed":
             0xFFFFFF03}
    if text in names:
        return names[text]
    hi, _, lo = text.partition(":")
    a, b = int(hi), int(lo)
    if not (0 <= a <= 0xFFFF and 0 <= b <= 0xFFFF):
        raise ValueError(f"community {text!r} out of range")
    return a << 16 | b


def parse_large(text: str) -> tuple[int, int, int]:
    a, b, c = (int(x) for x in text.split(":"))
    return (a, b, c)


def format_community(v: int) -> str:
    return f"{v >> 16}:{v & 0xFFFF}"


class PrefixEntry(msgspec.Struct, forbid_unknown_fields=True):
    prefix: str
    ge: int | None = None
    le: int | None = None


class Term(msgspec.Struct, forbid_unknown_fields=True):
    prefixes: list[PrefixEntry] = []
    communities: list[str] = []  # match if the route has any of these
    action: str = "accept"  # accept | reject
    add_communities: list[str] = []
    remove_communities: list[str] = []
    add_large_communities: list[str] = []
    local_pref: int | None = None
    med: int | None = None


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True):
    terms: list[Term] = []
    default: str = "accept"


@dataclass(frozen=True, slots=True)
class _Prefix:
    version: int
    net: int  # address bits
    plen: int
    ge: int
    le: int
    bits: int

    def match(self, key: int, version: int) -> bool:
        if version != self.version:
            return False
        plen = key & 0xFF
        if plen < self.ge or plen > self.le:
            return False
        shift = self.bits - self.plen
        return ((key >> 8) >> shift) == (self.net >> shift)


class _CompiledTerm:
    __slots__ = ("accept", "add", "add_large", "comms", "local_pref", "med", "prefixes", "remove")

    def __init__(self, t: Term) -> None:
        self.prefixes: list[_Prefix] = []
        for e in t.prefixes:
            net = ipaddress.ip_network(e.prefix, strict=True)
            bits = net.max_prefixlen
            ge = e.ge if e.ge is not None else net.prefixlen
            le = e.le if e.le is not None else (bits if e.ge is not None else net.prefixlen)
            if not (net.prefixlen <= ge <= le <= bits):
                raise ValueError(f"{e.prefix}: need len <= ge <= le <= {bits}")
            self.prefixes.append(_Prefix(net.version, int(net.network_address), net.prefixlen,
                                         ge, le, bits))
        self.comms = frozenset(parse_community(c) for c in t.communities)
        if t.action not in ("accept", "reject"):
            raise ValueError(f"action {t.action!r}: accept or reject")
        self.accept = t.action == "accept"
        self.add = tuple(parse_community(c) for c in t.add_communities)
        self.remove = frozenset(parse_community(c) for c in t.remove_communities)
        self.add_large = tuple(parse_large(c) for c in t.add_large_communities)
        self.local_pref = t.local_pref
        self.med = t.med


class Policy:
    """A compiled policy. ``apply(key, version, attrs) -> Attrs | None`` (None: rejected).
    Results are cached per (term, attrs) so a table with few attribute sets costs a dict hit."""

    def __init__(self, cfg: PolicyConfig | None = None) -> None:
        cfg = cfg or PolicyConfig()
        if cfg.default not in ("accept", "reject"):
            raise ValueError(f"default {cfg.default!r}: accept or reject")
        self.terms = [_CompiledTerm(t) for t in cfg.terms]
        self.default_accept = cfg.default == "accept"
        self._cache: dict[tuple[int, Attrs], Attrs | None] = {}
        self.trivial = not self.terms and self.default_accept

    def apply(self, key: int, version: int, a: Attrs) -> Attrs | None:
        if self.trivial:
            return a
        for i, t in enumerate(self.terms):
            if t.prefixes and not any(p.match(key, version) for p in t.prefixes):
                continue
            if t.comms and not (t.comms & set(a.communities)):
                continue
            ck = (i, a)
            hit = self._cache.get(ck, False)
            if hit is False:
                hit = self._cache[ck] = self._act(t, a)
            return hit
        return a if self.default_accept else None

    @staticmethod
    def _act(t: _CompiledTerm, a: Attrs) -> Attrs | None:
        if not t.accept:
            return None
        comms = tuple(c for c in a.communities if c not in t.remove)
        comms += tuple(c for c in t.add if c not in comms)
        large = a.large_communities + tuple(c for c in t.add_large
                                            if c not in a.large_communities)
        return replace(
            a,
            communities=comms,
            large_communities=large,
            local_pref=t.local_pref if t.local_pref is not None else a.local_pref,
            med=t.med if t.med is not None else a.med,
        )
