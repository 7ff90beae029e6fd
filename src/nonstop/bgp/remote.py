"""The journal over the network: a master speaker streams its journal to a hot standby on
another node, and holds its output until the standby has the records that produced it.

TCP, one connection per standby; every frame is ``length (u32) | body | tag`` where ``tag`` is
HMAC-SHA256-128 (nonstop.auth) over ``nonce | body`` with the cluster key and the nonce the
standby chose for this connection (so a frame from another connection does not verify):

    H  standby -> master   nonce (16 bytes): the first frame, in clear but for its own tag
    Q  master -> standby   nonce (16 bytes): instead of H, to a standby's ``HistoryServer``: a
                           master's speaker restarted on its node asks for the journal back;
                           R frames answer, then E
    E  standby -> master   records sent (u64): the copy is whole (an EOF alone is not proof)
    R  master -> standby   first sequence (u64) | records, each u32 length | record
    A  standby -> master   records held (u64) | records applied (u64): on receipt of a batch
                           (the master's wait) and after applying one (the standby is hot)

Sequence numbers count records from the journal's first (the whole history goes first) and
must follow each other: a replayed or reordered frame is a protocol error, the connection is
dropped. A standby acknowledges on receipt (the records are in its memory; it applies them
in another thread), so the master's wait is a round trip, not the standby's work.

Why the master waits (``confirmed``): the standby must be able to produce every byte the peer
may have received, and the session worker restores the connection at the last commit, so the
master commits read positions and writes bytes only up to records the standby holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from nonstop.auth import TAG_LEN, seal, unseal
from nonstop.bgp.config import SpeakerConfig
from nonstop.bgp.journal import Journal, Standby
from nonstop.common import RemoteProtocolError

log = logging.getLogger("nonstop.bgp.remote")
MAX_FRAME = 64 << 20
_U32, _U64 = struct.Struct("!I"), struct.Struct("!Q")
NONCE_LEN = 16
STALL_S = 5.0  # a standby without progress for this long is dropped (the master goes on)


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def pack_frame(key: bytes, nonce: bytes, body: bytes) -> bytes:
    tag = seal(key, nonce + body)[-TAG_LEN:]
    return _U32.pack(len(body) + TAG_LEN) + body + tag


class FrameReader:
    """Bytes in, verified bodies out (sans-IO). RemoteProtocolError on a bad length or tag."""

    def __init__(self, key: bytes, nonce: bytes = b"") -> None:
        self.key, self.nonce = key, nonce
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _U32.unpack_from(self.buf)
            if not TAG_LEN < n <= MAX_FRAME:
                raise RemoteProtocolError(f"journal frame of {n} bytes", counter="bad_journal")
            if len(self.buf) < 4 + n:
                break
            raw = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            body = unseal(self.key, self.nonce + raw)[len(self.nonce) :]
            if not body:
                raise RemoteProtocolError("empty journal frame", counter="bad_journal")
            out.append(body)
        return out


def records_body(first: int, records: list[bytes]) -> bytes:
    parts = [b"R", _U64.pack(first)]
    for r in records:
        parts += [_U32.pack(len(r)), r]
    return b"".join(parts)


def record_frames(key: bytes, nonce: bytes, first: int, records: list[bytes]) -> bytes:
    """``records`` (numbered from ``first``) as R frames of up to ~1 MB each."""
    out, batch, size = bytearray(), [], 0
    for r in records:
        batch.append(r)
        size += len(r)
        if size >= 1 << 20:
            out += pack_frame(key, nonce, records_body(first, batch))
            first, batch, size = first + len(batch), [], 0
    if batch:
        out += pack_frame(key, nonce, records_body(first, batch))
    return bytes(out)


def parse_records(body: bytes) -> tuple[int, list[bytes]]:
    if len(body) < 9 or body[:1] != b"R":
        raise RemoteProtocolError("not a records frame", counter="bad_journal")
    (first,) = _U64.unpack_from(body, 1)
    out, i = [], 9
    while i < len(body):
        if i + 4 > len(body):
            raise RemoteProtocolError("records frame cut", counter="bad_journal")
        (n,) = _U32.unpack_from(body, i)
        if i + 4 + n > len(body):
            raise RemoteProtocolError("records frame cut", counter="bad_journal")
        out.append(body[i + 4 : i + 4 + n])
        i += 4 + n
    return first, out


# -- the master's side (asyncio) -----------------------------------------------------------------


class _Standby:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.nonce = b""
        self.sent = 0  # records queued to it
        self.acked = 0
        self.applied = 0  # records the standby has applied (hot up to there)
        self.progress = time.monotonic()  # last ack that moved (or the join)
        self.out = bytearray()
        self.reader: FrameReader | None = None
        self.joined_at = 0  # the journal's length when it joined


class JournalServer:
    """Serves the journal to standbys on ``bind``; ``confirmed`` is how many records every
    standby holds (all of them when none is connected: nobody to wait for).
    ``on_confirm()`` runs when it moves."""

    def __init__(self, key: bytes, bind: tuple[str, int], journal: Journal,
                 on_confirm: Callable[[], None]) -> None:
        self.key = key
        self.journal = journal
        self.on_confirm = on_confirm
        self.seq = len(journal.records)
        self.standbys: list[_Standby] = []
        self.counters: dict[str, int] = {"joined": 0, "left": 0}
        self._flush_pending = False
        self.loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)
        self.sock.listen(4)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        journal.sink = self._record
        self._watch = self.loop.call_later(STALL_S, self._check)

    def _check(self) -> None:
        """A standby that stops acknowledging would hold the master's output forever (and the
        peer's hold timer runs): drop it after STALL_S without progress."""
        now = time.monotonic()
        for s in list(self.standbys):
            if s.acked < s.sent and now - s.progress > STALL_S:
                log.error("standby stalled (%d of %d records acked): dropped", s.acked, s.sent)
                self.counters["stalled"] = self.counters.get("stalled", 0) + 1
                self._drop(s)
        self._watch = self.loop.call_later(STALL_S / 4, self._check)

    @property
    def confirmed(self) -> int:
        live = [s.acked for s in self.standbys if s.reader is not None]
        return min(live) if live else self.seq

    @property
    def following(self) -> int:
        """Standbys that have applied the whole history (every record before their join): hot,
        a takeover does not wait for them to catch up."""
        return sum(1 for s in self.standbys if s.reader is not None and s.applied >= s.joined_at)

    def _record(self, rec: bytes) -> None:
        self.seq += 1
        if self.standbys and not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        recs = self.journal.records
        for s in list(self.standbys):
            if s.reader is None or s.sent >= self.seq:
                continue
            self._queue(s, s.sent, recs[s.sent : self.seq])

    def _queue(self, s: _Standby, first: int, recs: list[bytes]) -> None:
        s.out += record_frames(self.key, s.nonce, first, recs)
        s.sent = first + len(recs)
        self._write(s)

    def _write(self, s: _Standby) -> None:
        try:
            n = s.sock.send(s.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(s)
            return
        del s.out[:n]
        if s.out:
            self.loop.add_writer(s.sock.fileno(), self._writable, s)
        else:
            self.loop.remove_writer(s.sock.fileno())

    def _writable(self, s: _Standby) -> None:
        self._write(s)

    def _accept(self) -> None:
        try:
            c, addr = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        c.setblocking(False)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = _Standby(c)
        self.standbys.append(s)
        self.loop.add_reader(c.fileno(), self._readable, s)
        log.info("standby connecting from %s", addr[0])

    def _readable(self, s: _Standby) -> None:
        try:
            data = s.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(s)
            return
        try:
            if s.reader is None:  # the hello: a nonce, authenticated with the empty nonce
                bodies = FrameReader(self.key).feed(data)
                if len(bodies) != 1 or bodies[0][:1] != b"H" or len(bodies[0]) != 1 + NONCE_LEN:
                    raise RemoteProtocolError("bad standby hello", counter="bad_journal")
                s.nonce = bodies[0][1:]
                s.reader = FrameReader(self.key, s.nonce)
                s.joined_at, s.progress = self.seq, time.monotonic()
                self.counters["joined"] += 1
                log.info("standby joined: sending %d records", self.seq)
                self._queue(s, 0, self.journal.records[: self.seq])
                return
            for body in s.reader.feed(data):
                if body[:1] != b"A" or len(body) != 17:
                    raise RemoteProtocolError("bad standby ack", counter="bad_journal")
                n, applied = struct.unpack_from("!QQ", body, 1)
                s.applied = max(s.applied, min(applied, n))
                if not s.acked <= n <= s.sent:
                    raise RemoteProtocolError(f"standby acked {n} of {s.sent}",
                                              counter="bad_journal")
                if n > s.acked:
                    s.acked, s.progress = n, time.monotonic()
        except RemoteProtocolError as e:
            self.counters[e.counter] = self.counters.get(e.counter, 0) + 1
            log.warning("standby dropped: %s", e)
            self._drop(s)
            return
        self.on_confirm()

    def _drop(self, s: _Standby) -> None:
        if s in self.standbys:
            self.standbys.remove(s)
            self.counters["left"] += 1
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(s.sock.fileno())
                self.loop.remove_writer(s.sock.fileno())
            s.sock.close()
            self.on_confirm()  # one fewer to wait for

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed already (a deposed speaker closes it first)
        self._watch.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for s in list(self.standbys):
            self._drop(s)


# -- the standby's side (threads) ----------------------------------------------------------------


class JournalFollower:
    """Follows the master at ``master`` (retrying until one answers): a reader thread receives
    and acknowledges records, an applier thread feeds them to a :class:`Standby` (with
    ``retain``: a takeover on another node may need written bytes again). ``stop()`` ends
    following and applies what was received: the standby then holds every record the master
    may have acted on."""

    def __init__(self, cfg: SpeakerConfig, key: bytes, master: tuple[str, int], *,
                 history_only: bool = False) -> None:
        self.key = key
        self.master = master
        # asks a standby's HistoryServer for its copy (Q) instead of following a master (H)
        self.history_only = history_only
        self.history_total: int | None = None  # history_only: how many the standby sent
        self.standby = Standby(cfg, retain=True)
        self.history: list[bytes] = []
        self.received = 0
        self.connected_at: float | None = None
        self.ended: str | None = None  # why following ended (the master went away, ...)
        self._queue: deque[bytes] = deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._nonce = b""
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="journal-reader",
                                        daemon=True)
        self._applier = threading.Thread(target=self._apply_loop, name="journal-applier",
                                         daemon=True)
        self.apply_error: Exception | None = None

    def start(self) -> JournalFollower:
        self._reader.start()
        self._applier.start()
        return self

    @property
    def applied(self) -> int:
        return self.standby.applied

    def _connect(self) -> socket.socket | None:
        fam = socket.AF_INET6 if ":" in self.master[0] else socket.AF_INET
        while not self._stop.is_set():
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect(self.master)
                return s
            except OSError:
                s.close()
                self._stop.wait(0.05)
        return None

    def _read_loop(self) -> None:
        sock = self._connect()
        if sock is None:
            return
        self._sock = sock
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = self._nonce = os.urandom(NONCE_LEN)
        reader = FrameReader(self.key, nonce)
        try:
            sock.sendall(pack_frame(self.key, b"", (b"Q" if self.history_only else b"H") + nonce))
            self.connected_at = time.monotonic()
            while not self._stop.is_set():
                data = sock.recv(1 << 20)
                if not data:
                    self.ended = "history received" if self.history_only else \
                        "master closed the journal"
                    return
                bodies = reader.feed(data)
                if not bodies:
                    continue
                with self._cv:
                    for body in bodies:
                        if self.history_only and body[:1] == b"E" and len(body) == 9:
                            self.history_total = _U64.unpack_from(body, 1)[0]
                            continue
                        first, recs = parse_records(body)
                        if first != self.received:
                            raise RemoteProtocolError(f"records from {first}, expected "
                                                      f"{self.received}", counter="bad_journal")
                        self._queue.extend(recs)
                        self.received += len(recs)
                    self._cv.notify()
                self._ack()
        except (OSError, RemoteProtocolError) as e:
            if not self._stop.is_set():
                self.ended = f"{type(e).__name__}: {e}"
                log.warning("journal: %s", self.ended)
        finally:
            with self._cv:
                self._cv.notify()

    def _ack(self) -> None:
        sock = self._sock
        if sock is None:
            return
        with self._send_lock:  # read inside: the counts the master sees never go back
            body = b"A" + struct.pack("!QQ", self.received, self.standby.applied)
            sock.sendall(pack_frame(self.key, self._nonce, body))

    def _apply_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait()
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            for rec in batch:
                try:
                    self.standby.apply(rec)
                except Exception as e:  # a diverged journal: this standby cannot take over
                    self.apply_error = e
                    log.error("journal: cannot apply record %d: %s", self.standby.applied, e)
                    self._stop.set()
                    return
                self.history.append(rec)
            if not self._stop.is_set():
                with contextlib.suppress(OSError):
                    self._ack()  # the master learns the standby is hot

    def finish(self, timeout: float) -> None:
        """``history_only``: wait up to ``timeout`` for the whole copy (the standby closes the
        connection after it), then ``stop()``."""
        self._reader.join(timeout)
        self.stop()

    def history_copy(self, timeout: float = 5.0) -> list[bytes]:
        """Every record received, once applied ([] if one failed): what a HistoryServer serves
        once following has ended."""
        deadline = time.monotonic() + timeout
        while len(self.history) < self.received and self.apply_error is None:
            if time.monotonic() > deadline:
                return []
            time.sleep(0.005)
        return [] if self.apply_error is not None else list(self.history)

    def stop(self) -> None:
        """Stop following; apply everything received (returns when done)."""
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        with self._cv:
            self._cv.notify_all()
        self._applier.join()
        if self._sock is not None:
            self._sock.close()


