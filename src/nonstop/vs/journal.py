"""The response journal: the active front copies every response to the standby front before it
writes the first byte of it to the client, so a front that adopts the client's connection after
a takeover writes the very same bytes (see docs/vs.md, "Front takeover").

Why: the session layer (nonstop.session) restores a client connection at its last commit (read
position = end of the last request answered, write position = end of its response). A response
the dead front wrote after that commit may have reached the client, partly or whole; the peer's
TCP drops the bytes it already has and takes the rest, so the successor must write byte-identical
bytes from the committed write position. A worker asked again would answer with another ``Date``
header (or another body): the client's stream would be corrupt. The journal holds those bytes.

Wire (a TCP stream on the heartbeat channel, active -> standby): the standby first sends a
16-byte random challenge; then every frame is ``length u32 | msgpack | tag``, the tag being
HMAC-SHA256-128 over ``challenge || direction || msgpack`` (``nonstop.auth``), so a frame from
another stream (a replay) or of the other direction fails. Frames are applied in stream order;
the standby answers ``Ack(seq)`` for the highest frame applied.

- ``Open(conn, wpos)``: from ``wpos`` on, every response on ``conn`` is journaled (sent when a
  connection is first journaled on this stream; the stream restarts coverage);
- ``Entry(seq, conn, wpos, rend, inflight, data)``: the response written at ``wpos`` answers the
  request that ends at read position ``rend``; ``inflight`` (no data): a non-idempotent request
  was sent to a worker and has no response yet;
- ``Closed(conn)``: the connection ended; ``Ack(seq)`` (standby -> active).

``JournalStore`` is the standby's sans-IO store (``now`` in): ``take(conn)`` on adoption gives a
:class:`ConnJournal` whose ``at(wpos, rend)`` says what to write at each position. ``JournalLink``
(active side) and ``JournalServer`` (standby side) are the asyncio adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Annotated

import msgspec

from nonstop.auth import TAG_LEN
from nonstop.common import RemoteProtocolError

log = logging.getLogger("nonstop.vs.journal")

CHALLENGE_LEN = 16
MAX_FRAME = 64 * 1024 * 1024 + 4096
_LEN = struct.Struct(">I")
U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Host = Annotated[str, msgspec.Meta(max_length=64)]
ConnKey = tuple[int, str, int]  # (listener port, client address, client port)
TO_STANDBY, TO_ACTIVE = b">", b"<"


class Open(msgspec.Struct, tag="open", array_like=True, frozen=True):
    port: Port
    host: Host
    cport: Port
    wpos: U63


class Entry(msgspec.Struct, tag="entry", array_like=True, frozen=True):
    seq: U63
    port: Port
    host: Host
    cport: Port
    wpos: U63  # write position of the response's first byte
    rend: U63  # read position just after the request it answers
    inflight: bool = False
    data: bytes = b""


class Closed(msgspec.Struct, tag="closed", array_like=True, frozen=True):
    port: Port
    host: Host
    cport: Port


class Ack(msgspec.Struct, tag="ack", array_like=True, frozen=True):
    seq: U63


Message = Open | Entry | Closed | Ack
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Message)


def _tag(key: bytes, challenge: bytes, direction: bytes, body: bytes) -> bytes:
    return hmac.digest(key, challenge + direction + body, hashlib.sha256)[:TAG_LEN]


def encode(msg: Message, key: bytes, challenge: bytes, direction: bytes) -> bytes:
    body = _ENC.encode(msg)
    return _LEN.pack(len(body)) + body + _tag(key, challenge, direction, body)


class FrameDecoder:
    """Bytes in, authenticated messages out; anything else raises RemoteProtocolError."""

    def __init__(self, key: bytes, challenge: bytes, direction: bytes) -> None:
        self.key, self.challenge, self.direction = key, challenge, direction
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n == 0 or n > MAX_FRAME:
                raise RemoteProtocolError(f"journal frame of {n} bytes", counter="bad_journal")
            if len(self._buf) < 4 + n + TAG_LEN:
                break
            body = bytes(self._buf[4 : 4 + n])
            tag = bytes(self._buf[4 + n : 4 + n + TAG_LEN])
            del self._buf[: 4 + n + TAG_LEN]
            if not hmac.compare_digest(tag, _tag(self.key, self.challenge, self.direction, body)):
                raise RemoteProtocolError("journal frame tag does not match", counter="bad_auth")
            try:
                out.append(_DEC.decode(body))
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise RemoteProtocolError(f"bad journal frame: {e}", counter="bad_journal") from e
        return out


# -- the standby's store (sans-IO) ----------------------------------------------------------------
class JournalGap(Exception):
    """The response at this write position was journaled but is gone (evicted): the successor
    cannot write the same bytes; the connection must end rather than carry corrupt bytes."""


@dataclass(slots=True)
class ConnJournal:
    since: int  # coverage: every response written at a position >= since was journaled
    entries: dict[int, tuple[float, Entry]]
    evicted_upto: int = -1  # highest write position of an evicted entry

    def at(self, wpos: int, rend: int) -> Entry | None:
        """The journaled response (or in-flight mark) for the request ending at ``rend`` answered
        at ``wpos``; None: nothing was written or forwarded for it (safe to forward). Raises
        JournalGap when it cannot know (evicted, or the positions disagree)."""
        if wpos < self.since:
            raise JournalGap(f"write position {wpos} before the journal's coverage {self.since}")
        got = self.entries.get(wpos)
        if got is None:
            if wpos <= self.evicted_upto:
                raise JournalGap(f"the response at {wpos} was evicted")
            return None
        e = got[1]
        if e.rend != rend:
            raise JournalGap(f"response at {wpos} answers a request ending at {e.rend}, not {rend}")
        return e


class JournalStore:
    """What the standby holds: per connection, the responses the active front wrote lately.

    Entries older than ``keep`` seconds, or beyond ``per_conn`` per connection, are evicted (the
    session layer's commit, which makes them unneeded, is seconds behind at worst)."""

    def __init__(self, *, keep: float = 10.0, per_conn: int = 4096) -> None:
        self.keep, self.per_conn = keep, per_conn
        self.conns: dict[ConnKey, ConnJournal] = {}
        self._order: OrderedDict[tuple[ConnKey, int], float] = OrderedDict()
        self.counters: Counter[str] = Counter()

    def apply(self, msg: Message, now: float) -> None:
        if isinstance(msg, Open):
            k = (msg.port, msg.host, msg.cport)
            self._drop(k)
            self.conns[k] = ConnJournal(msg.wpos, {})
            self.counters["opened"] += 1
        elif isinstance(msg, Entry):
            k = (msg.port, msg.host, msg.cport)
            cj = self.conns.get(k)
            if cj is None or msg.wpos < cj.since:
                self.counters["entry_without_open"] += 1
                return
            if msg.wpos in cj.entries:  # the response replaces the in-flight mark
                self._order.pop((k, msg.wpos), None)
            cj.entries[msg.wpos] = (now, msg)
            self._order[(k, msg.wpos)] = now
            self.counters["entries"] += 1
            while len(cj.entries) > self.per_conn:
                w = min(cj.entries)
                self._evict(k, w)
        elif isinstance(msg, Closed):
            self._drop((msg.port, msg.host, msg.cport))
            self.counters["closed"] += 1
        self.handle_timer(now)

    def handle_timer(self, now: float) -> None:
        while self._order:
            (k, w), t = next(iter(self._order.items()))
            if now - t < self.keep:
                break
            self._evict(k, w)

    def _evict(self, k: ConnKey, w: int) -> None:
        self._order.pop((k, w), None)
        cj = self.conns.get(k)
        if cj is not None and cj.entries.pop(w, None) is not None:
            cj.evicted_upto = max(cj.evicted_upto, w)
            self.counters["evicted"] += 1

    def _drop(self, k: ConnKey) -> None:
        cj = self.conns.pop(k, None)
        if cj is not None:
            for w in cj.entries:
                self._order.pop((k, w), None)

    def take(self, k: ConnKey) -> ConnJournal | None:
        cj = self.conns.get(k)
        if cj is not None:
            self._drop(k)
        return cj

    def __len__(self) -> int:
        return len(self._order)


# -- asyncio adapters ---------------------------------------------------------------------------
class JournalServer:
    """Standby side: accept the active front's stream, apply it to ``store``, acknowledge."""

    def __init__(self, store: JournalStore, key: bytes) -> None:
        self.store, self.key = store, key
        self.counters: Counter[str] = Counter()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        challenge = os.urandom(CHALLENGE_LEN)
        dec = FrameDecoder(self.key, challenge, TO_STANDBY)
        self.counters["streams"] += 1
        try:
            writer.write(challenge)
            while data := await reader.read(1 << 20):
                last = None
                for msg in dec.feed(data):
                    self.store.apply(msg, loop.time())
                    if isinstance(msg, Entry):
                        last = msg.seq
                if last is not None:
                    writer.write(encode(Ack(last), self.key, challenge, TO_ACTIVE))
        except RemoteProtocolError as e:
            self.counters[e.counter] += 1
            log.warning("journal stream from %s dropped: %s",
                        writer.get_extra_info("peername"), e.reason)  # fmt: skip
        except OSError:
            pass
        finally:
            writer.close()


class JournalLink:
    """Active side: one stream to the standby front at ``peer``, reconnected while it is down.

    ``record(entry)`` sends the entry and waits for its Ack: True once the standby holds it, False
    when there is no standby (down, or no Ack within ``timeout``), in which case the caller writes
    unjournaled (there is no successor that could use the copy)."""

    def __init__(self, peer: tuple[str, int], key: bytes, *, timeout: float = 0.5,
                 retry: float = 0.2) -> None:  # fmt: skip
        self.peer, self.key, self.timeout, self.retry = peer, key, timeout, retry
        self.counters: Counter[str] = Counter()
        self._writer: asyncio.StreamWriter | None = None
        self._challenge = b""
        self._seq = 0
        self._acked = 0
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._opened: set[ConnKey] = set()

    @property
    def up(self) -> bool:
        return self._writer is not None

    async def run(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(*self.peer)
            except OSError:
                await asyncio.sleep(self.retry)
                continue
            try:
                async with asyncio.timeout(2):
                    self._challenge = await reader.readexactly(CHALLENGE_LEN)
                self._writer, self._opened = writer, set()
                self.counters["connected"] += 1
                log.info("journal: streaming to the standby front at %s:%d", *self.peer)
                dec = FrameDecoder(self.key, self._challenge, TO_ACTIVE)
                while data := await reader.read(65536):
                    for msg in dec.feed(data):
                        if isinstance(msg, Ack):
                            self._acked = max(self._acked, msg.seq)
                    self._wake()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                log.debug("journal stream: %r", e)
            except RemoteProtocolError as e:
                self.counters[e.counter] += 1
                log.warning("journal stream to %s: %s", self.peer, e.reason)
            finally:
                self._down(writer)
            await asyncio.sleep(self.retry)

    def _wake(self) -> None:
        for s in [s for s in self._waiters if s <= self._acked]:
            fut = self._waiters.pop(s)
            if not fut.done():
                fut.set_result(None)

    def _down(self, writer: asyncio.StreamWriter) -> None:
        if self._writer is writer:
            self._writer = None
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("journal stream down"))
            self._waiters.clear()
        writer.close()

    def _send(self, msg: Message) -> None:
        assert self._writer is not None
        self._writer.write(encode(msg, self.key, self._challenge, TO_STANDBY))

    async def record(self, k: ConnKey, wpos: int, rend: int, data: bytes = b"", *,
                     inflight: bool = False) -> bool:  # fmt: skip
        w = self._writer
        if w is None:
            self.counters["unjournaled"] += 1
            return False
        if k not in self._opened:  # coverage starts here: nothing is in flight on k right now
            self._send(Open(k[0], k[1], k[2], wpos))
            self._opened.add(k)
        self._seq += 1
        seq = self._seq
        fut = asyncio.get_running_loop().create_future()
        self._waiters[seq] = fut
        self._send(Entry(seq, k[0], k[1], k[2], wpos, rend, inflight, data))
        try:
            async with asyncio.timeout(self.timeout):
                await fut
        except (TimeoutError, ConnectionError):
            self._waiters.pop(seq, None)
            self.counters["timeouts" if w is self._writer else "unjournaled"] += 1
            if w is self._writer:  # a standby that does not answer is no standby: drop it
                self._down(w)
            return False
        self.counters["journaled"] += 1
        return True

    def closed(self, k: ConnKey) -> None:
        if self._writer is not None and k in self._opened:
            self._opened.discard(k)
            self._send(Closed(*k))

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
