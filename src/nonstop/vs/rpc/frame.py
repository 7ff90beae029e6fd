"""RPC frames: ``length (u32, big endian) | msgpack(Call | Reply)``, decoded sans-IO.

A Call names a method and its positional arguments, plus what the client asks of the front:
``mode`` ("auto", "primary_backup", "nvp", "drb"), ``reliability`` (1 low, 2 normal, 3 high) and
``deadline_ms`` (0: none). Between the front and a worker, ``variant`` says which version of the
method to run ("primary" or "alternate", for DRB). A Reply carries the value or an error, the mode
the front used and why, the workers that answered, and (from a worker) whether the method's
acceptance test passed.

``FrameDecoder`` takes bytes and hands out frames; a frame that is too long or does not decode
raises RemoteProtocolError (``counter="bad_frame"``): the byte stream is then out of step, so the
peer answers with one error Reply (id 0) and closes.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec

from nonstop.common import RemoteProtocolError

MAX_FRAME = 16 * 1024 * 1024
MODES = ("auto", "primary_backup", "nvp", "drb")
_LEN = struct.Struct(">I")

Id = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Call(msgspec.Struct, tag="call", array_like=True, frozen=True):
    id: Id
    method: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    args: list[Any] = []
    mode: str = "auto"
    reliability: Annotated[int, msgspec.Meta(ge=1, le=3)] = 1
    deadline_ms: Annotated[int, msgspec.Meta(ge=0)] = 0
    variant: str = "primary"


class Reply(msgspec.Struct, tag="reply", array_like=True, frozen=True):
    id: Id
    ok: bool
    value: Any = None
    error: str = ""
    mode: str = ""
    reason: str = ""
    workers: list[str] = []
    accepted: bool = True


Frame = Call | Reply
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Frame)


def encode(frame: Call | Reply) -> bytes:
    body = _ENC.encode(frame)
    return _LEN.pack(len(body)) + body


def canonical(value: Any) -> bytes:
    """Bytes that are equal when two results are equal (what NVP votes on)."""
    return _ENC.encode(value)


class FrameDecoder:
    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> Call | Reply | None:
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n == 0 or n > self.max_frame:
            raise RemoteProtocolError(
                f"frame length {n} outside 1..{self.max_frame}", counter="bad_frame"
            )
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        try:
            frame = _DEC.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise RemoteProtocolError(f"bad frame: {e}", counter="bad_frame") from e
        if isinstance(frame, Call) and (
            frame.mode not in MODES or frame.variant not in ("primary", "alternate")
        ):
            raise RemoteProtocolError(
                f"bad call: mode {frame.mode[:20]!r} variant {frame.variant[:20]!r}",
                counter="bad_frame",
            )
        return frame
