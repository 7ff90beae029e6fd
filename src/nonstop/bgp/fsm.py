"""The BGP session FSM of RFC 4271 section 8, sans-IO: bytes and ``now`` in, events and bytes
out. Timers are deadlines the caller honours by calling :meth:`Session.timer` (``next_deadline``).

Transitions (state, input) -> next state; any pair not listed is an FSM error (NOTIFICATION 5/x
when a connection exists, then Idle):

    Idle        start                -> Connect (active) / Active (passive)
    Connect     connection_made      -> OpenSent   (sends OPEN)
    Connect     connect_retry timer  -> Connect    (ConnectRequested again)
    Active      connection_made      -> OpenSent   (sends OPEN)
    Active      connect_retry timer  -> Connect
    OpenSent    OPEN ok              -> OpenConfirm (sends KEEPALIVE)
    OpenSent    connection_lost      -> Active
    OpenConfirm KEEPALIVE            -> Established
    Established UPDATE/KEEPALIVE/ROUTE-REFRESH -> Established (hold timer restarted)
    any         hold timer expired   -> Idle (NOTIFICATION 4/0)
    any         NOTIFICATION, error, stop, connection_lost -> Idle
    Idle        idle_hold timer (automatic restart) -> Connect / Active

Collision detection (RFC 4271 6.8) is not implemented: the speaker keeps one connection per peer
and the adapter refuses a second while one is past Active. A peer that opens a connection of its
own then retries; with one side passive (``passive = true``) no collision can happen at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nonstop.bgp.attrs import AttrDecoder
from nonstop.bgp.update import Update, decode_update
from nonstop.bgp.wire import (
    BAD_PEER_AS,
    CEASE,
    FSM_ERROR,
    HOLD_EXPIRED,
    IPV4_UNICAST,
    KEEPALIVE_BYTES,
    OPEN_ERROR,
    UNACCEPTABLE_HOLD,
    Capabilities,
    Framer,
    MsgType,
    Notification,
    NotifyError,
    Open,
    RouteRefresh,
    decode_notification,
    decode_open,
    decode_route_refresh,
    encode_notification,
    encode_open,
    encode_route_refresh,
)


class State(enum.IntEnum):
    IDLE = 1
    CONNECT = 2
    ACTIVE = 3
    OPEN_SENT = 4
    OPEN_CONFIRM = 5
    ESTABLISHED = 6

    def __str__(self) -> str:
        return self.name.lower().replace("_", "")


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    old: State
    new: State
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """The adapter should open a TCP connection to the peer (active side)."""


@dataclass(frozen=True, slots=True)
class DisconnectRequested:
    """The adapter should send what is queued and close the connection."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    open: Open  # the peer's OPEN
    hold_time: int


@dataclass(frozen=True, slots=True)
class SessionClosed:
    reason: str
    notification_sent: Notification | None = None
    notification_received: Notification | None = None


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    update: Update


@dataclass(frozen=True, slots=True)
class RouteRefreshReceived:
    afi: int
    safi: int


@dataclass(frozen=True, slots=True)
class ErrorCounted:
    """A malformed message the session survived (RFC 7606 treat-as-withdraw / discard)."""

    counter: str
    reason: str


Event = (StateChanged | ConnectRequested | DisconnectRequested | SessionEstablished |
         SessionClosed | UpdateReceived | RouteRefreshReceived | ErrorCounted)

LARGE_HOLD = 240.0  # RFC 4271 8.2.2: hold timer while waiting for the OPEN


@dataclass(slots=True)
class SessionConfig:
    local_as: int
    router_id: str
    peer_as: int
    hold_time: int = 90
    connect_retry: float = 5.0
    idle_hold: float = 1.0  # automatic restart delay after a session goes down
    passive: bool = False
    families: tuple[tuple[int, int], ...] = ((1, 1), (2, 1))
    graceful_restart_time: int = 120  # advertised only: interoperability, never used by us


