"""Hot standby on the same host: the master streams its journal and passes every peer socket
(SCM_RIGHTS) over a unix socket; the standby applies the records as they come and, when the
master's end closes (it died or stopped), continues every session on the same sockets.

Frames: ``length (u32) | type (1) | payload``. ``R`` + journal record; ``F`` + peer index (u16)
+ active (u8) with the socket's fd attached. A standby that joins late gets the whole history
first, then the live stream (one journal from the first start: sizes in docs/bgp.md).

On takeover the kernel tells the truth about the last instant: TCP_INFO ``bytes_received`` minus
SIOCINQ is what the master read (bytes journaled but never consumed are read and dropped here);
``bytes_acked`` (minus our SYN when we connected) plus SIOCOUTQ is what the master wrote (the
standby does not write it again). The counts are read as of one instant
(``app.channel.kernel_positions``): a segment landing between the separate reads made the
standby drop a whole unjournaled UPDATE, and the next takeover reset the session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

from nonstop.app.channel import kernel_positions
from nonstop.bgp.config import SpeakerConfig
from nonstop.bgp.fsm import DisconnectRequested, State
from nonstop.bgp.journal import CONNECTED, LOST, Journal, SessionResumed, Standby, decode_record
from nonstop.common import RemoteProtocolError

if TYPE_CHECKING:
    from nonstop.bgp.aio import SpeakerService

log = logging.getLogger("nonstop.bgp.replica")


def _frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack("!I", len(payload) + 1) + kind + payload


class ReplicaServer:
    """The master's side: every journal record to every standby, and each new peer socket."""

    def __init__(self, svc: SpeakerService, path: str, journal: Journal) -> None:
        self.svc = svc
        self.path = path
        self.journal = journal
        self.clients: list[socket.socket] = []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.setblocking(False)
        svc.loop.add_reader(self.sock.fileno(), self._accept)
        journal.sink = self.record

    def _accept(self) -> None:
        try:
            c, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        c.setblocking(True)
        try:
            for rec in self.journal.records:
                c.sendall(_frame(b"R", rec))
            for name, conn in self.svc.conns.items():
                self._fd(c, self.svc.speaker.peers[name].index, conn.sock, conn.active)
        except OSError:
            c.close()
            return
        self.clients.append(c)
        log.info("standby joined (%d records)", len(self.journal.records))

    @staticmethod
    def _fd(c: socket.socket, idx: int, sock: socket.socket, active: bool) -> None:
        socket.send_fds(c, [_frame(b"F", struct.pack("!HB", idx, active))], [sock.fileno()])

    def record(self, rec: bytes) -> None:
        for c in list(self.clients):
            try:
                c.sendall(_frame(b"R", rec))
            except OSError:
                self.clients.remove(c)
                c.close()

    def send_fd(self, idx: int, sock: socket.socket, active: bool) -> None:
        for c in list(self.clients):
            try:
                self._fd(c, idx, sock, active)
            except OSError:
                self.clients.remove(c)
                c.close()

    def close(self) -> None:
        self.svc.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for c in self.clients:
            c.close()
        self.clients.clear()


class StandbyFollower:
    """The standby's side: follow a master until its end closes, then take over."""

    def __init__(self, cfg: SpeakerConfig, path: str) -> None:
        self.cfg = cfg
        self.path = path
        self.standby = Standby(cfg)
        self.history: list[bytes] = []
        self.socks: dict[str, tuple[socket.socket, bool]] = {}
        self.resets = 0

    def follow(self, *, connect_timeout: float = 30.0, chunk: int = 1 << 20) -> None:
        """Blocks until the master goes away. ``chunk``: the most read at once."""
        deadline = time.monotonic() + connect_timeout
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                c.connect(self.path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        buf = bytearray()
        names = [p.name for p in self.standby.speaker.by_index]
        # a descriptor comes with the first byte of its frame read: one recv may end inside an
        # F frame, so descriptors wait here for the rest of their frame
        fds: list[int] = []
        with c:
            while True:
                data, got, _, _ = socket.recv_fds(c, chunk, 16)
                fds += got
                if not data:
                    for fd in fds:
                        os.close(fd)
                    return
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack_from("!I", buf)[0]
                    if len(buf) < 4 + n:
                        break
                    kind, payload = bytes(buf[4:5]), bytes(buf[5 : 4 + n])
                    del buf[: 4 + n]
                    if kind == b"R":
                        self._record(payload, names)
                    elif kind == b"F":
                        idx, active = struct.unpack("!HB", payload)
                        if not fds:
                            raise RemoteProtocolError("F frame without a descriptor")
                        self._drop(names[idx])
                        self.socks[names[idx]] = (socket.socket(fileno=fds.pop(0)), bool(active))

    def _record(self, rec: bytes, names: list[str]) -> None:
        self.history.append(rec)
        kind, idx, _, _ = decode_record(rec)
        if kind in (CONNECTED, LOST) and idx != 0xFFFF:
            self._drop(names[idx])  # a new connection's fd follows; a lost one is gone
        for pe in self.standby.apply(rec):
            if isinstance(pe.event, DisconnectRequested):
                self._drop(pe.peer)

    def _drop(self, name: str) -> None:
        old = self.socks.pop(name, None)
        if old is not None:
            old[0].close()

    def take_over(self, now: float) -> list[SessionResumed]:
        """Reconcile each Established session with its socket and resume."""
        sp = self.standby.speaker
        written: dict[str, int] = {}
        for name, (sock, active) in list(self.socks.items()):
            s = sp.peers[name].session
            if s.state != State.ESTABLISHED:
                self._lose(name, now, "not established at takeover")
                continue
            read_total, write_total = kernel_positions(sock)
            extra = s.rx_fed - read_total
            if extra < 0:  # the master read bytes it never journaled: the stream is broken
                self.resets += 1
                self._lose(name, now, f"{-extra} bytes read by the master were not journaled "
                           f"(the kernel says {read_total} read, the journal {s.rx_fed})")
                continue
            sock.setblocking(True)
            while extra > 0:  # journaled, never consumed: still in the kernel, drop them
                extra -= len(sock.recv(extra))
            written[name] = write_total - (1 if active else 0)  # our SYN counts as acked
        return self.standby.resume(now, written)

    def _lose(self, name: str, now: float, why: str) -> None:
        log.warning("%s: %s", name, why)
        sock, _ = self.socks.pop(name)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        self.standby.speaker.connection_lost(name, now)
