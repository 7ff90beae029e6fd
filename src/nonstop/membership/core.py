"""The sans-IO membership core: heartbeat schedule, failure detector, Active Stations Table.

No sockets, no clocks: every entry point takes ``now`` (seconds, ``time.monotonic()``). The adapter
feeds datagrams in (``receive_datagram``), fires the timer (``get_timer`` / ``handle_timer``),
sends what ``datagrams_to_send`` returns and drains ``next_event``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nonstop.auth import MIN_KEY_LEN, ReplayWindow
from nonstop.common import LocalProtocolError, RemoteProtocolError, Role
from nonstop.membership.events import (
    ChannelFaulted,
    ChannelRecovered,
    Event,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRestarted,
    PeerStateChanged,
)
from nonstop.membership.wire import (
    IDENT_MAX,
    U8_MAX,
    U16_MAX,
    U32_MAX,
    U64_MAX,
    Heartbeat,
    MsgType,
    decode_heartbeat,
    encode_heartbeat,
)

if TYPE_CHECKING:
    from nonstop.config import AgentConfig

log = logging.getLogger("nonstop.membership")

UP, DOWN, UNKNOWN = "up", "down", "unknown"
SENT_HISTORY = 256  # how many of our own seqs we remember the send time of (for RTT)
LOG_EVERY = 1000  # a drop reason is logged at its first occurrence, then every LOG_EVERY-th
COUNTERS = (
    "tx",
    "rx_ok",
    "rx_duplicate",
    "malformed",
    "bad_version",
    "bad_auth",
    "replay",
    "stale",
    "wrong_group",
    "unknown_peer",
    "wrong_channel",
    "looped_back",
)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True, kw_only=True)
class MembershipConfig:
    """What the core needs. ``peers`` maps a peer id to the channels it is on."""

    node_id: str
    channels: tuple[str, ...]
    peers: Mapping[str, tuple[str, ...]]
    group: int = 1
    interval: float = 0.1
    dead_after: int = 3
    copies: int = 1  # k+1: every datagram is emitted this many times, against k omissions
    replay_window: int = 256
    loss_window: int = 100  # loss is measured over this many expected heartbeats

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "peers", {p: tuple(chs) for p, chs in self.peers.items()})
        for name in (self.node_id, *self.channels, *self.peers):
            if not isinstance(name, str) or not 0 < len(name) <= IDENT_MAX:
                raise ValueError(f"{name!r} is not a valid node or channel name")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels {self.channels!r} must be non-empty and distinct")
        if self.node_id in self.peers:
            raise ValueError(f"node {self.node_id!r} cannot be its own peer")
        for p, chs in self.peers.items():
            if not chs or not set(chs) <= set(self.channels):
                raise ValueError(f"peer {p!r} channels {chs!r} must be among {self.channels!r}")
        if not 0 <= self.group <= U16_MAX:
            raise ValueError(f"group {self.group} is outside 0..{U16_MAX}")
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise ValueError(f"interval {self.interval} must be > 0")
        if self.dead_after < 2:
            raise ValueError(f"dead_after {self.dead_after} must be >= 2")
        if self.copies < 1:
            raise ValueError(f"copies {self.copies} must be >= 1 (k+1 against k omissions)")
        if self.replay_window < 1 or self.loss_window < 1:
            raise ValueError("replay_window and loss_window must be >= 1")

    @property
    def dead_interval(self) -> float:
        return self.dead_after * self.interval

    @classmethod
    def from_agent_config(cls, cfg: AgentConfig) -> MembershipConfig:
        channels = tuple(c.name for c in cfg.channels)
        hb = cfg.heartbeat
        return cls(
            node_id=cfg.node.id,
            group=cfg.node.group,
            channels=channels,
            peers={p.id: tuple(ch for ch in channels if ch in p.addresses) for p in cfg.peers},
            interval=hb.interval,
            dead_after=hb.dead_after,
            copies=hb.copies,
            replay_window=hb.replay_window,
        )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One datagram to send: on ``channel`` to ``peer``'s address there."""

    channel: str
    peer: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StationRow:
    """One row of the Active Stations Table: a (peer, channel) pair."""

    peer: str
    channel: str
    state: str  # "up" | "down" | "unknown" (not heard since start or since the peer (re)joined)
    last_heard: float | None  # seconds ago
    rtt_ms: float | None  # EWMA (1/8) of the echo round trips
    loss: float | None  # fraction missing over the last loss_window expected heartbeats
    role: Role | None
    priority: int | None
    incarnation: int | None


