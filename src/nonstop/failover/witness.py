"""The witness: a lease arbiter that breaks ties between partitioned nodes. Sans-IO.

Wire format (UDP, one message per datagram)::

    seal(key, b"NSWT" || msgpack(array_like tagged struct))

    LeaseRequest = [1, group, node_id, incarnation, seq, want, lease_ms(, served)]
    LeaseReply   = [2, group, to, echo_incarnation, echo_seq, holder, granted, lease_ms, run, term]

``want=False`` releases the lease; with ``served=False`` (a trailing field: an older witness
ignores it, an older agent's request reads as served) the holder says it never acted on this
grant (never became master under it), and the witness puts the group's term and last
holder back to what they were before the grant: the node that held the lease before may still
trust what it parked. ``lease_ms`` in a request is the length the node asks for (the
witness caps it at its own maximum); in a reply it is the length granted, or for a denial the time
the holder still has. A reply names the requester (``to``) and echoes its incarnation and sequence,
so a recorded reply can neither be replayed to a later incarnation nor to another node.

Rules of :class:`WitnessCore`:

- A request is authenticated, then checked against a ReplayWindow per node id; a duplicate or old
  (incarnation, seq) is dropped without a reply and counted.
- want=True is granted when the group has no holder, the holder is the requester, or the holder's
  lease expired at ``now``; the lease then runs from ``now`` (receipt) for ``lease_ms``.
- want=False by the holder frees the lease at once; by anyone else it changes nothing.
- ``term`` counts the changes of holder of a group (a grant to the node that held it last, even
  after a lapse, keeps the term); ``run`` names this run of the witness. A node that stepped down
  and is granted the lease again under the same (run, term) knows no other node held it meanwhile:
  what it parked (its TCP sessions) is still the truth.
- For ``grace`` seconds after start (default: the maximum lease) nothing is granted: a lease given
  by a previous run of the witness may still be running. Denials then name no holder ("").

:class:`WitnessClient` remembers when it sent each sequence number; a grant is valid until
``send time + lease - margin`` by the client's own clock, which ends before the witness's view
(that one starts at receipt). Replies to an unknown or already answered sequence are ignored.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from nonstop.auth import ReplayWindow, seal, unseal
from nonstop.common import RemoteProtocolError

MAGIC = b"NSWT"
NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class LeaseRequest(msgspec.Struct, array_like=True, frozen=True, tag=1):
    group: U32
    node_id: NodeId
    incarnation: U63
    seq: U63
    want: bool
    lease_ms: U32
    served: bool = True  # want=False only: False, the grant was never acted on


class LeaseReply(msgspec.Struct, array_like=True, frozen=True, tag=2):
    group: U32
    to: NodeId
    echo_incarnation: U63
    echo_seq: U63
    holder: Annotated[str, msgspec.Meta(max_length=32)]
    granted: bool
    lease_ms: U32
    run: U63 = 0  # this witness run (0: an older witness that does not say)
    term: U63 = 0  # holder changes of the group in this run


Message = LeaseRequest | LeaseReply
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(key: bytes, msg: Message) -> bytes:
    return seal(key, MAGIC + _encoder.encode(msg))


def decode(key: bytes, data: bytes) -> Message:
    """Authenticate and parse one datagram. Raises RemoteProtocolError only."""
    payload = unseal(key, data)
    if payload[:4] != MAGIC:
        raise RemoteProtocolError("not a witness message (bad magic)", counter="malformed")
    try:
        return _decoder.decode(payload[4:])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise RemoteProtocolError(f"bad witness message: {e}", counter="malformed") from e


# ---- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseGranted:
    """Client side: we hold the lease until ``until`` (our monotonic clock). ``term`` is the
    witness's (run, holder changes): equal terms mean nobody else held the lease in between
    ((0, 0): the witness does not say)."""

    until: float
    term: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class LeaseDenied:
    """Client side: ``holder`` holds the lease ("" while the witness is in its grace period) for
    ``remaining`` more seconds as the witness saw it (0 if unknown): when to ask again."""

    holder: str
    remaining: float = 0.0


@dataclass(frozen=True, slots=True)
class LeaseAcquired:
    """Server side: ``holder`` got the lease of ``group``; ``previous`` had it ("" for nobody)."""

    group: int
    holder: str
    previous: str
    at: float


@dataclass(frozen=True, slots=True)
class LeaseReleased:
    """Server side: ``holder`` gave the lease of ``group`` back. ``term``: it had never acted
    on the grant, so the group's term went back to that (None: the term stays)."""

    group: int
    holder: str
    at: float
    term: int | None = None


