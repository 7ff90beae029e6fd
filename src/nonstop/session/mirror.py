"""What both ends of the session sync hold per connection, and the one code that changes it.

The master's SyncSender keeps a mirror of what the backup must hold; the backup's SyncReceiver
holds the copy itself. Both are ``ConnMirror`` objects changed only by ``apply_record``, in batch
order, so after delivery both hold the same state (nonstop.session.sync). ``ConnState`` is a
frozen snapshot of one: everything to restore the connection.

Stream positions are TCP sequence numbers, compared mod 2**32 (``seq_diff``). Received bytes are
trimmed at the service's committed read position, sent bytes at the peer's snd_una: both sides
hold exactly what a restore needs.

A FIN record marks where a stream ends (``rcv_fin``: the peer half-closed; ``snd_fin``: the
service closed). It is applied only at the stream's end (the bytes before it are held), and
``ends()`` counts it as the one sequence number it takes: the master may acknowledge the peer's
FIN, or let its own leave, once the backup's confirmed ends reach past it.
"""

from __future__ import annotations

import msgspec

from nonstop.session.wire import Commit, Data, Direction, Fin, FullRecord, Record, Update

__all__ = ["SEQ_MOD", "ConnMirror", "ConnState", "apply_record", "seq_add", "seq_diff", "seq_lt"]

SEQ_MOD = 1 << 32


def seq_add(a: int, n: int) -> int:
    return (a + n) % SEQ_MOD


def seq_diff(a: int, b: int) -> int:
    """``a - b`` as a signed distance mod 2**32, in [-2**31, 2**31)."""
    return (a - b + (1 << 31)) % SEQ_MOD - (1 << 31)


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


class ConnState(msgspec.Struct, frozen=True, gc=False):
    """Everything to restore one connection, as the backup holds it.

    ``rcv_data`` starts at ``rcv_start`` (the committed read position, or FULL's rcv_seq): bytes
    received from the peer that the service has not committed, in order, no gap, no duplicate.
    ``snd_data`` starts at ``snd_start`` (the peer's snd_una): bytes the service wrote that the
    peer has not acknowledged. ``commit`` is the service's last checkpoint, if any.
    """

    full: FullRecord
    rcv_start: int
    rcv_data: bytes
    snd_start: int
    snd_data: bytes
    rcv_nxt: int
    snd_una: int
    snd_nxt: int
    snd_wnd: int
    rcv_wnd: int
    commit: Commit | None
    rcv_fin: int | None = None
    snd_fin: int | None = None

    @property
    def rcv_end(self) -> int:
        return seq_add(self.rcv_start, len(self.rcv_data))

    @property
    def snd_end(self) -> int:
        return seq_add(self.snd_start, len(self.snd_data))


