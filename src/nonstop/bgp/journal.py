"""Replication journal: a hot standby fed the master's inputs holds the same session and RIB.

The speaker is deterministic, so the journal records its inputs, not its state: each record is
``kind (u8) | peer index (u16) | now (f64) | payload length (u32) | payload``.

    kind  input                      payload
    1     start(now)                 -
    2     connection_made            local address (text)
    3     connection_lost            -
    4     receive_data               the bytes, journaled before they are processed
    5     timer(now) that fired      -
    6     bytes accepted by the kernel for the peer (after the write)   byte count (u32)
    7     stop                       -
    8     originate                  "prefix med communities"
    9     withdraw_originated        prefix
    10    set_policy                 direction NUL policy JSON
    11    refresh                    -
    12    resume (a standby took over)   JSON {peer: bytes the kernel had accepted}
    13    acked: the peer acknowledged this many stream bytes (u64; lets a standby that
          keeps written bytes, for a takeover on another node, forget the old ones)

Records of kind 4 carry the bytes as read (a partial message too: the standby's framer holds the
same partial bytes); ``rx_position`` (last message boundary) and ``rx_fed`` are equal on both
sides. Kind 6 says how many of the bytes the speaker produced were accepted by the kernel: what
the standby produced beyond that was never written and is sent after :meth:`Standby.resume`.
Where the adapter can read the kernel's own counts (a local restart keeps the same socket:
TCP_INFO bytes_received/bytes_acked, SIOCINQ/SIOCOUTQ), ``resume(written=...)`` reconciles the
last write the master did not live to journal (replica.py).

``Standby.resume(now)`` continues every Established session without an OPEN: the hold timer
restarts at ``now`` (the peer's KEEPALIVEs during the outage are retransmitted by TCP after the
connection move), and a KEEPALIVE goes out at once, so the peer's hold timer restarts too.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from nonstop.bgp.config import SpeakerConfig
from nonstop.bgp.fsm import State
from nonstop.bgp.policy import PolicyConfig
from nonstop.bgp.speaker import PeerEvent, Speaker
from nonstop.bgp.wire import KEEPALIVE_BYTES
from nonstop.common import LocalProtocolError, RemoteProtocolError

_HDR = struct.Struct("!BHdI")
(START, CONNECTED, LOST, RX, TIMER, TX, STOP, ORIGINATE, WITHDRAW, POLICY, REFRESH,
 RESUME, ACKED) = range(1, 14)
LAST_KIND = ACKED


def encode_record(kind: int, peer: int, now: float, payload: bytes = b"") -> bytes:
    return _HDR.pack(kind, peer, now, len(payload)) + payload


def decode_record(rec: bytes) -> tuple[int, int, float, bytes]:
    if len(rec) < _HDR.size:
        raise RemoteProtocolError("journal record too short", counter="bad_journal")
    kind, peer, now, n = _HDR.unpack_from(rec)
    payload = rec[_HDR.size :]
    if len(payload) != n or not 1 <= kind <= LAST_KIND:
        raise RemoteProtocolError("journal record malformed", counter="bad_journal")
    return kind, peer, now, payload


class Journal:
    """Collects a speaker's records; ``sink`` (e.g. a replication channel) gets each one too."""

    def __init__(self, speaker: Speaker, sink: Callable[[bytes], None] | None = None,
                 history: list[bytes] | None = None) -> None:
        self.records: list[bytes] = history if history is not None else []
        self.sink = sink
        speaker.journal = self._record

    def _record(self, kind: int, peer: int, now: float, payload: bytes) -> None:
        rec = encode_record(kind, peer, now, payload)
        self.records.append(rec)
        if self.sink is not None:
            self.sink(rec)

    def take(self) -> list[bytes]:
        out, self.records = self.records, []
        return out

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.records)


@dataclass(frozen=True, slots=True)
class SessionResumed:
    peer: str
    rx_position: int
    tx_position: int
    hold_time: int


