"""The sans-IO session-sync core: the master's SyncSender and the backup's SyncReceiver.

No sockets, no clocks: every entry point takes ``now`` (seconds, ``time.monotonic()``).

Rules, all in one place:

- The sender keeps a mirror of what the backup must hold, per connection, and applies every
  record to it as it queues it; the receiver applies the same records with the same code, in
  batch order, so after delivery both hold the same state (both in nonstop.session.mirror).
- Records are queued in call order and sealed into a batch when ``max_batch`` records are queued,
  when the next one would not fit in ``max_datagram``, or ``max_delay`` after the first one.
- Delivery is reliable and in order: batches carry (incarnation, seq); the receiver applies them in
  seq order, buffers ones that arrive early, and ACKs the highest seq applied. The sender
  retransmits a batch until it is acknowledged, and keeps at most ``window`` batches in flight so
  the receiver's ReplayWindow never discards a legitimate one as too old. The retransmission
  timeout is TCP's (RFC 6298): smoothed RTT + 4 x its variation, from batches acknowledged
  after one transmission (Karn), never below ``rto`` nor above ``max_rto``, doubled at each
  timeout until such a sample comes. A fixed 20 ms timer made a busy backup's late ACKs cost a
  resend of the whole window every 20 ms, which kept it busier: 85% of the datagrams were resends.
  A timeout resends at most ``RESEND_BURST`` batches, the oldest (the receiver buffers batches
  that arrive early, so one lost datagram costs one resend; with 10,000 connections a backup
  behind by more than the RTO got the whole window again at every timeout: half of the
  datagrams were resends).
- A RESET batch (the first of an incarnation and of every resync) tells the receiver to drop all
  it holds: the batches that follow rebuild every connection (FULL, UPDATE, COMMIT, DATA). A
  receiver without a base (it just started) ACKs with NEED_RESYNC and the sender resyncs, unless
  a RESET is already on its way.
- ``confirmed(conn_id)`` is (rcv end, snd end) as of the last batch the backup acknowledged: the
  master may ACK the peer up to rcv end and no further. It is forgotten at a resync, and never
  ahead of what the receiver ACKed. A stream's FIN (``fin()``, queued once the bytes before it
  are) counts in its end as the one sequence number it takes.
- Stream positions are TCP sequence numbers, compared mod 2**32; how each side trims them is in
  nonstop.session.mirror. Positions only move forward: the sender refuses a commit or an update
  that moves one back (LocalProtocolError).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from nonstop.auth import MIN_KEY_LEN, ReplayWindow
from nonstop.common import LocalProtocolError, RemoteProtocolError
from nonstop.session.mirror import ConnMirror, ConnState, apply_record, seq_add, seq_diff, seq_lt
from nonstop.session.wire import (
    DATA_LEN,
    FULL_LEN,
    OVERHEAD,
    Ack,
    Batch,
    Close,
    CloseReason,
    Commit,
    Data,
    Direction,
    Fin,
    FullRecord,
    Record,
    Update,
    decode,
    encode_ack,
    encode_batch,
    record_size,
)

log = logging.getLogger("nonstop.session")

LOG_EVERY = 1000


class _Counted:
    counters: dict[str, int]

    def _drop(self, counter: str, reason: str) -> None:
        n = self.counters.get(counter, 0) + 1
        self.counters[counter] = n
        if n == 1 or n % LOG_EVERY == 0:
            log.warning("session sync: dropped (%s, %d so far): %s", counter, n, reason)


@dataclass(slots=True)
class _Sent:
    seq: int
    data: bytes
    # conn id -> (the mirror's conn object, (rcv end, snd end)) after this batch; None: closed
    marks: dict[int, tuple[ConnMirror, tuple[int, int]] | None]
    sent_at: float = 0.0  # when it was last handed out (or queued, while ``queued``)
    tries: int = 0  # how many times it was handed out (an RTT sample needs exactly one)
    queued: bool = False  # in the outbox, not yet handed out by datagrams_to_send


RESEND_BURST = 8  # batches resent per timeout at most, oldest first
SENDER_COUNTERS = ("tx", "batches", "records", "payload_bytes", "sealed_bytes", "retransmits",
                   "resyncs", "rx_ack", "malformed",
                   "bad_version", "bad_auth", "stale", "ack_reordered", "wrong_kind", "bogus_ack",
                   "data_held", "foreign", "past_fin")


class SyncSender(_Counted):
    """The master's side. Feed it socket events; send what ``datagrams_to_send`` returns."""

    def __init__(self, key: bytes, *, incarnation: int, max_batch: int = 64,
                 max_delay: float = 0.001, now: float, rto: float = 0.02,
                 max_rto: float = 0.25, max_datagram: int = 1472, window: int = 256) -> None:
        if len(key) < MIN_KEY_LEN:
            raise ValueError(f"key must be at least {MIN_KEY_LEN} bytes")
        if max_batch < 1 or max_delay < 0 or rto <= 0 or max_rto < rto or window < 1:
            raise ValueError("max_batch, window >= 1; max_delay >= 0; max_rto >= rto > 0")
        if max_datagram < OVERHEAD + max(FULL_LEN, DATA_LEN + 1):
            raise ValueError(f"max_datagram {max_datagram} cannot hold a FULL record")
        self._key, self.incarnation = key, incarnation
        self.max_batch, self.max_delay, self.rto = max_batch, max_delay, rto
        self.max_rto = max_rto
        self._srtt: float | None = None  # smoothed RTT of the sync channel (s)
        self._rttvar = 0.0
        self._rto = rto  # the current timeout before backoff
        self._backoff = 1  # doubled at each timeout, back to 1 when an ACK moves
        self.max_datagram, self.window = max_datagram, window
        self._conns: dict[int, ConnMirror] = {}
        self._held: dict[tuple[int, Direction], dict[int, bytes]] = {}  # data past a gap
        self._held_fin: dict[tuple[int, Direction], int] = {}  # a FIN past a gap
        self._pending: list[Record] = []
        self._pending_size = 0
        self._pending_since = now
        self._marks: dict[int, tuple[ConnMirror, tuple[int, int]] | None] = {}
        self._next_seq = 1
        self._reset_next = True  # the first batch of an incarnation is a RESET
        self._reset_seq = 0  # seq of the latest RESET batch (0: not sealed yet)
        self._resync_end = 0  # seq of the last batch of the latest resync
        self._resynced = False  # cache of ``resynced`` (reset by resync and pause)
        # no backup (pause() until the next resync): records only update the mirror. Nothing
        # queued now would be sent (a resync starts over from the mirror), so none is encoded
        # and sealed: a new master adopting 256 connections spent 5-6 ms of its 16 building
        # batches that its first flush threw away, on the takeover's critical path
        self._paused = False
        self._sealed: deque[_Sent] = deque()  # sealed, waiting for room in the window
        self._inflight: dict[int, _Sent] = {}  # sent, not acknowledged, by seq (ordered)
        self._outbox: list[_Sent] = []
        self._confirmed: dict[int, tuple[int, int]] = {}
        self._ack_from = (-1, -1)  # (backup incarnation, ack seq) of the last ACK accepted
        self.counters: dict[str, int] = dict.fromkeys(SENDER_COUNTERS, 0)

    # -- what the session manager feeds in ---------------------------------------------------
    def open(self, conn_id: int, full: FullRecord, now: float) -> None:
        if conn_id != full.conn_id or conn_id in self._conns:
            raise LocalProtocolError(f"conn {conn_id} is already open or does not match {full}")
        self._enqueue(full, now)

    def adopt(self, state: ConnState, now: float) -> None:
        """Track a connection from its whole state (a promotion's restored connection): the
        mirror ``open``, ``update``, ``commit``, ``data`` both ways and the FINs would leave. With
        no backup (paused) the mirror is built at once, no record made (the next resync sends it
        whole); otherwise those records are queued. A state whose input does not start at its
        commit, or whose peer FIN is not at the end of that input, goes through those calls
        themselves (not seen)."""
        conn_id = state.full.conn_id
        if conn_id in self._conns:
            raise LocalProtocolError(f"conn {conn_id} is already open")
        c = state.commit
        if (c is not None and c.rpos != state.rcv_start) or state.rcv_fin not in (
                None, state.rcv_end):
            self.open(conn_id, state.full, now)
            self.update(conn_id, rcv_nxt=state.rcv_nxt, snd_una=state.snd_una,
                        snd_nxt=state.snd_nxt, snd_wnd=state.snd_wnd, rcv_wnd=state.rcv_wnd,
                        now=now)  # fmt: skip
            if c is not None:
                self.commit(conn_id, c.rpos, c.wpos, c.state, now)
            self.data(conn_id, Direction.RCV, state.rcv_start, state.rcv_data, now)
            self.data(conn_id, Direction.SND, state.snd_start, state.snd_data, now)
            if state.rcv_fin is not None:
                self.fin(conn_id, Direction.RCV, state.rcv_fin, now)
            return
        if self._paused:
            self._conns[conn_id] = ConnMirror.from_state(state)
            return
        self._enqueue_whole(state, now)

    def data(self, conn_id: int, direction: Direction, seq: int, payload: bytes,
             now: float) -> None:
        """Stream bytes at ``seq``: RCV received from the peer, SND written by the service.

        Overlaps with what is held are dropped; bytes past a gap wait until the gap is filled.
        """
        c = self._conn(conn_id)
        direction = Direction(direction)
        if seq_diff(seq, c.end(direction)) > 0:
            held = self._held.setdefault((conn_id, direction), {})
            if len(payload) > len(held.get(seq, b"")):
                held[seq] = bytes(payload)
            self.counters["data_held"] += 1
            return
        self._feed(conn_id, direction, seq, payload, now)
        self._drain(conn_id, direction, now)

    def fin(self, conn_id: int, direction: Direction, seq: int, now: float) -> bool:
        """The stream in ``direction`` ends at ``seq`` (a FIN took that sequence number): RCV the
        peer's, SND ours. Queued once the bytes before it are; a FIN seen again is ignored.
        Returns False (and changes nothing) if ``seq`` contradicts what is held: before the
        stream's end, or another FIN already there (a forged or broken segment; TCP drops it)."""
        c = self._conn(conn_id)
        direction = Direction(direction)
        held = c.fin(direction)
        if held is not None:
            return held == seq
        off = seq_diff(seq, c.end(direction))
        if off < 0:
            return False
        if off > 0:
            self._held_fin[(conn_id, direction)] = seq
            return True
        self._enqueue(Fin(conn_id, direction, seq), now)
        return True

    def update(self, conn_id: int, *, rcv_nxt: int, snd_una: int, snd_nxt: int, snd_wnd: int,
               rcv_wnd: int, now: float) -> None:
        c = self._conn(conn_id)
        if seq_lt(snd_una, c.snd_start):
            raise LocalProtocolError(f"conn {conn_id}: snd_una {snd_una} moved back")
        self._enqueue(Update(conn_id, rcv_nxt, snd_una, snd_nxt, snd_wnd, rcv_wnd), now)
        self._drain(conn_id, Direction.SND, now)

    def commit(self, conn_id: int, rpos: int, wpos: int, state: bytes, now: float) -> None:
        c = self._conn(conn_id)
        if seq_lt(rpos, c.rcv_start):
            raise LocalProtocolError(f"conn {conn_id}: committed read position {rpos} moved back")
        self._enqueue(Commit(conn_id, rpos, wpos, bytes(state)), now)
        self._drain(conn_id, Direction.RCV, now)

    def close(self, conn_id: int, reason: CloseReason, now: float) -> None:
        self._conn(conn_id)
        self._enqueue(Close(conn_id, CloseReason(reason)), now)
        for d in Direction:
            self._held.pop((conn_id, d), None)
            self._held_fin.pop((conn_id, d), None)
        self._confirmed.pop(conn_id, None)

    def resync(self, now: float, *, new_backup: bool = False) -> None:
        """Start over: a RESET batch, then every connection's whole state (a backup rejoined).

        ``new_backup``: the ACKs come from another receiver from now on. Its (incarnation, seq)
        starts afresh: a receiver started before the last one has a lower incarnation, and all
        its ACKs read as older than the last one's (a master moved from n3 to n2 counted 17,393
        of them as reordered and never protected its connections)."""
        self.counters["resyncs"] += 1
        self._paused = False
        if new_backup:
            self._ack_from = (-1, -1)
        self._pending, self._pending_size, self._marks = [], 0, {}
        self._sealed.clear()
        self._inflight.clear()
        self._outbox.clear()
        self._confirmed.clear()
        self._reset_next = True
        for c in list(self._conns.values()):
            self._enqueue_whole(c.snapshot(), now)
        self._seal(now)  # (nothing open: an empty RESET still clears the backup)
        self._resync_end = self._next_seq - 1
        self._resynced = False

    def _enqueue_whole(self, state: ConnState, now: float) -> None:
        """The records that rebuild ``state`` from nothing: FULL, UPDATE, COMMIT, DATA, FINs."""
        conn_id = state.full.conn_id
        self._enqueue(state.full, now)
        self._enqueue(Update(conn_id, state.rcv_nxt, state.snd_una, state.snd_nxt,
                             state.snd_wnd, state.rcv_wnd), now)
        if state.commit is not None:
            self._enqueue(state.commit, now)
        self._feed(conn_id, Direction.RCV, state.rcv_start, state.rcv_data, now)
        self._feed(conn_id, Direction.SND, state.snd_start, state.snd_data, now)
        for d, fin, end in ((Direction.RCV, state.rcv_fin, state.rcv_end),
                            (Direction.SND, state.snd_fin, state.snd_end)):
            if fin is not None and fin == end:  # (past the end: acknowledged, trimmed)
                self._enqueue(Fin(conn_id, d, fin), now)

    def pause(self) -> None:
        """No backup to send to: forget what is queued or in flight (the mirror is kept, so a
        later ``resync`` rebuilds a backup from it); the next batch is a RESET, and the next
        backup's ACKs are taken from any incarnation. Until that resync, what is fed in only
        updates the mirror: no record is encoded, sealed or counted."""
        self._ack_from = (-1, -1)
        self._pending, self._pending_size, self._marks = [], 0, {}
        self._sealed.clear()
        self._inflight.clear()
        self._outbox.clear()
        self._confirmed.clear()
        self._reset_next = True
        self._resynced = False
        self._paused = True

    @property
    def resynced(self) -> bool:
        """The backup acknowledged every batch of the latest resync (it holds a whole copy).
        Once true it stays true until the next resync or pause (cached: the clamp asks per
        segment). Not thread safe: call it under the owner's lock."""
        if self._resynced:
            return True
        if self._reset_pending():
            return False
        end = self._resync_end
        done = all(seq > end for seq in self._inflight) and all(s.seq > end for s in self._sealed)
        self._resynced = done
        return done

    def refresh_full(self, conn_id: int, full: FullRecord) -> None:
        """Replace the FULL record a later resync sends for ``conn_id`` (e.g. a fresher TSval);
        its stream origins must not change."""
        c = self._conn(conn_id)
        if (full.conn_id, full.snd_seq, full.rcv_seq) != (conn_id, c.full.snd_seq, c.full.rcv_seq):
            raise LocalProtocolError(f"conn {conn_id}: a FULL refresh cannot move the origins")
        c.full = full

    # -- what the backup tells us ------------------------------------------------------------
    def receive_ack(self, data: bytes, now: float) -> None:
        try:
            ack = decode(data, self._key)
        except RemoteProtocolError as e:
            self._drop(e.counter, e.reason)
            return
        if not isinstance(ack, Ack):
            self._drop("wrong_kind", "a batch where an ACK was expected")
            return
        if ack.master_incarnation != self.incarnation:
            self._drop("stale", f"ACK for master incarnation {ack.master_incarnation}")
            return
        if (ack.incarnation, ack.seq) <= self._ack_from:
            self.counters["ack_reordered"] += 1  # an older ACK overtaken by a newer one: normal
            return
        if ack.applied >= self._next_seq:
            self._drop("bogus_ack", f"ACK of batch {ack.applied} never sent")
            return
        self._ack_from = (ack.incarnation, ack.seq)
        self.counters["rx_ack"] += 1
        if ack.need_resync:
            if not self._reset_pending():
                self.resync(now)
            return
        if ack.applied < self._reset_seq:
            return  # from before our latest RESET
        acked = [s for s in self._inflight if s <= ack.applied]
        if acked:  # Karn: only a batch sent once gives a sample, and the backoff stays until
            # one does (an ACK of a resent batch says nothing about how long the first took)
            last = self._inflight[acked[-1]]
            if last.tries == 1 and not last.queued:
                self._rtt_sample(now - last.sent_at)
                self._backoff = 1
        for seq in acked:
            for conn_id, mark in self._inflight.pop(seq).marks.items():
                if mark is None:
                    self._confirmed.pop(conn_id, None)
                elif self._conns.get(conn_id) is mark[0]:  # not a later conn with the same id
                    self._confirmed[conn_id] = mark[1]

    def _rtt_sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt
        self._rto = min(self.max_rto, max(self.rto, self._srtt + 4 * self._rttvar))

    @property
    def current_rto(self) -> float:
        """The retransmission timeout in force now (s), backoff included."""
        return min(self.max_rto, self._rto * self._backoff)

    @property
    def srtt(self) -> float | None:
        """The smoothed RTT of the sync channel (s); None before the first sample."""
        return self._srtt

    def confirmed(self, conn_id: int) -> tuple[int, int] | None:
        """(rcv end, snd end) the backup holds for ``conn_id``; None if it holds nothing yet.

        The master must not ACK the peer past rcv end (nor, if it can, transmit past snd end).
        """
        return self._confirmed.get(conn_id)

    def stream_end(self, conn_id: int, direction: Direction) -> int:
        """The sequence number after the last byte the mirror holds of ``conn_id``'s stream in
        ``direction`` (RCV: from the peer, SND: from the service), without a gap: what the backup
        will hold once everything queued is acknowledged. Bytes held past a gap do not count.
        O(1), unlike ``connections()``. LocalProtocolError if the connection is not open."""
        return self._conn(conn_id).end(Direction(direction))

    def snd_flight(self, conn_id: int) -> tuple[int, bytes]:
        """The end of the service's stream the mirror holds without a gap, and the bytes before
        it the peer has not acknowledged as far as this node saw (b"": all of them).
        LocalProtocolError if not open."""
        c = self._conn(conn_id)
        end = c.end(Direction.SND)
        skip = max(0, seq_diff(c.snd_una, c.snd_start))  # the mirror may hold acked bytes
        return end, bytes(c.snd_data[skip:])

    def connections(self) -> dict[int, ConnState]:
        """The sender's mirror: what the backup will hold once everything is acknowledged."""
        return {k: c.snapshot() for k, c in self._conns.items()}

    @property
    def in_flight(self) -> int:
        return len(self._inflight) + len(self._sealed) + bool(self._pending)

    # -- timers and output -------------------------------------------------------------------
    def get_timer(self) -> float | None:
        rto = self.current_rto
        times = [s.sent_at if s.queued else s.sent_at + rto for s in self._inflight.values()]
        if self._pending:
            times.append(self._pending_since + self.max_delay)
        return min(times, default=None)

    def handle_timer(self, now: float) -> None:
        if self._pending and now >= self._pending_since + self.max_delay:
            self._seal(now)
        rto, fired = self.current_rto, 0
        for sent in self._inflight.values():  # oldest first
            if fired >= RESEND_BURST:
                break
            if not sent.queued and now >= sent.sent_at + rto:
                sent.sent_at, sent.queued = now, True
                self._outbox.append(sent)
                self.counters["retransmits"] += 1
                fired += 1
        if fired:
            self._backoff = min(self._backoff * 2, 64)
        self._transmit(now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        self.handle_timer(now)
        out, self._outbox = self._outbox, []
        for sent in out:
            sent.sent_at, sent.queued = now, False
            sent.tries += 1
        self.counters["tx"] += len(out)
        return [sent.data for sent in out]

    # -- internals ---------------------------------------------------------------------------
    def _conn(self, conn_id: int) -> ConnMirror:
        c = self._conns.get(conn_id)
        if c is None:
            raise LocalProtocolError(f"conn {conn_id} is not open")
        return c

    def _reset_pending(self) -> bool:
        return self._reset_next or self._reset_seq in self._inflight or any(
            s.seq == self._reset_seq for s in self._sealed)

    def _feed(self, conn_id: int, d: Direction, seq: int, payload: bytes, now: float) -> None:
        c = self._conns[conn_id]
        skip = -seq_diff(seq, c.end(d))
        view = memoryview(payload)[max(skip, 0):]
        if view and c.fin(d) is not None:  # bytes after the stream's FIN: TCP drops them too
            self.counters["past_fin"] += 1
            return
        seq = seq_add(seq, max(skip, 0))
        room = self.max_datagram - OVERHEAD - DATA_LEN
        for i in range(0, len(view), room):
            self._enqueue(Data(conn_id, d, seq_add(seq, i), bytes(view[i : i + room])), now)

    def _drain(self, conn_id: int, d: Direction, now: float) -> None:
        held = self._held.get((conn_id, d))
        while held:
            end = self._conns[conn_id].end(d)
            ready = [s for s in held if seq_diff(s, end) <= 0]
            if not ready:
                break
            for s in ready:
                self._feed(conn_id, d, s, held.pop(s), now)
        if self._held_fin and (fin := self._held_fin.get((conn_id, d))) is not None:
            c = self._conns[conn_id]
            off = seq_diff(fin, c.end(d))
            if off <= 0:
                del self._held_fin[(conn_id, d)]
                if off == 0:  # (before the end: the bytes held ran past it, a broken FIN)
                    self._enqueue(Fin(conn_id, d, fin), now)

    def _enqueue(self, rec: Record, now: float) -> None:
        if self._paused:  # the mirror only: the next resync sends it whole
            self._apply(rec)
            return
        size = record_size(rec)
        if self._pending and self._pending_size + size + OVERHEAD > self.max_datagram:
            self._seal(now)
        if not self._pending:
            self._pending_since = now
        self._apply(rec)
        c = self._conns.get(rec.conn_id)
        self._marks[rec.conn_id] = None if c is None else (c, c.ends())
        self._pending.append(rec)
        self._pending_size += size
        if len(self._pending) >= self.max_batch:
            self._seal(now)

    def _apply(self, rec: Record) -> None:
        problem = apply_record(self._conns, rec)
        if problem is not None:
            raise LocalProtocolError(f"{rec!r} does not apply: {problem}")

    def _seal(self, now: float) -> None:
        seq = self._next_seq
        self._next_seq += 1
        batch = Batch(self.incarnation, seq, tuple(self._pending), self._reset_next)
        if self._reset_next:
            self._reset_seq, self._reset_next = seq, False
        data = encode_batch(self._key, batch)
        self._sealed.append(_Sent(seq, data, self._marks))
        self.counters["batches"] += 1
        self.counters["records"] += len(self._pending)
        # the stream bytes and state blobs carried (any design copies them to the backup) apart
        # from the records' own cost: sealed - payload = headers, MACs, record fields
        self.counters["sealed_bytes"] += len(data)
        self.counters["payload_bytes"] += sum(
            len(r.payload) if isinstance(r, Data) else len(r.state) if isinstance(r, Commit) else 0
            for r in self._pending
        )
        self._pending, self._pending_size, self._marks = [], 0, {}
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        while self._sealed:
            oldest = next(iter(self._inflight), self._sealed[0].seq)
            if self._sealed[0].seq - oldest >= self.window:
                return
            sent = self._sealed.popleft()
            sent.sent_at, sent.queued = now, True
            self._inflight[sent.seq] = sent
            self._outbox.append(sent)


RECEIVER_COUNTERS = ("rx_batch", "applied", "duplicate", "malformed", "bad_version", "bad_auth",
                     "stale", "wrong_kind", "buffer_full", "no_base", "unknown_conn", "data_gap")


class SyncReceiver(_Counted):
    """The backup's side. ``receive`` returns the ACK datagrams to send back to the master."""

    def __init__(self, key: bytes, *, now: float, incarnation: int, window: int = 256) -> None:
        if len(key) < MIN_KEY_LEN:
            raise ValueError(f"key must be at least {MIN_KEY_LEN} bytes")
        self._key, self.incarnation, self.window = key, incarnation, window
        self._conns: dict[int, ConnMirror] = {}
        self._replay = ReplayWindow(window)
        self._master_inc = -1
        self._next: int | None = None  # next batch seq to apply; None: no base yet
        self._early: dict[int, Batch] = {}
        self._ack_seq = 0
        self.last_rx: float | None = None
        self.seeded = False  # holds a parked copy (seed()), no master's sync since
        self.counters: dict[str, int] = dict.fromkeys(RECEIVER_COUNTERS, 0)
        self._new: list[tuple[int, FullRecord]] = []  # FULLs applied since take_new_fulls()
        del now  # nothing is timed on this side yet; kept for symmetry with the sender

    def receive(self, data: bytes, now: float) -> list[bytes]:
        try:
            b = decode(data, self._key)
        except RemoteProtocolError as e:
            self._drop(e.counter, e.reason)
            return []
        if not isinstance(b, Batch):
            self._drop("wrong_kind", "an ACK where a batch was expected")
            return []
        if b.incarnation < self._master_inc:
            self._drop("stale", f"batch of old master incarnation {b.incarnation}")
            return []
        if b.incarnation > self._master_inc:
            self._master_inc, self._next, self._early = b.incarnation, None, {}
        if (self._next is not None and b.seq < self._next) or b.seq in self._early:
            self.counters["duplicate"] += 1
            return [self._ack()]
        if len(self._early) >= self.window and not b.reset:
            self._drop("buffer_full", f"batch {b.seq} arrived too early")
            return [self._ack()]
        verdict = self._replay.check_and_update(b.incarnation, b.seq)
        if verdict != "new":
            self._drop("stale" if verdict == "old" else "duplicate", f"batch {b.seq}: {verdict}")
            return [self._ack()]
        self.counters["rx_batch"] += 1
        self.last_rx = now
        if b.reset:
            self._conns.clear()
            self.seeded = False
            self._next = b.seq
            self._early = {s: e for s, e in self._early.items() if s > b.seq}
        self._early[b.seq] = b
        if self._next is None:
            self.counters["no_base"] += 1
        while self._next is not None and self._next in self._early:
            for rec in self._early.pop(self._next).records:
                if isinstance(rec, FullRecord):
                    self._new.append((rec.conn_id, rec))
                problem = apply_record(self._conns, rec)
                if problem is not None:
                    self._drop(problem, f"{type(rec).__name__} for conn {rec.conn_id}")
            self.counters["applied"] += 1
            self._next += 1
        return [self._ack()]

    def _ack(self) -> bytes:
        self._ack_seq += 1
        applied = 0 if self._next is None else self._next - 1
        return encode_ack(self._key, Ack(self.incarnation, self._ack_seq, max(self._master_inc, 0),
                                         applied, self._next is None))

    @property
    def applied(self) -> int:
        """Highest batch seq applied in order in the current master incarnation (0: none)."""
        return 0 if self._next is None else self._next - 1

    def seed(self, states: dict[int, ConnState]) -> None:
        """Hold ``states`` as if a master had synced them: a master that stepped down parks its
        own mirror here. The next master's RESET replaces them (it has the connections); until
        then ``seeded`` is True and ``discard_seed`` drops them."""
        self._conns = {cid: ConnMirror.from_state(cs) for cid, cs in states.items()}
        self.seeded = bool(states)
        self._new.clear()  # the caller knows when these were taken

    def discard_seed(self) -> int:
        """Drop parked connections that no master synced since (another node may have served
        them: restoring them would rewind the peer). Returns how many were dropped."""
        if not self.seeded:
            return 0
        n = len(self._conns)
        self._conns.clear()
        self.seeded = False
        return n

    @property
    def open_connections(self) -> int:
        """How many connections the backup holds (O(1), unlike ``connections()``)."""
        return len(self._conns)

    def connections(self) -> dict[int, ConnState]:
        return {k: c.snapshot() for k, c in self._conns.items()}

    def take_new_fulls(self) -> list[tuple[int, FullRecord]]:
        """(conn id, FULL) of every FULL applied since the last call (O(new), unlike
        ``connections()``, which copies every queue)."""
        new, self._new = self._new, []
        return new