@dataclass(frozen=True, slots=True)
class PeerView:
    peer: str
    alive: bool
    role: Role | None
    priority: int | None
    flags: int | None
    incarnation: int | None
    last_heard: float | None  # monotonic time of the last valid heartbeat, any channel
    channels_up: tuple[str, ...]


class _Link:
    """Detector and statistics of one (peer, channel)."""

    __slots__ = (
        "deadline",
        "echo_at",
        "echo_top",
        "incarnation",
        "last_echo",
        "last_heard",
        "min_transit",
        "name",
        "rtt",
        "rx_bits",
        "rx_top",
        "rx_top_at",
        "state",
        "window",
    )

    def __init__(self, name: str, replay_window: int) -> None:
        self.name = name
        self.state = UNKNOWN
        self.last_heard: float | None = None
        self.deadline: float | None = None  # when it goes down unless heard (alive peers only)
        self.window = ReplayWindow(replay_window)
        self.rtt: float | None = None
        self.incarnation = -1
        self.reset(-1)

    def reset(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.rx_top = 0  # highest seq received in this incarnation, 0: none
        self.rx_top_at = 0.0
        self.rx_bits = 0  # bit i: seq rx_top - i received
        self.last_echo = 0
        # smallest (arrival - sender's sent_at) seen: the clock offset plus the fastest transit.
        # A datagram well above it sat in a queue (e.g. the ARP queue during an outage).
        self.min_transit: float | None = None
        # what we echo back: the highest seq that arrived on time (not a queued straggler, whose
        # echo would make the peer's RTT sample include the time it sat in the queue)
        self.echo_top = 0
        self.echo_at = 0.0


@dataclass(slots=True)
class _Peer:
    id: str
    links: dict[str, _Link]
    alive: bool = False
    incarnation: int | None = None
    role: Role | None = None
    priority: int | None = None
    flags: int | None = None
    top_seq: int = 0  # highest seq seen in this incarnation, any channel
    first_seq: int = 0
    last_heard: float | None = None
    joined_at: float = 0.0
    banned_incarnation: int | None = None  # left, or its agent's link closed
    banned_until: float = 0.0


class Membership:
    """Heartbeats to and from every peer on every channel, and what they say about the group."""

    def __init__(
        self, config: MembershipConfig, *, key: bytes, incarnation: int, now: float
    ) -> None:
        if len(key) < MIN_KEY_LEN:
            raise ValueError(f"the key holds {len(key)} bytes; at least {MIN_KEY_LEN}")
        if not 0 <= incarnation <= U64_MAX:
            raise ValueError(f"incarnation {incarnation} is outside 0..{U64_MAX}")
        self.config = config
        self.incarnation = incarnation
        self._key = key
        self._dead = config.dead_interval
        self._role, self._priority, self._flags = Role.INIT, 0, 0
        self._seq = 0
        self._epoch, self._tick = now, 0  # next send = epoch + tick * interval: no drift
        self._send_pending = False
        self._leaving = self._left = False
        self._now = now
        self._sent: dict[int, float] = {}  # our seq -> when we sent it
        self._events: deque[Event] = deque()
        self._peers = {
            p: _Peer(
                p, {ch: _Link(ch, config.replay_window) for ch in config.channels if ch in chs}
            )
            for p, chs in config.peers.items()
        }
        self._on_channel = {
            ch: [p for p, chs in config.peers.items() if ch in chs] for ch in config.channels
        }
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.stalls = 0  # stalled(): how often this node was not running, and for how long
        self.stalled_s = 0.0

    # -- local state and sending ---------------------------------------------------------------

    def set_local(self, role: Role, priority: int, flags: int = 0) -> None:
        """What our next heartbeats announce. Call send_now() too to announce it at once."""
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role {role!r} is not a Role")
        if not 0 <= priority <= U8_MAX or not 0 <= flags <= U32_MAX:
            raise LocalProtocolError(f"priority {priority} or flags {flags} is out of range")
        self._role, self._priority, self._flags = role, priority, flags

    def send_now(self) -> None:
        """Make the next datagrams_to_send() emit a heartbeat even between ticks."""
        if not self._leaving:
            self._send_pending = True

    def leave(self, now: float) -> None:
        """Queue a LEAVE on every channel to every peer; after it is sent, send nothing more."""
        self._now = now
        self._leaving = True
        self._send_pending = False

    def datagrams_to_send(self, now: float) -> list[Outgoing]:
        self._now = now
        if self._left:
            return []
        if self._leaving:
            self._left = True
            return self._build(MsgType.LEAVE, now)
        next_send = self._epoch + self._tick * self.config.interval
        if now >= next_send:
            # Skip the ticks a late caller missed, keep the phase: next = epoch + n * interval.
            self._tick = math.floor((now - self._epoch) / self.config.interval) + 1
            while self._epoch + self._tick * self.config.interval <= now:
                self._tick += 1
        elif not self._send_pending:
            return []
        self._send_pending = False
        return self._build(MsgType.HEARTBEAT, now)

    def _build(self, kind: MsgType, now: float) -> list[Outgoing]:
        self._seq += 1
        seq = self._seq
        self._sent[seq] = now
        self._sent.pop(seq - SENT_HISTORY, None)
        sent_at = min(max(0, int(now * 1e6)), U64_MAX)
        cfg, out = self.config, []
        for ch in cfg.channels:
            for pid in self._on_channel[ch]:
                link = self._peers[pid].links[ch]
                echo_seq = echo_delay = 0
                if kind is MsgType.HEARTBEAT and link.echo_top:
                    echo_seq = link.echo_top
                    echo_delay = min(max(0, round((now - link.echo_at) * 1e6)), U32_MAX)
                hb = Heartbeat(
                    type=kind,
                    group=cfg.group,
                    node_id=cfg.node_id,
                    channel=ch,
                    incarnation=self.incarnation,
                    seq=seq,
                    role=self._role,
                    priority=self._priority,
                    flags=self._flags,
                    sent_at=sent_at,
                    echo_seq=echo_seq,
                    echo_delay_us=echo_delay,
                )
                out.extend([Outgoing(ch, pid, encode_heartbeat(hb, self._key))] * cfg.copies)
        self.counters["tx"] += len(out)
        return out

    # -- receiving -------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, channel: str, now: float) -> None:
        """Take one datagram that arrived on ``channel``. Bad input is counted, never raised."""
        if channel not in self._on_channel:
            raise LocalProtocolError(f"no channel named {channel!r}")
        self._now = now
        try:
            hb = decode_heartbeat(data, self._key)
        except RemoteProtocolError as e:
            self._drop(e.counter, channel, e.reason)
            return
        if hb.channel != channel:
            return self._drop("wrong_channel", channel, f"sent on {hb.channel!r}")
        if hb.group != self.config.group:
            return self._drop("wrong_group", channel, f"group {hb.group} from {hb.node_id!r}")
        if hb.node_id == self.config.node_id:
            return self._drop("looped_back", channel, "our own heartbeat came back")
        peer = self._peers.get(hb.node_id)
        if peer is None:
            return self._drop("unknown_peer", channel, f"node {hb.node_id!r} is not a peer")
        link = peer.links.get(channel)
        if link is None:
            return self._drop("wrong_channel", channel, f"{peer.id!r} is not on this channel")
        if peer.incarnation is not None and hb.incarnation < peer.incarnation:
            return self._drop("replay", channel, f"{peer.id!r} incarnation {hb.incarnation} is old")
        if (
            hb.incarnation == peer.banned_incarnation
            and now < peer.banned_until
            and hb.type is not MsgType.LEAVE  # the LEAVE copy on another channel is fine
        ):
            return self._drop("stale", channel, f"{peer.id!r} incarnation {hb.incarnation} ended")
        verdict = link.window.check_and_update(hb.incarnation, hb.seq)
        if verdict == "duplicate":
            self.counters["rx_duplicate"] += 1
            return None
        if verdict != "new":
            return self._drop("replay", channel, f"{peer.id!r} seq {hb.seq} is too old")
        self.counters["rx_ok"] += 1
        self._accept(peer, link, hb, now)
        return None

    def _drop(self, counter: str, channel: str, reason: str) -> None:
        n = self.counters.get(counter, 0) + 1
        self.counters[counter] = n
        if n == 1 or n % LOG_EVERY == 0:
            log.warning(
                "%s: dropped a datagram on %s (%s #%d): %s",
                self.config.node_id,
                channel,
                counter,
                n,
                reason,
            )

    def _accept(self, peer: _Peer, link: _Link, hb: Heartbeat, now: float) -> None:
        self._track(link, hb, now)
        link.last_heard = peer.last_heard = now
        if peer.incarnation is None or hb.incarnation > peer.incarnation:
            old = peer.incarnation
            peer.incarnation, peer.top_seq, peer.first_seq = hb.incarnation, 0, hb.seq
            if old is not None:
                self._events.append(PeerRestarted(peer.id, old, hb.incarnation))
        if hb.type is MsgType.LEAVE:
            peer.banned_incarnation, peer.banned_until = hb.incarnation, math.inf
            if peer.alive:
                self._events.append(PeerLeft(peer.id, hb.incarnation))
                self._lose(peer, "left")
            return
        peer.first_seq = min(peer.first_seq, hb.seq)
        fresh = hb.seq > peer.top_seq  # a late, reordered heartbeat must not undo a newer one
        if fresh:
            peer.top_seq = hb.seq
        link.deadline = now + self._dead
        if not peer.alive:
            peer.alive, peer.joined_at = True, now
            peer.role, peer.priority, peer.flags = hb.role, hb.priority, hb.flags
            for other in peer.links.values():
                if other is not link:
                    other.state, other.deadline = UNKNOWN, now + self._dead
            link.state = UP
            self._events.append(
                PeerJoined(peer.id, link.name, hb.incarnation, hb.role, hb.priority, hb.flags)
            )
            return
        if link.state == DOWN:
            self._events.append(ChannelRecovered(peer.id, link.name))
        link.state = UP
        if fresh and (hb.role, hb.priority, hb.flags) != (peer.role, peer.priority, peer.flags):
            assert peer.role is not None and peer.priority is not None and peer.flags is not None
            self._events.append(
                PeerStateChanged(
                    peer.id, hb.role, hb.priority, hb.flags, peer.role, peer.priority, peer.flags
                )
            )
            peer.role, peer.priority, peer.flags = hb.role, hb.priority, hb.flags

    def _track(self, link: _Link, hb: Heartbeat, now: float) -> None:
        """Per-channel sequence bitmap (loss, echo) and RTT from the echo in ``hb``."""
        if link.incarnation != hb.incarnation:
            link.reset(hb.incarnation)
        width = self.config.loss_window
        if hb.seq > link.rx_top:
            shift = hb.seq - link.rx_top
            link.rx_bits = (
                1 if shift >= width else ((link.rx_bits << shift) | 1) & ((1 << width) - 1)
            )
            link.rx_top, link.rx_top_at = hb.seq, now
        elif link.rx_top - hb.seq < width:
            link.rx_bits |= 1 << (link.rx_top - hb.seq)
        transit = now - hb.sent_at / 1e6  # sender's clock: only differences are meaningful
        if link.min_transit is None or transit < link.min_transit:
            link.min_transit = transit
        # A heartbeat delayed in flight (queued while the link was down, delivered after the
        # heal) carries an echo delay measured long before it arrived: no RTT sample from it,
        # and we do not echo it back either.
        stale = transit - link.min_transit > self.config.interval
        if not stale and hb.seq > link.echo_top:
            link.echo_top, link.echo_at = hb.seq, now
        if hb.echo_seq > link.last_echo:
            link.last_echo = hb.echo_seq
            sent = None if stale else self._sent.get(hb.echo_seq)
            if sent is not None:
                sample = now - sent - hb.echo_delay_us / 1e6
                if sample >= 0:
                    link.rtt = sample if link.rtt is None else link.rtt + (sample - link.rtt) / 8

    # -- detector --------------------------------------------------------------------------------

    def get_timer(self) -> float:
        """The next deadline (send or expiry); ``math.inf`` when there is none (after leave)."""
        if self._send_pending or (self._leaving and not self._left):
            return self._now
        t = math.inf if self._left else self._epoch + self._tick * self.config.interval
        for peer in self._peers.values():
            if peer.alive:
                for link in peer.links.values():
                    if link.deadline is not None and link.deadline < t:
                        t = link.deadline
        return t

    def handle_timer(self, now: float) -> None:
        """Expire silent channels. A channel is down at exactly last_heard + dead_after*interval."""
        self._now = now
        for peer in self._peers.values():
            if not peer.alive:
                continue
            expired = [
                lk for lk in peer.links.values() if lk.deadline is not None and now >= lk.deadline
            ]
            if not expired:
                continue
            was = {lk.name: lk.state for lk in expired}
            for lk in expired:
                lk.state, lk.deadline = DOWN, None
            if not any(lk.state == UP for lk in peer.links.values()):
                assert peer.last_heard is not None
                names = ", ".join(peer.links)
                self._lose(peer, f"no heartbeat on {names} for {_ms(now - peer.last_heard)} ms")
                continue
            for lk in expired:
                if was[lk.name] == UNKNOWN:
                    why = f"no heartbeat on {lk.name} since {peer.id} joined"
                    why += f" {_ms(now - peer.joined_at)} ms ago"
                else:
                    assert lk.last_heard is not None
                    why = f"no heartbeat on {lk.name} for {_ms(now - lk.last_heard)} ms"
                self._events.append(ChannelFaulted(peer.id, lk.name, why))

    def stalled(self, span: float, now: float) -> None:
        """This node did not run for the last ``span`` seconds (its loop woke that late: the
        host froze, or it got no CPU): that silence proves nothing about the peers, so every
        live channel's deadline moves on by ``span``. What a live peer sent meanwhile waits in
        the socket and is read first (the adapter reads before it expires anything); when the
        whole host froze (a paused VM, every namespace of a lab) the peers could not send
        either, and counting the freeze as their silence declared a frozen master dead at the
        moment it woke. A peer that really died is found ``span`` later."""
        if span <= 0:
            return
        self._now = max(self._now, now)
        self.stalls += 1
        self.stalled_s += span
        for peer in self._peers.values():
            if peer.alive:
                for link in peer.links.values():
                    if link.deadline is not None:
                        link.deadline += span

    def link_closed(self, peer: str, now: float, reason: str) -> None:
        """The agent link to ``peer`` saw EOF/RST: its agent died. PeerLost at once.

        Heartbeats of that incarnation still in flight are ignored (counted ``stale``) for one
        dead interval, so they cannot bring the peer back; a restarted peer (higher incarnation)
        is accepted at once.
        """
        p = self._peers.get(peer)
        if p is None:
            raise LocalProtocolError(f"no peer named {peer!r}")
        self._now = now
        left = p.banned_incarnation == p.incarnation and p.banned_until == math.inf
        if p.incarnation is not None and not left:
            p.banned_incarnation, p.banned_until = p.incarnation, now + self._dead
        if p.alive:
            self._lose(p, reason or "agent link closed", proven_dead=True)

    def _lose(self, peer: _Peer, reason: str, *, proven_dead: bool = False) -> None:
        peer.alive = False
        for link in peer.links.values():
            link.state, link.deadline = DOWN, None
        self._events.append(PeerLost(peer.id, reason, proven_dead))

    # -- reading ---------------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def peer(self, peer_id: str) -> PeerView | None:
        p = self._peers.get(peer_id)
        if p is None:
            return None
        up = tuple(lk.name for lk in p.links.values() if lk.state == UP)
        return PeerView(p.id, p.alive, p.role, p.priority, p.flags, p.incarnation, p.last_heard, up)

    def table(self, now: float) -> list[StationRow]:
        """The Active Stations Table: one row per (peer, channel), in config order."""
        rows = []
        for p in self._peers.values():
            for lk in p.links.values():
                rows.append(
                    StationRow(
                        peer=p.id,
                        channel=lk.name,
                        state=lk.state,
                        last_heard=None if lk.last_heard is None else now - lk.last_heard,
                        rtt_ms=None if lk.rtt is None else lk.rtt * 1000,
                        loss=self._loss(p, lk),
                        role=p.role,
                        priority=p.priority,
                        incarnation=p.incarnation,
                    )
                )
        return rows

    def _loss(self, peer: _Peer, link: _Link) -> float | None:
        if peer.incarnation is None or peer.top_seq == 0:
            return None
        width = self.config.loss_window
        expected = min(width, peer.top_seq - peer.first_seq + 1)
        got = 0
        lag = peer.top_seq - link.rx_top  # heartbeats seen on other channels but not yet here
        if link.incarnation == peer.incarnation and link.rx_top and lag < width:
            got = (link.rx_bits & ((1 << (width - lag)) - 1)).bit_count()
        return max(0.0, 1.0 - got / expected)
