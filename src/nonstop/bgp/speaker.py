"""The BGP speaker, sans-IO: sessions + Adj-RIB-In, Loc-RIB, Adj-RIB-Out + policy.

    sp = Speaker(cfg)
    events = sp.start(now)                       # PeerEvent(peer, ConnectRequested()) ...
    events = sp.connection_made("bird", now, local_address="10.77.0.11")
    events = sp.receive_data("bird", data, now)  # the peer's bytes
    sock.send(sp.data_to_send("bird"))
    events = sp.timer(now)                       # at sp.next_deadline()

Every input is deterministic given its arguments, so a hot standby that is fed the same inputs
(journal.py) holds the same RIB and the same session state, byte for byte.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, replace

from nonstop.bgp.attrs import Attrs
from nonstop.bgp.config import FAMILY_NAMES, PeerConfig, SpeakerConfig
from nonstop.bgp.fsm import (
    Event,
    RouteRefreshReceived,
    Session,
    SessionClosed,
    SessionConfig,
    SessionEstablished,
    State,
    UpdateReceived,
)
from nonstop.bgp.nlri import key_of
from nonstop.bgp.policy import Policy, PolicyConfig, parse_community
from nonstop.bgp.rib import Path, Source, best_of, better
from nonstop.bgp.update import Update, encode_update, end_of_rib
from nonstop.bgp.wire import IPV4_UNICAST, IPV6_UNICAST

Family = tuple[int, int]
FAMILIES = (IPV4_UNICAST, IPV6_UNICAST)
NO_EXPORT, NO_ADVERTISE = 0xFFFFFF01, 0xFFFFFF02


@dataclass(frozen=True, slots=True)
class PeerEvent:
    peer: str
    event: Event


def _ip_int(a: str) -> int:
    return int(ipaddress.ip_address(a))


class Peer:
    """One configured neighbour: its session, its Adj-RIB-In/Out and policies."""

    def __init__(self, sp: Speaker, index: int, cfg: PeerConfig) -> None:
        self.index = index
        self.name = cfg.name
        self.cfg = cfg
        fams = tuple(FAMILY_NAMES[f] for f in cfg.families)
        self.session = Session(SessionConfig(
            local_as=sp.cfg.asn, router_id=sp.cfg.router_id, peer_as=cfg.asn,
            hold_time=cfg.hold_time, connect_retry=cfg.connect_retry, passive=cfg.passive,
            families=fams))
        self.source = Source(cfg.name, cfg.asn, 0, _ip_int(cfg.address), cfg.asn != sp.cfg.asn)
        self.adj_in: dict[Family, dict[int, Path]] = {f: {} for f in FAMILIES}
        self.adj_out: dict[Family, dict[int, Attrs]] = {f: {} for f in FAMILIES}
        self.dirty: dict[Family, dict[int, None]] = {f: {} for f in FAMILIES}
        self.pending_eor: list[Family] = []
        self.import_policy = Policy(cfg.import_policy)
        self.export_policy = Policy(cfg.export_policy)
        self.paths: dict[Attrs, Path] = {}
        self.exported: dict[tuple[Family, Source, Attrs], Attrs | None] = {}
        self.out_intern: dict[Attrs, Attrs] = {}
        self.local_address: str | None = None
        self.eor_received: set[Family] = set()

    @property
    def ebgp(self) -> bool:
        return self.source.ebgp

    @property
    def established(self) -> bool:
        return self.session.state == State.ESTABLISHED

    def path(self, a: Attrs) -> Path:
        p = self.paths.get(a)
        if p is None:
            p = self.paths[a] = Path(self.source, a)
        return p

    def next_hop(self, fam: Family) -> bytes:
        if fam == IPV4_UNICAST:
            a = self.cfg.next_hop or (self.local_address if self.local_address and
                                      ":" not in self.local_address else None)
            return ipaddress.IPv4Address(a).packed if a else b""
        a = self.cfg.next_hop6 or (self.local_address if self.local_address and
                                   ":" in self.local_address else None)
        if a is None and self.local_address:
            a = f"::ffff:{self.local_address}"
        return ipaddress.IPv6Address(a).packed if a else b""


class Speaker:
    def __init__(self, cfg: SpeakerConfig) -> None:
        self.cfg = cfg
        self.peers: dict[str, Peer] = {}
        for i, pc in enumerate(cfg.peers):
            self.peers[pc.name] = Peer(self, i, pc)
        self.by_index = list(self.peers.values())
        self.local = Source("local", cfg.asn, _ip_int(cfg.router_id), 0, False, local=True)
        self.loc: dict[Family, dict[int, Path]] = {f: {} for f in FAMILIES}
        self.originated: dict[Family, dict[int, Path]] = {f: {} for f in FAMILIES}
        self.fib_dirty: dict[Family, dict[int, None]] | None = None  # set to {} to track
        self.journal: Callable[[int, int, float, bytes], None] | None = None
        self._local_paths: dict[Attrs, Path] = {}
        self._loop_cache: dict[Attrs, bool] = {}
        for o in cfg.originate:
            self._originate(o.prefix, tuple(parse_community(c) for c in o.communities), o.med)

    # -- journal hook ------------------------------------------------------------------------------

    def _j(self, kind: int, peer: int, now: float, payload: bytes = b"") -> None:
        if self.journal is not None:
            self.journal(kind, peer, now, payload)

    # -- inputs ------------------------------------------------------------------------------------

    def start(self, now: float) -> list[PeerEvent]:
        self._j(1, 0xFFFF, now)
        out: list[PeerEvent] = []
        for p in self.by_index:
            out += [PeerEvent(p.name, e) for e in p.session.start(now)]
        return out

    def connection_made(self, peer: str, now: float, local_address: str) -> list[PeerEvent]:
        p = self.peers[peer]
        self._j(2, p.index, now, local_address.encode())
        p.local_address = local_address
        return [PeerEvent(peer, e) for e in p.session.connection_made(now)]

    def connection_lost(self, peer: str, now: float) -> list[PeerEvent]:
        p = self.peers[peer]
        self._j(3, p.index, now)
        return self._handle(p, p.session.connection_lost(now), now)

    def receive_data(self, peer: str, data: bytes, now: float) -> list[PeerEvent]:
        p = self.peers[peer]
        self._j(4, p.index, now, data)  # journaled before it is processed
        return self._handle(p, p.session.receive_data(data, now), now)

    def timer(self, now: float) -> list[PeerEvent]:
        due = [p for p in self.by_index
               if (d := p.session.next_deadline()) is not None and d <= now]
        if not due:
            return []
        self._j(5, 0xFFFF, now)
        out: list[PeerEvent] = []
        for p in due:
            out += self._handle(p, p.session.timer(now), now)
        return out

    def data_to_send(self, peer: str, *, journal: bool = True) -> bytes:
        """Bytes for the peer. With ``journal`` they count as written at once; an adapter that
        may write only part passes ``journal=False`` and reports each write with sent()."""
        p = self.peers[peer]
        data = p.session.data_to_send()
        if data and journal:
            self._j(6, p.index, 0.0, len(data).to_bytes(4, "big"))
        return data

    def sent(self, peer: str, n: int) -> None:
        """``n`` more bytes for ``peer`` were accepted by the kernel (journaled after the
        write, so a standby never believes unwritten bytes were sent)."""
        if n:
            self._j(6, self.peers[peer].index, 0.0, n.to_bytes(4, "big"))

    def next_deadline(self) -> float | None:
        ds = [d for p in self.by_index if (d := p.session.next_deadline()) is not None]
        return min(ds) if ds else None

    def stop(self, now: float) -> list[PeerEvent]:
        self._j(7, 0xFFFF, now)
        out: list[PeerEvent] = []
        for p in self.by_index:
            out += self._handle(p, p.session.stop(now), now)
        return out

    # -- config changes (journaled) ----------------------------------------------------------------

    def originate(self, prefix: str, communities: tuple[int, ...] = (), med: int | None = None,
                  now: float = 0.0) -> None:
        self._j(8, 0xFFFF, now, f"{prefix} {med} {','.join(map(str, communities))}".encode())
        self._originate(prefix, communities, med)
        self._flush_all()

    def withdraw_originated(self, prefix: str, now: float = 0.0) -> None:
        self._j(9, 0xFFFF, now, prefix.encode())
        v, key = key_of(prefix)
        fam = IPV4_UNICAST if v == 4 else IPV6_UNICAST
        if self.originated[fam].pop(key, None) is not None:
            self._recompute(fam, [key])
            self._flush_all()

    def set_policy(self, peer: str, direction: str, cfg: PolicyConfig, now: float = 0.0) -> None:
        """Replace a peer's import or export policy. Export: re-evaluated at once; import: a
        ROUTE-REFRESH asks the peer to send its routes again (kept unprocessed otherwise)."""
        import msgspec

        p = self.peers[peer]
        self._j(10, p.index, now, direction.encode() + b"\0" + msgspec.json.encode(cfg))
        pol = Policy(cfg)
        if direction == "import":
            p.import_policy = pol
            for fam in sorted(p.session.families):
                p.session.send_route_refresh(*fam)
        else:
            p.export_policy = pol
            p.exported.clear()
            if p.established:
                for fam in p.session.families:
                    p.dirty[fam].update(dict.fromkeys(self.loc[fam]))
                    p.dirty[fam].update(dict.fromkeys(p.adj_out[fam]))
                self._flush(p)

    def refresh(self, peer: str, now: float = 0.0) -> None:
        """Ask the peer to re-send its routes (ROUTE-REFRESH for every negotiated family)."""
        p = self.peers[peer]
        self._j(11, p.index, now)
        for fam in sorted(p.session.families):
            p.session.send_route_refresh(*fam)

    # -- event handling ----------------------------------------------------------------------------

    def _handle(self, p: Peer, events: list[Event], now: float) -> list[PeerEvent]:
        out: list[PeerEvent] = []
        for e in events:
            if isinstance(e, UpdateReceived):
                self._on_update(p, e.update)
                continue  # not passed up: a full table would be a million events
            if isinstance(e, SessionEstablished):
                p.source.router_id = _ip_int(e.open.router_id)
                self._on_established(p)
            elif isinstance(e, SessionClosed):
                self._on_closed(p)
            elif isinstance(e, RouteRefreshReceived):
                fam = (e.afi, e.safi)
                p.adj_out[fam].clear()
                p.dirty[fam].update(dict.fromkeys(self.loc[fam]))
                p.pending_eor.append(fam)
            out.append(PeerEvent(p.name, e))
        self._flush_all()
        return out

    def _on_established(self, p: Peer) -> None:
        p.eor_received.clear()
        for fam in FAMILIES:
            p.adj_out[fam].clear()
            p.dirty[fam].clear()
        for fam in sorted(p.session.families):
            p.dirty[fam].update(dict.fromkeys(self.loc[fam]))
            p.pending_eor.append(fam)

    def _on_closed(self, p: Peer) -> None:
        p.pending_eor.clear()
        for fam in FAMILIES:
            keys = list(p.adj_in[fam])
            p.adj_in[fam].clear()
            p.adj_out[fam].clear()
            p.dirty[fam].clear()
            p.paths.clear()
            if keys:
                self._recompute(fam, keys)

    def _on_update(self, p: Peer, u: Update) -> None:
        for fam, keys in u.withdrawn.items():
            if fam in p.adj_in:
                self._withdraw(p, fam, keys)
        if u.attrs is None:
            if not u.announced and not u.withdrawn:
                p.eor_received.add(IPV4_UNICAST)
            return
        if self._loops(u.attrs):  # RFC 4271 9.1.2: our AS in the path -> not a usable route
            for fam, keys in u.announced.items():
                if fam in p.adj_in:
                    self._withdraw(p, fam, keys)
            return
        for fam, keys in u.announced.items():
            if fam not in p.session.families:
                continue
            a = u.attrs
            if fam != IPV4_UNICAST:
                a = p.session.decoder.intern(replace(a, next_hop=u.mp_next_hop))
            self._announce(p, fam, keys, a)

    def _loops(self, a: Attrs) -> bool:
        hit = self._loop_cache.get(a)
        if hit is None:
            if len(self._loop_cache) > 100_000:
                self._loop_cache.clear()
            hit = self._loop_cache[a] = any(self.cfg.asn in s for _, s in a.as_path)
        return hit

    def _announce(self, p: Peer, fam: Family, keys: list[int], a: Attrs) -> None:
        adj = p.adj_in[fam]
        loc = self.loc[fam]
        pol = p.import_policy
        multi = bool(self.originated[fam]) or any(
            q is not p and q.adj_in[fam] for q in self.by_index)
        changed: list[int] = []
        add = changed.append
        if pol.trivial and not multi:  # the hot path of a full table from one peer
            path = p.path(a)
            adj.update(dict.fromkeys(keys, path))
            get = loc.get
            changed = [k for k in keys if get(k) is not path]
            loc.update(dict.fromkeys(changed, path))
            self._changed(fam, changed, skip=p)  # p's own routes never go back to p
            return
        else:
            v = 4 if fam == IPV4_UNICAST else 6
            for k in keys:
                na = pol.apply(k, v, a)
                if na is None:
                    if adj.pop(k, None) is not None:
                        add(k)
                    continue
                path = p.path(na)
                old = adj.get(k)
                adj[k] = path
                cur = loc.get(k)
                if cur is None or (cur is not old and better(path, cur)):
                    loc[k] = path
                    add(k)
                elif cur is old and path is not old:
                    add(k)
            if changed:
                self._recompute(fam, changed, notify=False)
        self._changed(fam, changed)

    def _withdraw(self, p: Peer, fam: Family, keys: list[int]) -> None:
        adj = p.adj_in[fam]
        gone = [k for k in keys if adj.pop(k, None) is not None]
        if gone:
            self._recompute(fam, gone)

    def _candidates(self, fam: Family, k: int) -> list[Path]:
        c = [q.adj_in[fam][k] for q in self.by_index if k in q.adj_in[fam]]
        if k in self.originated[fam]:
            c.append(self.originated[fam][k])
        return c

    def _recompute(self, fam: Family, keys: list[int], notify: bool = True) -> None:
        loc = self.loc[fam]
        changed = []
        for k in keys:
            b = best_of(self._candidates(fam, k))
            if b is None:
                if loc.pop(k, None) is not None:
                    changed.append(k)
            elif loc.get(k) is not b:
                loc[k] = b
                changed.append(k)
        if notify:
            self._changed(fam, changed)

    def _changed(self, fam: Family, keys: list[int], skip: Peer | None = None) -> None:
        if not keys:
            return
        for q in self.by_index:
            if q is not skip and q.established and fam in q.session.families:
                q.dirty[fam].update(dict.fromkeys(keys))
        if self.fib_dirty is not None:
            self.fib_dirty.setdefault(fam, {}).update(dict.fromkeys(keys))

    def _originate(self, prefix: str, comms: tuple[int, ...], med: int | None) -> None:
        v, key = key_of(prefix)
        fam = IPV4_UNICAST if v == 4 else IPV6_UNICAST
        a = Attrs(origin=0, communities=comms, med=med)
        path = self._local_paths.setdefault(a, Path(self.local, a))
        self.originated[fam][key] = path
        self._recompute(fam, [key])

    # -- export ------------------------------------------------------------------------------------

    def _export(self, q: Peer, fam: Family, k: int, best: Path | None) -> Attrs | None:
        if best is None or best.source is q.source:
            return None
        a = best.attrs
        ck = (fam, best.source, a)
        hit = q.exported.get(ck, False)
        if hit is False:
            hit = self._transform(q, fam, best)
            q.exported[ck] = hit
        if hit is None or q.export_policy.trivial:
            return hit
        r = q.export_policy.apply(k, 4 if fam == IPV4_UNICAST else 6, hit)
        return None if r is None else q.out_intern.setdefault(r, r)

    def _transform(self, q: Peer, fam: Family, best: Path) -> Attrs | None:
        src, a = best.source, best.attrs
        if NO_ADVERTISE in a.communities:
            return None
        if q.ebgp:
            if NO_EXPORT in a.communities or any(q.cfg.asn in s for _, s in a.as_path):
                return None  # no-export, or the peer would drop it as a loop
            a = replace(a.prepend(self.cfg.asn), next_hop=q.next_hop(fam), local_pref=None,
                        med=a.med if src.local else None)
        else:
            if not src.local and not src.ebgp:
                return None  # iBGP-learned to an iBGP peer: no reflection
            nh = q.next_hop(fam) if src.local else a.next_hop
            a = replace(a, next_hop=nh, local_pref=100 if a.local_pref is None else
                        a.local_pref)
        if not a.next_hop:
            return None
        return q.out_intern.setdefault(a, a)

    def _flush_all(self) -> None:
        for q in self.by_index:
            if q.established and (q.pending_eor or any(q.dirty.values())):
                self._flush(q)

    def _flush(self, q: Peer) -> None:
        s = q.session
        for fam in FAMILIES:
            dirty = q.dirty[fam]
            if not dirty:
                continue
            loc = self.loc[fam]
            out = q.adj_out[fam]
            groups: dict[Attrs, list[int]] = {}
            withdrawn: list[int] = []
            for k in dirty:
                e = self._export(q, fam, k, loc.get(k))
                old = out.get(k)
                if e is old:
                    continue
                if e is None:
                    del out[k]
                    withdrawn.append(k)
                else:
                    out[k] = e
                    groups.setdefault(e, []).append(k)
            dirty.clear()
            if withdrawn:
                msgs = encode_update(fam, withdrawn=withdrawn, as4=s.as4)
                s.send_raw(b"".join(msgs), "update", len(msgs))
            for a, keys in groups.items():
                msgs = encode_update(fam, announced=keys, attrs=a, as4=s.as4)
                s.send_raw(b"".join(msgs), "update", len(msgs))
        for fam in q.pending_eor:
            s.send_raw(end_of_rib(fam), "update")
        q.pending_eor.clear()

    # -- views -------------------------------------------------------------------------------------

    def routes(self, fam: Family) -> dict[int, Path]:
        return self.loc[fam]
