"""Route sources, paths and the RFC 4271 9.1.2 decision process.

A route is an int key (nlri.py) mapped to a :class:`Path`: one shared object per (source,
attribute set), so a table costs one dict slot per route and per table (Adj-RIB-In, Loc-RIB,
Adj-RIB-Out), nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from nonstop.bgp.attrs import Attrs


@dataclass(eq=False, slots=True)
class Source:
    """Where paths come from: a peer (asn, router id and address as ints) or the local config."""

    name: str
    asn: int
    router_id: int
    address: int
    ebgp: bool
    local: bool = False


class Path:
    __slots__ = ("attrs", "source")

    def __init__(self, source: Source, attrs: Attrs) -> None:
        self.source = source
        self.attrs = attrs

    def __repr__(self) -> str:
        return f"Path({self.source.name}, {self.attrs})"


def better(a: Path, b: Path) -> bool:
    """True if ``a`` is preferred to ``b`` (RFC 4271 9.1.2.2, IGP cost left out: every next hop
    is treated as directly reachable). Locally originated paths win first, like BIRD's."""
    sa, sb = a.source, b.source
    if sa.local != sb.local:
        return sa.local
    x, y = a.attrs, b.attrs
    lx = 100 if x.local_pref is None else x.local_pref
    ly = 100 if y.local_pref is None else y.local_pref
    if lx != ly:
        return lx > ly
    px, py = x.as_path_len, y.as_path_len
    if px != py:
        return px < py
    if x.origin != y.origin:
        return x.origin < y.origin
    if x.first_as == y.first_as:  # MED only between paths from the same neighbouring AS
        mx, my = x.med or 0, y.med or 0
        if mx != my:
            return mx < my
    if sa.ebgp != sb.ebgp:
        return sa.ebgp
    if sa.router_id != sb.router_id:
        return sa.router_id < sb.router_id
    return sa.address < sb.address


def best_of(paths: list[Path]) -> Path | None:
    best = None
    for p in paths:
        if best is None or better(p, best):
            best = p
    return best
