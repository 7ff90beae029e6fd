"""Membership: heartbeats on every channel, the failure detector and the Active Stations Table.

Seeds 003 and 001: every node sends a UDP heartbeat to every peer on each of its (two or more)
independent channels; k+1 copies of each datagram survive k omissions; the Active Stations Table
(AST) keeps, per (peer, channel), whether it is up, when it was last heard, its RTT and its loss.
A channel that goes silent while another still carries the peer is a *channel* fault, not a node
failure: only when every channel is silent is the peer lost.

Wire format (one UDP datagram: 50 to 70 bytes with short names, 70 with a 64-bit incarnation)::

    b"NSHB" | version (1 byte, = 1) | msgpack array | tag (16 bytes)

The array is :class:`Heartbeat`, in this order: type (1 HEARTBEAT, 2 LEAVE), group (u16), node_id
(str), channel (str: the channel it was sent on; a receiver drops it if it arrived on another),
incarnation (u64, goes up at every restart), seq (u64, one counter per sender, same value on every
channel in one tick, repeated by the copies), role (``Role``), priority (u8), flags (u32:
``FLAG_WITNESS_LEASE``, ``FLAG_HANDOVER_REQUEST``, ``FLAG_SYNC_READY``), sent_at (sender's
monotonic clock, us),
echo_seq (last seq received from the destination on this channel, 0 if none), echo_delay_us (time
from receiving echo_seq to sending this one). The tag is HMAC-SHA256-128 over everything before it
(``nonstop.auth.seal``). Receivers ignore array items past the ones they know.

Detector rules (time is only an input; ``dead`` = ``dead_after * interval``):

- a (peer, channel) is *up* from the first valid heartbeat on it and *down* at exactly
  ``last_heard + dead``. While another channel is up that is ``ChannelFaulted``; back up it is
  ``ChannelRecovered``. A channel not heard within ``dead`` of the peer joining faults too.
- the peer is lost when no channel is up: ``PeerLost(peer, "no heartbeat on lan, hb for 30 ms")``.
  ``link_closed()`` (EOF/RST on the peer agent's TCP link) loses it at once; heartbeats of that
  incarnation still in flight are then ignored (``stale``) for one ``dead``.
- ``PeerJoined`` when first heard, or heard again after being lost. ``PeerStateChanged`` when role,
  priority or flags change (only a newer seq can change them). ``PeerRestarted`` when the
  incarnation goes up. A LEAVE gives ``PeerLeft`` then ``PeerLost(peer, "left")``, and that
  incarnation is never accepted again.
- every datagram is authenticated, then checked: channel, group, sender (our own id is
  ``looped_back``), incarnation, then a ``ReplayWindow`` per (peer, channel): a k+1 copy is
  ``rx_duplicate``, an old seq or incarnation ``replay``. Drops are counted in ``counters`` and
  logged at the first occurrence and every 1000th, never raised.
- sending: every ``interval`` on every channel to every peer there, ``copies`` times each, on a
  fixed grid (``t0 + n * interval``; ticks missed by a late caller are skipped, not bunched).
"""

from nonstop.common import Role
from nonstop.membership.core import (
    Membership,
    MembershipConfig,
    Outgoing,
    PeerView,
    StationRow,
)
from nonstop.membership.events import (
    ChannelFaulted,
    ChannelRecovered,
    Event,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRestarted,
    PeerStateChanged,
)
from nonstop.membership.wire import (
    FLAG_HANDOVER_REQUEST,
    FLAG_SYNC_READY,
    FLAG_WITNESS_LEASE,
    MAGIC,
    VERSION,
    Heartbeat,
    MsgType,
    decode_heartbeat,
    encode_heartbeat,
)

__all__ = [
    "FLAG_HANDOVER_REQUEST",
    "FLAG_SYNC_READY",
    "FLAG_WITNESS_LEASE",
    "MAGIC",
    "VERSION",
    "ChannelFaulted",
    "ChannelRecovered",
    "Event",
    "Heartbeat",
    "Membership",
    "MembershipConfig",
    "MsgType",
    "Outgoing",
    "PeerJoined",
    "PeerLeft",
    "PeerLost",
    "PeerRestarted",
    "PeerStateChanged",
    "PeerView",
    "Role",
    "StationRow",
    "decode_heartbeat",
    "encode_heartbeat",
]
