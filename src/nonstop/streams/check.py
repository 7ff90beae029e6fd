"""Sans-IO core of the stream checker: message encoding and a verifier fed with bytes."""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

HEADER = struct.Struct("!2sBxIQHxxI")  # magic, direction, conn id, seq, length, crc32
MAGIC = b"NS"
MAX_PAYLOAD = 60000


class StreamError(Exception):
    """The stream is not what the other side sent: corrupted framing or payload."""


def payload_for(direction: int, conn: int, seq: int, length: int) -> bytes:
    """The deterministic payload of message ``seq`` (any length up to MAX_PAYLOAD)."""
    seed = hashlib.blake2b(struct.pack("!BIQ", direction, conn, seq), digest_size=32).digest()
    return (seed * (length // 32 + 1))[:length]


def make_message(direction: int, conn: int, seq: int, length: int) -> bytes:
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"payload length {length} out of range")
    body = payload_for(direction, conn, seq, length)
    return HEADER.pack(MAGIC, direction, conn, seq, length, zlib.crc32(body)) + body


@dataclass
class StreamReport:
    messages: int = 0
    bytes: int = 0
    lost: int = 0  # messages skipped (a gap in seq)
    duplicated: int = 0  # messages seen again (seq not above the last one)
    corrupted: int = 0
    first_at: float | None = None
    last_at: float | None = None
    max_gap: float = 0.0  # longest silence between two messages, seconds
    max_gap_at: float | None = None  # when that silence ended
    arrivals: list[float] = field(default_factory=list)  # kept only if record_arrivals
    long_gaps: list[tuple[float, float]] = field(default_factory=list)  # (from, to) > long_gap


class StreamVerifier:
    """Feed it what arrives (``feed(data, now)``); it checks every message of one direction
    of one connection. Raises StreamError on broken framing (the stream cannot be resynced);
    a bad payload is counted as corrupted."""

    def __init__(self, direction: int, conn: int, *, record_arrivals: bool = False,
                 long_gap: float | None = None) -> None:  # fmt: skip
        self.direction, self.conn = direction, conn
        self.long_gap = long_gap  # silences longer than this are kept in report.long_gaps
        self.next_seq = 0
        self.report = StreamReport()
        self._buf = bytearray()
        self._record = record_arrivals
        self.last_len = -1  # payload length of the last message (0: the trailer)

    def wanted(self) -> int:
        """Bytes until the next message is whole, or its header if that is not yet (so a
        reader of exactly that many learns the message's length next)."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        return HEADER.size + HEADER.unpack_from(self._buf)[4] - len(self._buf)

    def feed(self, data: bytes, now: float) -> int:
        """Returns how many whole messages this data completed."""
        self._buf += data
        done = 0
        while len(self._buf) >= HEADER.size:
            magic, direction, conn, seq, length, crc = HEADER.unpack_from(self._buf)
            if magic != MAGIC or direction != self.direction or conn != self.conn:
                raise StreamError(
                    f"bad header on conn {self.conn} after {self.report.messages} messages: "
                    f"{bytes(self._buf[: HEADER.size]).hex()}"
                )
            if len(self._buf) < HEADER.size + length:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + length])
            del self._buf[: HEADER.size + length]
            self._message(seq, length, crc, body, now)
            done += 1
        return done

    def _message(self, seq: int, length: int, crc: int, body: bytes, now: float) -> None:
        r = self.report
        self.last_len = length
        if zlib.crc32(body) != crc or body != payload_for(self.direction, self.conn, seq, length):
            r.corrupted += 1
        if seq < self.next_seq:
            r.duplicated += 1
            return
        r.lost += seq - self.next_seq
        self.next_seq = seq + 1
        r.messages += 1
        r.bytes += length
        if r.last_at is not None and now - r.last_at > r.max_gap:
            r.max_gap, r.max_gap_at = now - r.last_at, now
        if self.long_gap is not None and r.last_at is not None and now - r.last_at > self.long_gap:
            r.long_gaps.append((r.last_at, now))
        if r.first_at is None:
            r.first_at = now
        r.last_at = now
        if self._record:
            r.arrivals.append(now)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message still buffered."""
        return len(self._buf)