class HistoryServer:
    """A standby's copy of the journal, served back to its master's speaker when that one was
    restarted on its own node (a crash of the speaker alone: the agent kept the connections
    and hands them to the new process, which has no journal). The standby holds every record
    the master may have acted on (the master's wait), so the new process continues the
    sessions from it exactly as a takeover on the standby's node would.

    Listens on the standby's ``journal_listen`` (free while this node is a backup). Served
    only once following has ended (the master's journal closed): never while a master runs,
    so the copy is final. One client gets it; then ``on_served()`` (the standby must start
    afresh: it follows the new master's journal from its first record)."""

    def __init__(self, key: bytes, bind: tuple[str, int], follower: JournalFollower,
                 on_served: Callable[[], None]) -> None:
        self.key = key
        self.follower = follower
        self.on_served = on_served
        self.served = False
        fam = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="journal-history", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self.served:
            try:
                c, addr = self.sock.accept()
            except OSError:
                return  # closed
            with c:
                try:
                    self._one(c, addr[0])
                except (OSError, RemoteProtocolError) as e:
                    log.warning("journal history for %s: %s", addr[0], e)

    def _one(self, c: socket.socket, peer: str) -> None:
        c.settimeout(5.0)
        reader = FrameReader(self.key)
        bodies: list[bytes] = []
        while not bodies:
            data = c.recv(4096)
            if not data:
                return
            bodies = reader.feed(data)
        body = bodies[0]
        if body[:1] != b"Q" or len(body) != 1 + NONCE_LEN:
            return  # a follower's hello: no master runs here
        if self.follower.ended is None:
            log.warning("journal history asked by %s while the master's journal runs: refused",
                        peer)
            return
        recs = self.follower.history_copy()
        if not recs:
            return
        nonce = body[1:]
        c.sendall(record_frames(self.key, nonce, 0, recs) +
                  pack_frame(self.key, nonce, b"E" + _U64.pack(len(recs))))
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):  # its acknowledgements, until it has read everything and closed
            pass
        self.served = True
        log.warning("gave the journal (%d records) back to the master's speaker at %s",
                    len(recs), peer)
        self.on_served()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.sock.close()
        self._thread.join(timeout=5)


def fetch_history(cfg: SpeakerConfig, key: bytes, standby: tuple[str, int],
                  timeout: float) -> JournalFollower | None:
    """The journal back from the standby at ``standby`` (HistoryServer), applied to a fresh
    Standby; None if no whole copy came within ``timeout`` (the standby may not have seen the
    old master's journal end yet: asked again until then)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        f = JournalFollower(cfg, key, standby, history_only=True).start()
        f.finish(left)
        if f.history and f.apply_error is None and f.history_total == len(f.history):
            return f
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    return None
