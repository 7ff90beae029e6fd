"""The stream checker: sequence-numbered, checksummed messages both ways over TCP.

Used by the tests and benchmarks of session takeover to prove, per connection, that no byte was
lost, duplicated or corrupted, that the connection was never reset, and how long the traffic
stopped around a fault. ``python -m nonstop.streams server|client`` runs either side.

Wire: each message is a 24-byte header ``!2sBxIQHxxI`` (magic b"NS", direction, conn id, seq,
payload length, CRC32 of the payload) followed by the payload, a pattern derived from
(direction, conn id, seq) so the receiver can regenerate it. The client sends direction 0 and
the server direction 1; each side checks the other's sequence (gaps = loss, repeats =
duplicates) and payload (corruption).
"""

from nonstop.streams.check import (
    HEADER,
    StreamError,
    StreamReport,
    StreamVerifier,
    make_message,
    payload_for,
)

__all__ = [
    "HEADER",
    "StreamError",
    "StreamReport",
    "StreamVerifier",
    "make_message",
    "payload_for",
]