class Standby:
    """A speaker kept in step with the master's journal; :meth:`resume` makes it the master.

    ``retain``: keep the bytes the master wrote (not only those it has yet to write), back to
    the peer's acknowledged point as journaled one ACKED record earlier. A takeover on another
    node restores the connection at a send position the session sync chose, which can be
    behind what the master wrote (the backup's copy of the sent bytes lags): the bytes from
    there on are sent again from this tail, and the peer's TCP drops what it already has.
    """

    def __init__(self, cfg: SpeakerConfig, *, retain: bool = False) -> None:
        self.speaker = Speaker(cfg)
        self.written: dict[str, int] = {p.name: 0 for p in self.speaker.by_index}  # tx bytes
        self.retain = retain
        self.tail: dict[str, bytearray] = {p.name: bytearray() for p in self.speaker.by_index}
        self.acked: dict[str, int] = {p.name: 0 for p in self.speaker.by_index}  # last ACKED
        self.applied = 0
        self.resumed = False

    def apply(self, record: bytes) -> list[PeerEvent]:
        """Apply one master record; returns the speaker's events (the standby's adapter closes
        its copy of a socket on DisconnectRequested)."""
        if self.resumed:
            raise LocalProtocolError("standby already resumed")
        kind, idx, now, payload = decode_record(record)
        sp = self.speaker
        name = sp.by_index[idx].name if idx != 0xFFFF else ""
        ev: list[PeerEvent] = []
        if kind == START:
            ev = sp.start(now)
        elif kind == CONNECTED:
            ev = sp.connection_made(name, now, payload.decode())
            self.written[name] = 0
            self.tail[name] = bytearray()
            self.acked[name] = 0
        elif kind == LOST:
            ev = sp.connection_lost(name, now)
        elif kind == RX:
            ev = sp.receive_data(name, payload, now)
        elif kind == TIMER:
            ev = sp.timer(now)
        elif kind == TX:
            n = int.from_bytes(payload, "big")
            sess = sp.peers[name].session
            if len(sess.out) < n:
                raise LocalProtocolError(f"journal diverged: master wrote {n} bytes to {name}, "
                                         f"standby has {len(sess.out)}")
            if self.retain:
                self.tail[name] += sess.out[:n]
            del sess.out[:n]
            self.written[name] += n
        elif kind == STOP:
            ev = sp.stop(now)
        elif kind == ORIGINATE:
            prefix, med, comms = payload.decode().split(" ")
            sp.originate(prefix, tuple(int(c) for c in comms.split(",") if c),
                         None if med == "None" else int(med), now)
        elif kind == WITHDRAW:
            sp.withdraw_originated(payload.decode(), now)
        elif kind == POLICY:
            direction, _, js = payload.partition(b"\0")
            sp.set_policy(name, direction.decode(), msgspec.json.decode(js, type=PolicyConfig),
                          now)
        elif kind == REFRESH:
            sp.refresh(name, now)
        elif kind == ACKED:
            self._acked(name, int.from_bytes(payload, "big"))
        elif kind == RESUME:  # an earlier standby took over here: do what it did
            self._resume(now, {k: int(v) for k, v in msgspec.json.decode(payload).items()})
        self.applied += 1
        return ev

    def _acked(self, name: str, acked: int) -> None:
        """Forget written bytes before the previous ACKED value (one record of slack: the
        session sync's own view of the peer's ACKs may lag the master's kernel)."""
        keep_from, self.acked[name] = self.acked[name], acked
        tail = self.tail[name]
        drop = len(tail) - (self.written[name] - keep_from)
        if drop > 0:
            del tail[:drop]

    def resume(self, now: float, written: dict[str, int] | None = None) -> list[SessionResumed]:
        """Take over: every Established session goes on (no OPEN): whatever the master produced
        but never wrote is sent, then one KEEPALIVE. ``written[peer]``, when
        known, is the true count of bytes the kernel accepted on this connection: bytes the
        master wrote after its last journal record are not sent twice. Journaled (kind 12)
        when the speaker has a journal, so a later standby replays the takeover too."""
        self.resumed = True
        self.speaker._j(RESUME, 0xFFFF, now, msgspec.json.encode(written or {}))
        return self._resume(now, written)

    def _resume(self, now: float, written: dict[str, int] | None) -> list[SessionResumed]:
        out = []
        for p in self.speaker.by_index:
            s = p.session
            if s.state != State.ESTABLISHED:
                continue
            if written is not None and p.name in written:
                extra = written[p.name] - self.written[p.name]
                tail = self.tail[p.name]
                if -len(tail) <= extra < 0:  # restored behind the master's writes: again
                    s.out[:0] = tail[extra:]
                    del tail[extra:]
                    self.written[p.name] += extra
                    extra = 0
                if extra < 0 or extra > len(s.out):
                    raise LocalProtocolError(f"{p.name}: kernel wrote {written[p.name]} bytes, "
                                             f"journal says {self.written[p.name]}")
                if self.retain:
                    self.tail[p.name] += s.out[:extra]
                del s.out[:extra]
                self.written[p.name] += extra
            # what the master never wrote goes first (it may end a message the peer has half
            # of), then the KEEPALIVE that restarts the peer's hold timer
            s.out += KEEPALIVE_BYTES
            s.tx_position += len(KEEPALIVE_BYTES)
            s.count("sent_keepalive")
            s.deadlines["_now"] = now
            if s.hold_time:
                s.deadlines["hold"] = now + s.hold_time
                s.deadlines["keepalive"] = now + s.keepalive_interval
            out.append(SessionResumed(p.name, s.rx_position, s.tx_position, s.hold_time))
        return out

    def state(self) -> dict[str, object]:
        """What must equal the master's: per peer session state and RIB sizes."""
        return session_state(self.speaker)


def session_state(sp: Speaker) -> dict[str, object]:
    out: dict[str, object] = {}
    for p in sp.by_index:
        s = p.session
        out[p.name] = {
            "state": str(s.state),
            "hold_time": s.hold_time,
            "as4": s.as4,
            "families": sorted(s.families),
            "rx_position": s.rx_position,
            "tx_position": s.tx_position,
            "deadlines": {k: v for k, v in sorted(s.deadlines.items()) if k != "_now"},
            "adj_in": {f"{a}/{b}": len(v) for (a, b), v in p.adj_in.items()},
            "adj_out": {f"{a}/{b}": len(v) for (a, b), v in p.adj_out.items()},
        }
    return out