class Session:
    """One peer's BGP session. Not thread-safe; every entry point takes ``now``."""

    def __init__(self, cfg: SessionConfig) -> None:
        self.cfg = cfg
        self.state = State.IDLE
        self.framer = Framer()
        self.out = bytearray()
        self.tx_position = 0  # bytes queued for the peer so far (always a message boundary)
        self.deadlines: dict[str, float] = {}
        self.peer_open: Open | None = None
        self.hold_time = 0  # negotiated
        self.keepalive_interval = 0.0
        self.as4 = True
        self.decoder = AttrDecoder(as4=True, ebgp=cfg.local_as != cfg.peer_as)
        self.families: frozenset[tuple[int, int]] = frozenset()
        self.counters: dict[str, int] = {}
        self.established_at: float | None = None
        self.last_error = ""
        self.running = False

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def ebgp(self) -> bool:
        return self.cfg.local_as != self.cfg.peer_as

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _send(self, data: bytes, kind: str) -> None:
        self.out += data
        self.tx_position += len(data)
        self.count(f"sent_{kind}")

    def send_raw(self, data: bytes, kind: str = "update", n: int = 1) -> None:
        """Queue whole messages (UPDATEs from the speaker) in Established."""
        if self.state != State.ESTABLISHED:
            return
        self.out += data
        self.tx_position += len(data)
        self.count(f"sent_{kind}", n)
        if self.keepalive_interval:  # every message counts as a keepalive (RFC 4271 4.4)
            self.deadlines["keepalive"] = self.deadlines.get("_now", 0.0) + self.keepalive_interval

    def data_to_send(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def next_deadline(self) -> float | None:
        live = [v for k, v in self.deadlines.items() if not k.startswith("_")]
        return min(live) if live else None

    def _go(self, new: State, reason: str, events: list[Event]) -> None:
        if new != self.state:
            events.append(StateChanged(self.state, new, reason))
            self.state = new

    def my_open(self) -> Open:
        caps = Capabilities(
            families=frozenset(self.cfg.families),
            as4=self.cfg.local_as,
            route_refresh=True,
            graceful_restart=(0, self.cfg.graceful_restart_time),
        )
        return Open(self.cfg.local_as, self.cfg.hold_time, self.cfg.router_id, caps)

    def _down(self, reason: str, events: list[Event], *, sent: Notification | None = None,
              received: Notification | None = None, now: float, disconnect: bool = True) -> None:
        was_up = self.state in (State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED)
        if sent is not None:
            self._send(encode_notification(sent), "notification")
        self.last_error = reason
        self.deadlines = {"_now": now}
        if self.running:
            self.deadlines["idle_hold"] = now + self.cfg.idle_hold
        self.framer = Framer()
        self.peer_open = None
        self.established_at = None
        self._go(State.IDLE, reason, events)
        if was_up or sent is not None:
            events.append(SessionClosed(reason, sent, received))
        if disconnect:
            events.append(DisconnectRequested(reason))

    # -- inputs ----------------------------------------------------------------------------------

    def start(self, now: float) -> list[Event]:
        events: list[Event] = []
        self.running = True
        if self.state == State.IDLE:
            self.deadlines = {"_now": now}
            self._begin(now, events)
        return events

    def _begin(self, now: float, events: list[Event]) -> None:
        self.deadlines["connect_retry"] = now + self.cfg.connect_retry
        if self.cfg.passive:
            self._go(State.ACTIVE, "start (passive)", events)
        else:
            self._go(State.CONNECT, "start", events)
            events.append(ConnectRequested())

    def stop(self, now: float, reason: str = "administrative shutdown") -> list[Event]:
        events: list[Event] = []
        self.running = False
        if self.state != State.IDLE:
            sent = Notification(CEASE, 2) if self.state >= State.OPEN_SENT else None
            self._down(reason, events, sent=sent, now=now)
        self.deadlines = {"_now": now}
        return events

    def connection_made(self, now: float) -> list[Event]:
        events: list[Event] = []
        self.deadlines["_now"] = now
        if self.state not in (State.CONNECT, State.ACTIVE):
            raise NotifyError(CEASE, 5, f"connection in state {self.state} (collision refused)")
        self.framer = Framer()
        self.out.clear()  # nothing queued for an old connection belongs on this one
        self.tx_position = 0  # positions count per connection
        self.deadlines.pop("connect_retry", None)
        self._send(encode_open(self.my_open()), "open")
        self.deadlines["hold"] = now + LARGE_HOLD
        self._go(State.OPEN_SENT, "connected, OPEN sent", events)
        return events

    def connection_lost(self, now: float, reason: str = "connection lost") -> list[Event]:
        events: list[Event] = []
        self.deadlines["_now"] = now
        if self.state == State.OPEN_SENT:  # RFC 4271: OpenSent -> Active on TCP failure
            self.framer = Framer()
            self.deadlines = {"_now": now, "connect_retry": now + self.cfg.connect_retry}
            self._go(State.ACTIVE, reason, events)
        elif self.state in (State.CONNECT, State.ACTIVE):
            self.deadlines["connect_retry"] = now + self.cfg.connect_retry
        elif self.state != State.IDLE:
            self._down(reason, events, now=now, disconnect=False)
        return events

    def timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        d = self.deadlines
        d["_now"] = now
        if (t := d.get("hold")) is not None and t <= now:
            self.count("hold_expired")
            self._down("hold timer expired", events, sent=Notification(HOLD_EXPIRED, 0),
                       now=now)
            return events
        if (t := d.get("keepalive")) is not None and t <= now and \
                self.state in (State.OPEN_CONFIRM, State.ESTABLISHED):
            self._send(KEEPALIVE_BYTES, "keepalive")
            d["keepalive"] = max(t + self.keepalive_interval, now)
        if (t := d.get("connect_retry")) is not None and t <= now:
            d["connect_retry"] = now + self.cfg.connect_retry
            if self.state in (State.CONNECT, State.ACTIVE) and not self.cfg.passive:
                self._go(State.CONNECT, "connect retry", events)
                events.append(ConnectRequested())
        if (t := d.get("idle_hold")) is not None and t <= now:
            del d["idle_hold"]
            if self.state == State.IDLE and self.running:
                self._begin(now, events)
        return events

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the peer. Returns events; a protocol error ends the session here with
        the NOTIFICATION queued (never raises for peer input)."""
        events: list[Event] = []
        self.deadlines["_now"] = now
        if self.state in (State.IDLE, State.CONNECT, State.ACTIVE):
            return events  # no connection we know of: drop
        self.framer.feed(data)
        try:
            while self.state != State.IDLE and (m := self.framer.next_message()) is not None:
                self._message(m[0], m[1], now, events)
        except NotifyError as e:
            self.count("malformed")
            self._down(str(e), events, sent=Notification(e.code, e.subcode, e.data), now=now)
        return events

    @property
    def rx_position(self) -> int:
        """Stream bytes received and processed, at a message boundary."""
        return self.framer.position

    @property
    def rx_fed(self) -> int:
        """Stream bytes received on this connection (processed + a partial message)."""
        return self.framer.fed

    def _restart_hold(self, now: float) -> None:
        if self.hold_time:
            self.deadlines["hold"] = now + self.hold_time

    def _message(self, kind: int, body: memoryview, now: float, events: list[Event]) -> None:
        st = self.state
        if kind == MsgType.NOTIFICATION:
            n = decode_notification(body)
            self.count("received_notification")
            self._down(f"NOTIFICATION {n.code}/{n.subcode} received", events, received=n,
                       now=now)
            return
        if kind == MsgType.OPEN and st == State.OPEN_SENT:
            self.count("received_open")
            self._on_open(decode_open(body), now, events)
        elif kind == MsgType.KEEPALIVE and st in (State.OPEN_CONFIRM, State.ESTABLISHED):
            self.count("received_keepalive")
            self._restart_hold(now)
            if st == State.OPEN_CONFIRM:
                self.established_at = now
                self._go(State.ESTABLISHED, "KEEPALIVE received", events)
                assert self.peer_open is not None
                events.append(SessionEstablished(self.peer_open, self.hold_time))
        elif kind == MsgType.UPDATE and st == State.ESTABLISHED:
            self.count("received_update")
            self._restart_hold(now)
            u = decode_update(body, self.decoder)
            if u.withdraw_reason is not None:
                self.count("treat_as_withdraw")
                events.append(ErrorCounted("treat_as_withdraw", u.withdraw_reason))
            for why in u.discarded:
                self.count("attribute_discard")
                events.append(ErrorCounted("attribute_discard", why))
            events.append(UpdateReceived(u))
        elif kind == MsgType.ROUTE_REFRESH and st == State.ESTABLISHED:
            self.count("received_route_refresh")
            self._restart_hold(now)
            rr = decode_route_refresh(body)
            if (rr.afi, rr.safi) in self.families:
                events.append(RouteRefreshReceived(rr.afi, rr.safi))
        else:
            raise NotifyError(FSM_ERROR, {State.OPEN_SENT: 1, State.OPEN_CONFIRM: 2}.get(st, 3),
                              f"message type {kind} in state {st}")

    def _on_open(self, o: Open, now: float, events: list[Event]) -> None:
        if o.asn != self.cfg.peer_as:
            raise NotifyError(OPEN_ERROR, BAD_PEER_AS, f"peer AS {o.asn}, expected "
                              f"{self.cfg.peer_as}")
        if o.hold_time and o.hold_time < 3:
            raise NotifyError(OPEN_ERROR, UNACCEPTABLE_HOLD, f"hold time {o.hold_time}")
        if o.router_id == self.cfg.router_id:
            raise NotifyError(OPEN_ERROR, 3, "peer uses our router id")
        self.peer_open = o
        self.as4 = o.caps.as4 is not None
        self.decoder = AttrDecoder(as4=self.as4, ebgp=self.ebgp)
        fams = o.caps.families or frozenset({IPV4_UNICAST})  # no MP capability: IPv4 only
        self.families = frozenset(fams) & frozenset(self.cfg.families)
        self.hold_time = min(self.cfg.hold_time, o.hold_time)
        self.keepalive_interval = self.hold_time / 3 if self.hold_time else 0.0
        self._send(KEEPALIVE_BYTES, "keepalive")
        if self.hold_time:
            self.deadlines["hold"] = now + self.hold_time
            self.deadlines["keepalive"] = now + self.keepalive_interval
        else:
            self.deadlines.pop("hold", None)
        self._go(State.OPEN_CONFIRM, "OPEN received", events)

    def send_route_refresh(self, afi: int, safi: int) -> None:
        if self.state == State.ESTABLISHED and self.peer_open and \
                self.peer_open.caps.route_refresh:
            self.send_raw(encode_route_refresh(RouteRefresh(afi, safi)), "route_refresh")
