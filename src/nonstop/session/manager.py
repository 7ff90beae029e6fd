"""The session manager, standalone, on the master: MasterSession (the backup's side, BackupSession
and RestoredConn, is in nonstop.session.backup).

``MasterSession`` sits on the master's packet path for VIP:port (an :class:`AckClamp` with inbound
capture and ``capture_out`` on the outbound segments the clamp already queues) and feeds a
:class:`SyncSender`:

- FULL when the SYN-ACK leaves: the peer's options from its SYN (MSS, wscale, SACK, timestamps,
  IRS), ours from the SYN-ACK (ISS, wscale, TSval);
- DATA(RCV) from every inbound payload (the sender drops what it already holds), DATA(SND) from
  every outbound payload;
- UPDATE when the peer's ACK or window moves (snd_una trims DATA(SND) on the backup);
- COMMIT from the service (``commit(four_tuple, read_pos, write_pos)``, byte counts since the
  connection opened), held back until DATA(SND) up to ``write_pos`` is queued, so the backup
  never holds a commit whose written bytes it lacks.

- FIN(RCV) when the peer's FIN comes, FIN(SND) when ours leaves (each at its stream's end: the
  sender holds one that comes past a gap). The peer's FIN counts in the backup's confirmed end
  like a byte, so the clamp acknowledges it once the backup has it (it used to hold that ACK at
  the last byte for good: a peer that half-closed stayed in FIN_WAIT1, resending its FIN). Ours
  is held in the queue like a data segment until the backup has it.
- CLOSE(CLOSED) when the peer acknowledges our FIN: the service closed and the peer holds all it
  wrote, so a takeover has nothing left to deliver; the connection is forgotten on both nodes.
  (What is left, the peer's own FIN, this node's kernel acknowledges; after a takeover the new
  master, which has no socket for it, answers it with an RST, which the peer's application,
  having read our FIN, does not see.) CLOSE(RESET) on an RST either way.

The clamp's limit is ``SyncSender.confirmed(conn)[0]`` (the backup holds the peer's bytes up to
there), and never below the highest ACK that already left this node (an older ACK tells the peer
nothing, and what left cannot be taken back); None for segments of unknown connections. Without
a backup (``set_backup(None)``: the peer is gone) nothing is sent and nothing is clamped: no
surviving node but this one could deliver the bytes, and holding ACKs would only stall the peer.
When a backup appears (``set_backup(addr)``) the clamp engages at once and the sender resyncs
the backup from its mirror (every FULL with a fresh TSval, the commit, the uncommitted input,
the unacknowledged output): until the backup confirms a connection's copy, its ACKs stay where
they were. (The clamp used to engage only once the whole resync was acknowledged: the bytes
acknowledged meanwhile came after the resync in the stream, and a master killed right after
``protecting`` turned true had told the peer about bytes its backup never got.) Batches go
to the backup over UDP at once (``max_delay`` 0: one batch per segment seen) from the verdict
thread; a second thread reads the backup's ACKs and retransmits.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nonstop.common import LocalProtocolError, normal_priority, readable
from nonstop.session.kick import FinTarget, KickTarget
from nonstop.session.mirror import ConnState, seq_add, seq_diff, seq_lt
from nonstop.session.nfnl import SO_RCVBUFFORCE, SO_SNDBUFFORCE
from nonstop.session.nfq import AckClamp, FourTuple
from nonstop.session.repair import ts_later
from nonstop.session.segment import ACK, FIN, RST, SYN, Segment
from nonstop.session.sync import SyncSender
from nonstop.session.wire import CloseReason, Commit, Direction, FullRecord

if TYPE_CHECKING:
    from nonstop.session.backup import RestoredConn

__all__ = ["MasterSession", "big_buffers"]

_U32 = 0xFFFF_FFFF
_POLL = 0.002  # the sync thread's longest sleep (s)
_TCP_TIMESTAMP = 24


def big_buffers(sock: socket.socket, size: int) -> None:
    """Socket buffers of ``size`` bytes each way, past the sysctl limits when allowed (root):
    a sync datagram dropped for room costs a retransmission timeout."""
    for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)


def _same_endpoint(src: tuple, backup: tuple[str, int] | None) -> bool:
    """Whether a datagram from ``src`` (as recvfrom gives it) comes from ``backup``. The backup
    answers from the socket the sync is sent to, so its address and port match exactly."""
    if backup is None or src[1] != backup[1]:
        return False
    if src[0] == backup[0]:  # the usual case, without parsing an address per ACK
        return True
    try:
        return ipaddress.ip_address(src[0].partition("%")[0]) == ipaddress.ip_address(
            backup[0].partition("%")[0])
    except ValueError:
        return bool(src[0] == backup[0])


def _get_u32(sock: socket.socket, opt: int) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, opt, 4)
    return int(struct.unpack("I", raw)[0])


@dataclass(slots=True)
class _Tracked:
    """What the master knows of one connection beyond the sender's mirror."""

    conn_id: int
    full: FullRecord
    snd_nxt: int
    snd_una: int
    snd_wnd: int
    rcv_wnd: int
    ts_at: float  # when full.ts_val was the connection's TCP timestamp (time.monotonic())
    peer_fin: int | None = None  # the sequence number of the peer's FIN, once seen
    our_fin: int | None = None  # of ours (the service closed)
    pending_commit: tuple[int, int, bytes] | None = None  # (rpos, wpos, state) as sequence numbers
    acked_out: int | None = None  # the highest ACK that left this node (None: none yet)


