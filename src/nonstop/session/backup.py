"""The session manager's backup side: BackupSession and the RestoredConn it hands over.

``BackupSession`` feeds a :class:`SyncReceiver` from UDP (the master's side is
nonstop.session.manager.MasterSession). ``promote()`` restores every connection with
``repair.restore_many`` (call it before the VIP is added) from the last COMMIT: the receive
queue holds the peer's bytes after the committed read position, the send queue every byte the
old master's kernel sent that the peer has not acknowledged, also those written after the last
commit (``RestoredConn.sent_pos``; the agent hands it to the service as the adoption's ``sent``,
exactly as after a local restart): a service that replays its output from its commit skips
them. The send-side hold makes that whole: the clamp keeps each outgoing data segment in the
queue until the backup confirmed its bytes (``MasterSession._hold``), so the peer never holds a
byte the restored send queue does not reach (its ACK would be beyond the restored snd_nxt and
dropped: the connection stalled for good when that raced the service's replay).

A connection the service had closed (its FIN synced, not yet acknowledged by the peer) is
restored only to finish: the bytes the peer lacks and a FIN go out, and the kernel keeps the
orphan until the peer acknowledges them. A connection whose peer half-closed is restored without
the peer's FIN, which ``RestoredConn.peer_fin`` gives: ``kick.deliver_fins`` hands it to the
restored socket once the VIP is here (a raw segment from the peer's address; TCP_REPAIR restores
only ESTABLISHED), and the service reads EOF after the bytes before it.

TCP timestamps: the restored clock is the SYN-ACK's TSval advanced by the time since the backup
first saw the FULL record, plus ``ts_margin`` (a TSval ahead of the real clock is harmless to the
peer's PAWS check; one behind it gets our segments dropped).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from nonstop.common import readable, reserve_fds
from nonstop.session.manager import big_buffers
from nonstop.session.mirror import ConnState, seq_diff, seq_lt
from nonstop.session.nfq import FourTuple
from nonstop.session.repair import RepairError, TcpState, close_silently, restore, restore_many
from nonstop.session.sync import SyncReceiver
from nonstop.session.wire import FullRecord

__all__ = ["BackupSession", "RestoredConn"]

_U32 = 0xFFFF_FFFF
_SCAN = 0.005  # the backup looks for new connections at most this often (s)


@dataclass(slots=True)
class RestoredConn:
    """One connection restored on promotion: ``sock`` reads on from ``read_pos`` (bytes since
    the connection opened, as last committed); the service's last commit wrote up to
    ``write_pos``; the restored stream already holds up to ``sent_pos`` (>= write_pos when the
    old master wrote past its commit): a service that replays from its commit skips
    ``sent_pos - write_pos`` bytes."""

    conn_id: int
    sock: socket.socket
    read_pos: int
    write_pos: int
    state: bytes
    resent: int  # written bytes the peer had not acknowledged, put back in the send queue
    pending: int  # peer bytes after the committed read position, put back in the recv queue
    conn: ConnState  # what the backup held (MasterSession.adopt tracks the connection from it)
    tcp: TcpState  # what was restored
    four_tuple: FourTuple = ("", 0, "", 0)
    extra: dict[str, int] = field(default_factory=dict)
    sent_pos: int = 0
    peer_fin: int | None = None  # the peer half-closed: its FIN's sequence number (the restored
    # socket has not taken it yet: kick.deliver_fins hands it over once the VIP is here)


class BackupSession:
    """Receive the master's sync on ``bind`` (UDP); ``promote()`` restores the connections."""

    def __init__(
        self,
        key: bytes,
        *,
        bind: tuple[str, int],
        family: int = 4,  # the sync socket's (each connection's own comes in its FULL record)
        incarnation: int | None = None,
        ts_margin: float = 0.05,
        md5: Mapping[str, bytes] | None = None,
    ) -> None:
        self.phases_ms: dict[str, float] = {}  # of the last promote(): where its time went
        inc = incarnation if incarnation is not None else time.time_ns() // 1000
        # peer address (as the sync records write it) -> TCP-MD5 key, set on a restored socket
        self.md5 = {str(ipaddress.ip_address(a)): k for a, k in (md5 or {}).items()}
        self.receiver = SyncReceiver(key, now=time.monotonic(), incarnation=inc)
        self.ts_margin = ts_margin
        self.restore_failures: list[str] = []  # connections promote() could not bring back
        self.closing = 0  # of the last promote(): restored only to finish a close (_finish)
        self._udp = socket.socket(
            socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM
        )
        big_buffers(self._udp, 8 << 20)  # a burst of batches must wait, not be dropped
        self._udp.bind(bind)
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[FullRecord, float]] = {}  # conn id -> (FULL, first seen)
        self._scanned = time.monotonic()  # the last _scan (or the start)
        self._fd_room = 0  # connections the fd table has room for (reserve_fds)
        self._dirty = False  # batches applied since the last _scan
        self._stop = threading.Event()
        # the receive thread sleeps in select() on the UDP socket and this pair: one byte on
        # _wake_w wakes it at once when promote() or close() stops it
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="nonstop-sync-rx", daemon=True)

    def open(self) -> BackupSession:
        self._thread.start()
        return self

    def close(self) -> None:
        self._halt()
        self._udp.close()
        self._wake_r.close()
        self._wake_w.close()

    def _halt(self) -> None:
        """Stop the receive thread and wait for it (prompt: it is woken, not polled)."""
        if not self._stop.is_set():
            self._stop.set()
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")
        if self._thread.ident is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> BackupSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        return self._udp.getsockname()[:2]

    def _loop(self) -> None:
        while not self._stop.is_set():
            ready = readable([self._udp, self._wake_r])
            if self._udp not in ready:
                continue  # woken: the loop condition sees the stop
            try:
                data, src = self._udp.recvfrom(65536)
            except OSError:
                continue
            now = time.monotonic()
            with self._lock:
                acks = self.receiver.receive(data, now)
                if acks:
                    self._dirty = True
                if self._dirty and now - self._scanned >= _SCAN:
                    self._scan(now)
            for a in acks:
                with contextlib.suppress(OSError):
                    self._udp.sendto(a, src)
            if (held := self.receiver.open_connections) > self._fd_room:
                # the restore's sockets find the fd table grown already (common.reserve_fds)
                self._fd_room = max(held, (reserve_fds(2 * held + 256) - 256) // 2)

    def _scan(self, now: float) -> None:
        """Note the FULL records applied since the last scan (at most every _SCAN): each arrived
        after the previous scan, and that earlier time is kept (the restored TSval runs ahead,
        never behind)."""
        for cid, full in self.receiver.take_new_fulls():
            seen = self._seen.get(cid)
            if seen is None or seen[0] is not full:
                self._seen[cid] = (full, self._scanned)
        self._scanned, self._dirty = now, False

    def connections(self) -> dict[int, ConnState]:
        with self._lock:
            return self.receiver.connections()

    def seed(self, parked: list[tuple[ConnState, float]]) -> None:
        """Hold this node's own connections after it stepped down (MasterSession.parked): a
        promotion restores them unless ``discard_seed`` ran or a master's sync replaced them."""
        with self._lock:
            self.receiver.seed({cs.full.conn_id: cs for cs, _ in parked})
            self._seen = {cs.full.conn_id: (cs.full, at) for cs, at in parked}
            self._dirty = False

    @property
    def seeded(self) -> bool:
        return self.receiver.seeded

    def discard_seed(self) -> int:
        with self._lock:
            n = self.receiver.discard_seed()
            if n:
                self._seen.clear()
            return n

    def states(self) -> list[tuple[ConnState, TcpState]]:
        """What ``promote`` would restore: each connection's sync state and its TcpState."""
        with self._lock:
            if self._dirty:
                self._scan(time.monotonic())
            conns = self.receiver.connections()
            seen = dict(self._seen)
        out = []
        for cid, cs in conns.items():
            first = seen.get(cid)
            out.append((cs, self._tcp_state(cs, first[1] if first else time.monotonic())))
        return out

    def _tcp_state(self, cs: ConnState, seen_at: float) -> TcpState:
        f = cs.full
        # every byte the old master's kernel took that the peer has not acknowledged, also those
        # written after the last commit: the peer may hold some of them already, and an ACK
        # beyond snd_nxt is discarded, so the restored stream must reach them in its first
        # flight (they used to be dropped and left to the service to write again: the peer's
        # ACK raced that and the connection stalled for good). The service hears where the
        # stream is (RestoredConn.sent_pos, the adoption's ``sent``) and skips what it replays.
        send_q, snd_seq = cs.snd_data, cs.snd_end
        rcv_seq = cs.rcv_end  # the peer's FIN not counted: the restored socket takes it later
        # the service closed it: what the peer has not acknowledged goes out, then a FIN (the
        # input after the last commit is not put back: closing a socket with unread bytes resets)
        recv_q = b"" if cs.snd_fin is not None else cs.rcv_data
        snd_wnd = cs.snd_wnd or f.snd_wnd
        rcv_wnd = cs.rcv_wnd or f.rcv_wnd
        window = (rcv_seq, snd_wnd, max(snd_wnd, f.max_window), rcv_wnd, rcv_seq)
        return TcpState(
            socket.AF_INET if f.family == 4 else socket.AF_INET6, f.local_addr, f.local_port,
            f.peer_addr, f.peer_port, snd_seq, rcv_seq, f.mss, f.snd_wscale, f.rcv_wscale,
            f.sack, f.timestamps, (f.ts_val & ~1) & _U32 if f.timestamps else None, window,
            bytes(send_q), bytes(recv_q), 0, seen_at - self.ts_margin,
        )  # fmt: skip

    def promote(self) -> list[RestoredConn]:
        """Stop receiving and restore every connection (before the VIP is added; the segments
        the restored sockets send at once must find the new master's queue bound)."""
        t0 = time.monotonic()
        self._halt()
        pairs = self.states()
        t1 = time.monotonic()
        try:
            socks: list[socket.socket | None] = list(
                restore_many([st for _, st in pairs], md5=self.md5))
        except RepairError:  # one by one: a connection that cannot come back costs only itself
            socks = []
            for _, st in pairs:
                try:
                    socks.append(restore(st, md5=self.md5))
                except RepairError as e:
                    self.restore_failures.append(f"{st.dst}:{st.dport}: {e}")
                    socks.append(None)
        t_rm = time.monotonic()
        out = []
        self.closing = 0
        for (cs, st), sock in zip(pairs, socks, strict=True):
            if sock is None:
                continue
            if cs.snd_fin is not None:
                self._finish(sock)
                continue
            f = cs.full
            commit = cs.commit
            rpos, wpos = (commit.rpos, commit.wpos) if commit else (f.rcv_seq, f.snd_seq)
            if seq_lt(st.snd_seq, wpos):  # never seen: a commit is synced after its bytes
                self.restore_failures.append(
                    f"{st.dst}:{st.dport}: the commit wrote up to {wpos}, the copy ends at "
                    f"{st.snd_seq}: not handed to the service")
                close_silently(sock)  # no FIN, no RST: the peer just waits
                continue
            out.append(RestoredConn(
                f.conn_id, sock, seq_diff(rpos, f.rcv_seq) % (1 << 32),
                seq_diff(wpos, f.snd_seq) % (1 << 32), commit.state if commit else b"",
                len(st.send_queue), len(st.recv_queue), cs, st,
                (f.local_addr, f.local_port, f.peer_addr, f.peer_port),
                sent_pos=seq_diff(st.snd_seq, f.snd_seq) % (1 << 32),
                peer_fin=cs.rcv_fin))  # fmt: skip
        self.phases_ms = {"states": round((t1 - t0) * 1000, 3),  # the sync copies -> TcpStates
                          "restore": round((t_rm - t1) * 1000, 3),  # TCP_REPAIR
                          "conns": round((time.monotonic() - t_rm) * 1000, 3)}
        return out

    def _finish(self, sock: socket.socket) -> None:
        """A connection the service had closed: restored only to deliver what the peer lacks,
        then closed as the service did (the kernel sends the rest and a FIN, then keeps the
        orphan until the peer acknowledges them). Never handed to the service."""
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.restore_failures.append(f"closing a connection its service had closed: {e}")
        sock.close()
        self.closing += 1