@dataclass(slots=True)
class _Lease:
    holder: str = ""
    until: float = 0.0
    grants: int = 0
    transfers: int = 0
    # what the grant that made ``holder`` the holder changed: (last holder, term) before it;
    # None when it changed neither (a grant to the last holder again)
    undo: tuple[str, int] | None = None


class WitnessCore:
    def __init__(
        self, key: bytes, lease: float, now: float, *, grace: float | None = None, run: int = 0
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be > 0")
        self.key = key
        self.max_lease_ms = round(lease * 1000)
        self.grace_until = now + (lease if grace is None else grace)
        self.leases: dict[int, _Lease] = {}
        self.windows: dict[str, ReplayWindow] = {}
        self.counters: dict[str, int] = {
            "received": 0, "granted": 0, "denied": 0, "released": 0,
            "malformed": 0, "bad_auth": 0, "replay": 0, "unexpected": 0, "unused": 0,
        }  # fmt: skip
        self._events: deque[LeaseAcquired | LeaseReleased] = deque()
        # last holder per group, kept apart from the live holder so that a transfer is
        # recognised even when the lease expired before the next node asked
        self._previous: dict[int, str] = {}
        self.run = run  # names this run in replies (e.g. its start time): terms restart at 0
        self._terms: dict[int, int] = {}

    def next_event(self) -> LeaseAcquired | LeaseReleased | None:
        return self._events.popleft() if self._events else None

    def receive(self, data: bytes, addr: Any, now: float) -> list[tuple[Any, bytes]]:
        self.counters["received"] += 1
        try:
            msg = decode(self.key, data)
        except RemoteProtocolError as e:
            self.counters[e.counter] = self.counters.get(e.counter, 0) + 1
            return []
        if not isinstance(msg, LeaseRequest):
            self.counters["unexpected"] += 1
            return []
        window = self.windows.get(msg.node_id)
        if window is None:
            window = self.windows[msg.node_id] = ReplayWindow()
        if window.check_and_update(msg.incarnation, msg.seq) != "new":
            self.counters["replay"] += 1
            return []
        lease = self.leases.setdefault(msg.group, _Lease())
        if lease.holder and now >= lease.until:
            lease.holder = ""  # expired
        granted = False
        lease_ms = 0
        if not msg.want:
            if lease.holder == msg.node_id:
                lease.holder, lease.until = "", now
                self.counters["released"] += 1
                term = None
                if not msg.served and lease.undo is not None:
                    self._previous[msg.group], term = lease.undo
                    self._terms[msg.group] = term
                    self.counters["unused"] += 1
                lease.undo = None
                self._events.append(LeaseReleased(msg.group, msg.node_id, now, term))
        elif now < self.grace_until:
            self.counters["denied"] += 1
        elif lease.holder in ("", msg.node_id):
            lease_ms = min(msg.lease_ms or self.max_lease_ms, self.max_lease_ms)
            if lease.holder != msg.node_id:
                prev = self._previous.get(msg.group, "")
                lease.grants += 1
                if prev and prev != msg.node_id:
                    lease.transfers += 1
                lease.undo = None
                if prev != msg.node_id:
                    lease.undo = (prev, self._terms.get(msg.group, 0))
                    self._terms[msg.group] = self._terms.get(msg.group, 0) + 1
                self._events.append(LeaseAcquired(msg.group, msg.node_id, prev, now))
                self._previous[msg.group] = msg.node_id
            lease.holder, lease.until = msg.node_id, now + lease_ms / 1000
            granted = True
            self.counters["granted"] += 1
        else:
            lease_ms = max(0, round((lease.until - now) * 1000))
            self.counters["denied"] += 1
        reply = LeaseReply(
            group=msg.group, to=msg.node_id, echo_incarnation=msg.incarnation,
            echo_seq=msg.seq, holder=lease.holder, granted=granted, lease_ms=lease_ms,
            run=self.run, term=self._terms.get(msg.group, 0),
        )  # fmt: skip
        return [(addr, encode(self.key, reply))]

    def status(self, now: float) -> dict[str, Any]:
        groups = {}
        for g, lease in sorted(self.leases.items()):
            live = bool(lease.holder) and now < lease.until
            groups[g] = {
                "holder": lease.holder if live else "",
                "remaining_ms": round((lease.until - now) * 1000) if live else 0,
                "grants": lease.grants,
                "transfers": lease.transfers,
                "term": self._terms.get(g, 0),
            }
        return {
            "grace_remaining_ms": max(0, round((self.grace_until - now) * 1000)),
            "groups": groups,
            "counters": dict(self.counters),
        }


class WitnessClient:
    """Node side of the witness protocol."""

    MAX_PENDING = 64

    def __init__(
        self,
        key: bytes,
        group: int,
        node_id: str,
        incarnation: int,
        *,
        lease: float = 0.0,
        margin: float | None = None,
    ) -> None:
        self.key = key
        self.group = group
        self.node_id = node_id
        self.incarnation = incarnation
        self.lease_ms = round(lease * 1000)  # 0: whatever the witness grants
        self.margin = margin  # None: 5 % of the granted lease
        self._seq = 0
        self._pending: OrderedDict[int, tuple[float, bool]] = OrderedDict()
        self.counters: dict[str, int] = {"stale": 0, "malformed": 0, "bad_auth": 0}

    def request(self, now: float, want: bool = True, *, served: bool = True) -> bytes:
        """A request (``want``) or a release; ``served=False`` with a release: this node never
        acted on the grant it gives back (see the module doc)."""
        self._seq += 1
        self._pending[self._seq] = (now, want)
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popitem(last=False)
        msg = LeaseRequest(
            group=self.group, node_id=self.node_id, incarnation=self.incarnation,
            seq=self._seq, want=want, lease_ms=self.lease_ms, served=want or served,
        )  # fmt: skip
        return encode(self.key, msg)

    def receive(self, data: bytes, now: float) -> LeaseGranted | LeaseDenied | None:
        """Parse a reply. Raises RemoteProtocolError for bytes that are not a valid message."""
        try:
            msg = decode(self.key, data)
        except RemoteProtocolError as e:
            self.counters[e.counter] = self.counters.get(e.counter, 0) + 1
            raise
        if (
            not isinstance(msg, LeaseReply)
            or msg.group != self.group
            or msg.to != self.node_id
            or msg.echo_incarnation != self.incarnation
            or msg.echo_seq not in self._pending
        ):
            self.counters["stale"] += 1
            return None
        sent, want = self._pending.pop(msg.echo_seq)
        if not want:
            return None
        if msg.granted:
            if msg.holder != self.node_id:
                raise RemoteProtocolError(
                    f"grant names {msg.holder!r} as holder, not us", counter="malformed"
                )
            lease = msg.lease_ms / 1000
            margin = lease * 0.05 if self.margin is None else self.margin
            return LeaseGranted(until=sent + lease - margin, term=(msg.run, msg.term))
        return LeaseDenied(holder=msg.holder, remaining=msg.lease_ms / 1000)