@dataclass(slots=True)
class _Syn:
    irs: int
    options: object  # TcpOptions of the peer's SYN
    window: int


class MasterSession:
    """Sync VIP:port's connections to the backup at ``backup`` (host, UDP port)."""

    def __init__(
        self,
        vip: str,
        port: int,
        key: bytes,
        *,
        backup: tuple[str, int] | None,
        queue_num: int = 5,
        family: int = 4,
        sync_family: int | None = None,  # the sync socket's (None: ``family``, the VIP's)
        incarnation: int | None = None,
        sync_bind: tuple[str, int] = ("", 0),
        rto: float = 0.02,  # the floor and first timeout; adaptive after (a resync to a backup
        # that is still binding its socket waits one timeout per lost RESET)
        max_delay: float = 0.001,
        md5: Mapping[str, bytes] | None = None,
        standing_rules: bool = False,  # the queue's rules are the caller's (session.quiet)
    ) -> None:
        self.vip, self.port, self.family, self.backup = vip, port, family, backup
        self.adopted = 0  # connections taken over from a previous master (adopt())
        self.finished = 0  # connections forgotten after the service closed them (our FIN acked)
        self.resets = 0  # connections forgotten after an RST either way
        now = time.monotonic()
        inc = incarnation if incarnation is not None else time.time_ns() // 1000
        self.sender = SyncSender(key, incarnation=inc, max_delay=max_delay, now=now, rto=rto)
        if backup is None:
            self.sender.pause()  # adopt_many and the first segments feed only the mirror
        self._lock = threading.Lock()
        self._conns: dict[FourTuple, _Tracked] = {}
        self._syns: dict[FourTuple, _Syn] = {}
        self._ids = itertools.count(1)
        sync_family = family if sync_family is None else sync_family
        fam = socket.AF_INET if sync_family == 4 else socket.AF_INET6
        self._udp = socket.socket(fam, socket.SOCK_DGRAM)
        big_buffers(self._udp, 1 << 20)
        self._udp.bind(sync_bind)
        self._clamp = AckClamp(
            queue_num,
            vip=vip,
            port=port,
            family=family,
            limit=self._limit,
            capture=self._inbound,
            capture_out=self._outbound,
            hold=self._hold,
            hold_acks=True,  # a pure ACK past the backup waits for it, not lowered (AckClamp)
            md5=md5,  # TCP-MD5 keys per peer: clamped segments are signed again
            own_rules=not standing_rules,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tx_bytes = 0  # sync datagram bytes handed to the socket (retransmissions included)

    # -- lifecycle --
    def open(self) -> MasterSession:
        self._thread = threading.Thread(target=self._ack_loop, name="nonstop-sync-tx", daemon=True)
        self._thread.start()
        self._clamp.open()
        return self

    def close(self) -> None:
        self._stop.set()
        try:
            self._clamp.close()
        finally:
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._udp.close()

    def __enter__(self) -> MasterSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def clamp(self) -> AckClamp:
        return self._clamp

    # -- the backup --
    def set_backup(self, backup: tuple[str, int] | None) -> None:
        """Sync to ``backup`` (host, UDP port) from now on, starting with a whole copy; None: no
        backup (stop sending, stop clamping)."""
        now = time.monotonic()
        with self._lock:
            if backup == self.backup:
                return
            self.backup = backup
            if backup is None:
                self.sender.pause()
                self._clamp.kick()  # nothing is held with no backup
                return
            for t in self._conns.values():  # a resynced FULL carries the TSval of now
                if t.full.timestamps:
                    t.full = t.full.with_ts(ts_later(t.full.ts_val, now - t.ts_at))
                    t.ts_at = now
                    self.sender.refresh_full(t.conn_id, t.full)
            self.sender.resync(now, new_backup=True)
            self._flush(now)

    def kick_targets(self, socks: Iterable[tuple[FourTuple, socket.socket]]) -> list[KickTarget]:
        """What ``nonstop.session.kick`` needs to provoke both ends of these connections (those
        still tracked): their positions as this node last sent them, the bytes in flight, each
        socket's current TCP timestamp and the connection's TCP-MD5 key, if it is signed."""
        out = []
        with self._lock:
            for ft, sock in socks:
                t = self._conns.get(ft)
                if t is None:
                    continue
                key = self._clamp.md5.get(ft[2]) if self._clamp.md5 else None
                tsval = None
                if t.full.timestamps:
                    try:
                        tsval = _get_u32(sock, _TCP_TIMESTAMP)
                    except OSError:  # closed meanwhile
                        continue
                ack = t.acked_out if t.acked_out is not None else self._rcv_end(t)
                end, flight = self.sender.snd_flight(t.conn_id)
                out.append(KickTarget(self.family, (ft[0], ft[1]), (ft[2], ft[3]), end, flight,
                                      ack, t.rcv_wnd >> t.full.rcv_wscale, tsval, t.full.mss,
                                      key))  # fmt: skip
        return out

    def fin_targets(self, fts: Iterable[FourTuple]) -> list[FinTarget]:
        """What ``kick.deliver_fins`` needs to hand these connections (restored, still tracked)
        the FIN their peers sent the old master: its sequence number, the peer's last ACK and
        window, the TCP-MD5 key if the connection is signed."""
        out = []
        with self._lock:
            for ft in fts:
                t = self._conns.get(ft)
                if t is None or t.peer_fin is None:
                    continue
                key = self._clamp.md5.get(ft[2]) if self._clamp.md5 else None
                out.append(FinTarget(self.family, (ft[0], ft[1]), (ft[2], ft[3]), t.peer_fin,
                                     t.snd_una, t.snd_wnd >> t.full.snd_wscale, key))
        return out

    def parked(self) -> list[tuple[ConnState, float]]:
        """The mirror of every connection, as a backup would hold it, with the time its FULL's
        TSval was taken: what this node keeps when it steps down (BackupSession.seed)."""
        with self._lock:
            mirror = self.sender.connections()
            return [(mirror[t.conn_id], t.ts_at) for t in self._conns.values()
                    if t.conn_id in mirror]

    @property
    def tracked(self) -> int:
        """How many connections this node tracks (and syncs) now."""
        return len(self._conns)

    @property
    def protecting(self) -> bool:
        """A backup holds a whole, acknowledged copy: every connection is covered. (The clamp is
        engaged as soon as a backup is set; this says the resync is done.)"""
        with self._lock:  # the sync thread changes what ``resynced`` walks
            return self.backup is not None and self.sender.resynced

    def adopt(self, rc: RestoredConn) -> None:
        """Track a connection restored on this node (a takeover): the mirror starts at its last
        commit with the input after it and the output the peer has not acknowledged."""
        self.adopt_many([rc])

    def adopt_many(self, rcs: Iterable[RestoredConn]) -> None:
        """``adopt`` for every connection of a promotion, under one lock, with one flush. It may
        run before ``open()``: the restored sockets have no service yet and the VIP is not here,
        so nothing of theirs that the mirror must see can pass before the clamp is up."""
        now = time.monotonic()
        with self._lock:
            snd = self.sender
            for rc in rcs:
                cs, st = rc.conn, rc.tcp
                full = cs.full
                if full.timestamps:
                    full = full.with_ts(_get_u32(rc.sock, _TCP_TIMESTAMP))
                commit = cs.commit or Commit(full.conn_id, full.rcv_seq, full.snd_seq)
                snd_una = seq_add(st.snd_seq, -len(st.send_queue))
                rcv_end = st.rcv_seq
                rcv_start = seq_add(rcv_end, -len(st.recv_queue))
                ft = (full.local_addr, full.local_port, full.peer_addr, full.peer_port)
                snd_wnd, rcv_wnd = (cs.snd_wnd or full.snd_wnd) & _U32, (
                    cs.rcv_wnd or full.rcv_wnd) & _U32
                if ft in self._conns:
                    raise ValueError(f"connection {ft} is already tracked")
                snd.adopt(ConnState(  # refuses an id already open
                    full, rcv_start, st.recv_queue, snd_una, st.send_queue, rcv_end,
                    snd_una, st.snd_seq, snd_wnd, rcv_wnd, commit, cs.rcv_fin), now)
                self._conns[ft] = _Tracked(full.conn_id, full, st.snd_seq, snd_una, snd_wnd,
                                           rcv_wnd, now, acked_out=rcv_end)  # its probe acks it
                self._ids = itertools.count(max(next(self._ids), full.conn_id + 1))
                if cs.rcv_fin is not None:  # the peer half-closed (its FIN is delivered again
                    # to the restored socket once the VIP is here: kick.deliver_fins)
                    self._conns[ft].peer_fin = cs.rcv_fin
                self.adopted += 1
            self._flush(now)

    # -- the service's commits --
    def commit(
        self, four_tuple: FourTuple, read_pos: int, write_pos: int, state: bytes = b""
    ) -> None:
        """The service processed ``read_pos`` bytes of input and wrote ``write_pos`` bytes on the
        connection ``four_tuple`` = (VIP, port, peer, peer port), counted since it opened."""
        failed = self.commit_many([(four_tuple, (read_pos, write_pos, state))])
        if failed:
            raise failed[four_tuple]

    def commit_many(
        self, commits: Iterable[tuple[FourTuple, tuple[int, int, bytes]]]
    ) -> dict[FourTuple, Exception]:
        """``commit`` for many connections under one lock, with one flush: (four_tuple,
        (read_pos, write_pos, state)) each. Returns the four-tuples that were not committed
        (unknown connection) with why; the others are."""
        failed: dict[FourTuple, Exception] = {}
        with self._lock:
            now = time.monotonic()
            for ft, (read_pos, write_pos, state) in commits:
                t = self._conns.get(ft)
                if t is None:
                    failed[ft] = KeyError(f"no connection {ft}")
                    continue
                t.pending_commit = (
                    seq_add(t.full.rcv_seq, read_pos),
                    seq_add(t.full.snd_seq, write_pos),
                    bytes(state),
                )
                try:
                    self._try_commit(t, now)
                except (KeyError, LocalProtocolError) as e:
                    failed[ft] = e
            self._flush(now)
        return failed

    def _try_commit(self, t: _Tracked, now: float) -> None:
        if t.pending_commit is None:
            return
        rpos, wpos, state = t.pending_commit
        # written bytes the mirror does not hold yet: wait for them. The mirror's end, not the
        # highest segment end seen (snd_nxt): a segment past a gap (its predecessor dropped in a
        # queue overflow, sent again later) waits in the sender, and a commit synced ahead of it
        # left the backup a commit past its copy (10,000 connections: 433 not restored).
        if seq_lt(self.sender.stream_end(t.conn_id, Direction.SND), wpos):
            return
        t.pending_commit = None
        self.sender.commit(t.conn_id, rpos, wpos, state, now)

    # -- the packet path (verdict thread) --
    def _limit(self, ft: FourTuple) -> int | None:
        with self._lock:
            t = self._conns.get(ft)
            return None if t is None else self._limit_of(t)

    def _limit_of(self, t: _Tracked) -> int | None:
        """The highest ACK ``t`` may send now (call under the lock); None: any."""
        if self.backup is None:
            return None
        floor = t.full.rcv_seq if t.acked_out is None else t.acked_out
        conf = self.sender.confirmed(t.conn_id)
        return floor if conf is None or seq_lt(conf[0], floor) else conf[0]

    def _hold(self, ft: FourTuple) -> int | None:
        """How far ``ft``'s outgoing stream may reach the wire (the clamp holds data segments
        past it): what the backup confirmed; None: no hold (no backup, unknown connection)."""
        with self._lock:
            t = self._conns.get(ft)
            if t is None or self.backup is None:
                return None
            conf = self.sender.confirmed(t.conn_id)
            return t.snd_una if conf is None else conf[1]

    def _inbound(self, seg: Segment, payload: bytes) -> None:
        ft = (seg.dst, seg.dport, seg.src, seg.sport)
        now = time.monotonic()
        with self._lock:
            if seg.flags & SYN and not seg.flags & ACK:
                self._syns[ft] = _Syn(seg.seq, seg.options, seg.window)
                return
            t = self._conns.get(ft)
            if t is None:
                return
            if seg.flags & RST:
                self._close(ft, t, CloseReason.RESET, now)
                return
            if payload:
                self.sender.data(t.conn_id, Direction.RCV, seg.seq, payload, now)
            if seg.flags & FIN:  # synced like a byte: the clamp acknowledges it once confirmed
                fin = seq_add(seg.seq, len(payload))
                if self.sender.fin(t.conn_id, Direction.RCV, fin, now):
                    t.peer_fin = fin
            if seg.flags & ACK:
                wnd = seg.window << t.full.snd_wscale
                if (
                    not seq_lt(seg.ack, t.snd_una)
                    and seq_diff(seg.ack, t.snd_nxt) <= 0
                    and (seg.ack != t.snd_una or wnd != t.snd_wnd)
                ):
                    t.snd_una, t.snd_wnd = seg.ack, wnd
                    self.sender.update(
                        t.conn_id,
                        rcv_nxt=self._rcv_end(t),
                        snd_una=t.snd_una,
                        snd_nxt=t.snd_nxt,
                        snd_wnd=wnd & _U32,
                        rcv_wnd=t.rcv_wnd & _U32,
                        now=now,
                    )
                    if t.our_fin is not None and seg.ack == seq_add(t.our_fin, 1):
                        # the service closed and the peer has all of it, our FIN too: nothing
                        # is left that a takeover must deliver (module docstring)
                        self._close(ft, t, CloseReason.CLOSED, now)
            self._flush(now)

    def _outbound(self, seg: Segment, payload: bytes) -> None:
        ft = seg.four_tuple
        now = time.monotonic()
        with self._lock:
            if seg.flags & SYN:
                syn = self._syns.pop(ft, None)
                if syn is not None and ft not in self._conns:
                    self._open(ft, seg, syn, now)
                return
            t = self._conns.get(ft)
            if t is None:
                return
            if seg.flags & RST:
                self._close(ft, t, CloseReason.RESET, now)
                return
            t.rcv_wnd = seg.window << t.full.rcv_wscale
            if seg.flags & ACK:  # what the clamp lets out of this segment, right after this (a
                # pure ACK it holds leaves later with more: this stays a lower bound, enough for
                # the clamp's floor and the kick's probes)
                lim = self._limit_of(t)
                sent = seg.ack if lim is None or not seq_lt(lim, seg.ack) else lim
                if t.acked_out is None or seq_lt(t.acked_out, sent):
                    t.acked_out = sent
            if payload:
                self.sender.data(t.conn_id, Direction.SND, seg.seq, payload, now)
                end = seq_add(seg.seq, len(payload))
                if seq_lt(t.snd_nxt, end):
                    t.snd_nxt = end
                self._try_commit(t, now)
            if seg.flags & FIN:  # the service closed: held like a byte until the backup has it
                fin = seq_add(seg.seq, len(payload))
                if self.sender.fin(t.conn_id, Direction.SND, fin, now):
                    t.our_fin = fin
                    if seq_lt(t.snd_nxt, end := seq_add(fin, 1)):
                        t.snd_nxt = end
            self._flush(now)

    def _open(self, ft: FourTuple, synack: Segment, syn: _Syn, now: float) -> None:
        po, mo = syn.options, synack.options
        wscale = po.wscale is not None and mo.wscale is not None  # type: ignore[attr-defined]
        ts = po.timestamps is not None and mo.timestamps is not None  # type: ignore[attr-defined]
        full = FullRecord(
            conn_id=next(self._ids), family=self.family, local_addr=ft[0], local_port=ft[1],
            peer_addr=ft[2], peer_port=ft[3], snd_seq=seq_add(synack.seq, 1),
            rcv_seq=seq_add(syn.irs, 1), mss=po.mss or 536,  # type: ignore[attr-defined]
            snd_wscale=po.wscale if wscale else 0,  # type: ignore[attr-defined]
            rcv_wscale=mo.wscale if wscale else 0, wscale=wscale,
            sack=po.sack_permitted and mo.sack_permitted,  # type: ignore[attr-defined]
            timestamps=ts, ts_val=mo.timestamps[0] if ts else 0,
            snd_wl1=seq_add(syn.irs, 1), snd_wnd=syn.window, max_window=syn.window,
            rcv_wnd=synack.window, rcv_wup=seq_add(syn.irs, 1),
        )  # fmt: skip
        self._conns[ft] = _Tracked(
            full.conn_id, full, full.snd_seq, full.snd_seq, syn.window, synack.window, now
        )
        self.sender.open(full.conn_id, full, now)

    def _close(self, ft: FourTuple, t: _Tracked, reason: CloseReason, now: float) -> None:
        del self._conns[ft]
        if reason is CloseReason.CLOSED:
            self.finished += 1
        else:
            self.resets += 1
        self.sender.close(t.conn_id, reason, now)
        self._clamp.kick()  # its held segments go (a reset connection)

    def _rcv_end(self, t: _Tracked) -> int:
        return self.sender.stream_end(t.conn_id, Direction.RCV)

    def _flush(self, now: float) -> None:
        if self.backup is None:
            self.sender.pause()  # the mirror is kept for the next backup's resync
            return
        for d in self.sender.datagrams_to_send(now):
            with contextlib.suppress(OSError):  # lost: retransmitted after rto
                self._udp.sendto(d, self.backup)
                self.tx_bytes += len(d)

    # -- the backup's ACKs, retransmission --
    def _ack_loop(self) -> None:
        normal_priority()  # never real-time, whoever started this thread
        while not self._stop.is_set():
            with self._lock:
                timer = self.sender.get_timer()
            # the verdict thread queues records without waking this one: poll often enough that
            # a partial batch leaves within ~max_delay + _POLL
            wait = _POLL if timer is None else min(_POLL, max(0.0, timer - time.monotonic()))
            ready = readable([self._udp], wait)
            now = time.monotonic()
            if ready:
                try:
                    data, src = self._udp.recvfrom(2048)
                except OSError:
                    if self._stop.is_set():
                        return
                    continue
                with self._lock:
                    if not _same_endpoint(src, self.backup):
                        # the previous backup's late ACKs would read as newer than the new one's
                        self.sender.counters["foreign"] += 1
                        continue
                    self.sender.receive_ack(data, now)
                self._clamp.kick()  # the backup confirmed more: held segments may go
            with self._lock:
                self._flush(now)