class ConnMirror:
    """One connection's live copy: the sender's mirror or the receiver's state."""

    __slots__ = ("commit", "full", "rcv_data", "rcv_fin", "rcv_nxt", "rcv_start", "rcv_wnd",
                 "snd_data", "snd_fin", "snd_nxt", "snd_start", "snd_una", "snd_wnd")

    def __init__(self, full: FullRecord) -> None:
        self.full = full
        self.rcv_start = self.rcv_nxt = full.rcv_seq
        self.snd_start = self.snd_una = self.snd_nxt = full.snd_seq
        self.rcv_data = bytearray()
        self.snd_data = bytearray()
        self.snd_wnd, self.rcv_wnd = full.snd_wnd, full.rcv_wnd
        self.commit: Commit | None = None
        self.rcv_fin: int | None = None
        self.snd_fin: int | None = None

    @classmethod
    def from_state(cls, cs: ConnState) -> ConnMirror:
        c = cls(cs.full)
        c.rcv_start, c.rcv_data = cs.rcv_start, bytearray(cs.rcv_data)
        c.snd_start, c.snd_data = cs.snd_start, bytearray(cs.snd_data)
        c.rcv_nxt, c.snd_una, c.snd_nxt = cs.rcv_nxt, cs.snd_una, cs.snd_nxt
        c.snd_wnd, c.rcv_wnd, c.commit = cs.snd_wnd, cs.rcv_wnd, cs.commit
        c.rcv_fin, c.snd_fin = cs.rcv_fin, cs.snd_fin
        return c

    def end(self, d: Direction) -> int:
        if d is Direction.RCV:
            return seq_add(self.rcv_start, len(self.rcv_data))
        return seq_add(self.snd_start, len(self.snd_data))

    def ends(self) -> tuple[int, int]:
        """Both streams' ends, each counting its FIN (the sequence number it takes) if the FIN
        sits at the end: what the backup holds once these records are confirmed."""
        rcv, snd = self.end(Direction.RCV), self.end(Direction.SND)
        if self.rcv_fin == rcv:
            rcv = seq_add(rcv, 1)
        if self.snd_fin == snd:
            snd = seq_add(snd, 1)
        return rcv, snd

    def fin(self, d: Direction) -> int | None:
        return self.rcv_fin if d is Direction.RCV else self.snd_fin

    def trim(self, d: Direction, pos: int) -> None:
        buf, start = (self.rcv_data, self.rcv_start) if d is Direction.RCV else (
            self.snd_data, self.snd_start)
        n = seq_diff(pos, start)
        if n <= 0:
            return
        del buf[:n]  # all of it if pos is past the end: the start moves to pos
        if d is Direction.RCV:
            self.rcv_start = pos
        else:
            self.snd_start = pos

    def append(self, d: Direction, seq: int, payload: bytes) -> bool:
        """Add stream bytes at ``seq``; drop what is already held. False if it leaves a gap, or
        runs past the stream's FIN."""
        buf = self.rcv_data if d is Direction.RCV else self.snd_data
        off = seq_diff(seq, self.end(d))
        if off > 0:
            return False
        if -off < len(payload):
            if self.fin(d) is not None:
                return False
            buf += payload[-off:]
        return True

    def set_fin(self, d: Direction, seq: int) -> bool:
        """The stream in ``d`` ends at ``seq``. False unless ``seq`` is its end (or its FIN is
        there already)."""
        if self.fin(d) is not None:
            return self.fin(d) == seq
        if seq != self.end(d):
            return False
        if d is Direction.RCV:
            self.rcv_fin = seq
        else:
            self.snd_fin = seq
        return True

    def snapshot(self) -> ConnState:
        return ConnState(self.full, self.rcv_start, bytes(self.rcv_data), self.snd_start,
                         bytes(self.snd_data), self.rcv_nxt, self.snd_una, self.snd_nxt,
                         self.snd_wnd, self.rcv_wnd, self.commit, self.rcv_fin, self.snd_fin)


def apply_record(conns: dict[int, ConnMirror], rec: Record) -> str | None:
    """Apply one record. Returns the name of a drop counter if it could not be applied."""
    if isinstance(rec, FullRecord):
        conns[rec.conn_id] = ConnMirror(rec)
        return None
    c = conns.get(rec.conn_id)
    if c is None:
        return "unknown_conn"
    if isinstance(rec, Data):
        return None if c.append(rec.direction, rec.seq, rec.payload) else "data_gap"
    if isinstance(rec, Fin):
        return None if c.set_fin(rec.direction, rec.seq) else "data_gap"
    if isinstance(rec, Update):
        c.rcv_nxt, c.snd_una, c.snd_nxt = rec.rcv_nxt, rec.snd_una, rec.snd_nxt
        c.snd_wnd, c.rcv_wnd = rec.snd_wnd, rec.rcv_wnd
        c.trim(Direction.SND, rec.snd_una)
    elif isinstance(rec, Commit):
        c.commit = rec
        c.trim(Direction.RCV, rec.rpos)
    else:
        del conns[rec.conn_id]
    return None
