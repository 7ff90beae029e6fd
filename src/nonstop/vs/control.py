"""Worker control datagrams: authenticated registration (JOIN/LEAVE) and per-channel heartbeats.

Both go over UDP to the front's control port, on every channel the worker has.

- Heartbeats are nonstop.membership's wire format (``b"NSHB"``, HMAC-sealed), one per channel per
  interval, sent from the worker's address on that channel. The front checks the tag, that the
  worker is known, that the channel is one of its channels and that the datagram came from the
  worker's address on it, and a replay window per (worker, channel); then marks the channel heard.
- Registration: ``b"NSVR" | version 1 | msgpack array Registration | tag (16 bytes)``. The array
  is (type 1 JOIN / 2 LEAVE, worker id, incarnation, seq, addresses {channel: ip}, port, weight,
  rpc_port or nil, sent_at_us). A :class:`~nonstop.auth.ReplayWindow` per worker id over
  (incarnation, seq) drops replays; a JOIN is re-sent with every few heartbeats so a front that
  restarted learns the worker again.

Sans-IO: ``ControlReceiver.receive(data, source, now)`` applies a datagram to a :class:`Pool`;
``Announcer`` builds what a worker sends. Bad datagrams raise RemoteProtocolError (``.counter``);
the adapter counts and drops them.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter
from typing import Annotated

import msgspec

from nonstop.auth import TAG_LEN, ReplayWindow, seal, unseal
from nonstop.common import RemoteProtocolError, Role
from nonstop.membership.wire import MAGIC as HB_MAGIC
from nonstop.membership.wire import Heartbeat, MsgType, decode_heartbeat, encode_heartbeat
from nonstop.vs.pool import Pool, WorkerSpec

MAGIC = b"NSVR"
VERSION = 1
HEADER = MAGIC + bytes([VERSION])
GROUP = 0x7653  # "vS": the membership group id of worker heartbeats

Ident = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class RegType(enum.IntEnum):
    JOIN = 1
    LEAVE = 2


class Registration(msgspec.Struct, frozen=True, array_like=True):
    type: RegType
    worker: Ident
    incarnation: Annotated[int, msgspec.Meta(ge=0)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    addresses: dict[Ident, str]
    port: Port
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    rpc_port: Port | None = None
    sent_at_us: Annotated[int, msgspec.Meta(ge=0)] = 0


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(Registration)


def encode_registration(reg: Registration, key: bytes) -> bytes:
    return seal(key, HEADER + _ENC.encode(reg))


def decode_registration(data: bytes, key: bytes) -> Registration:
    if len(data) < len(HEADER) + 1 + TAG_LEN or data[:4] != MAGIC:
        raise RemoteProtocolError("not a registration (short or bad magic)", counter="malformed")
    if data[4] != VERSION:
        raise RemoteProtocolError(f"registration version {data[4]}", counter="bad_version")
    payload = unseal(key, data)
    try:
        reg = _DEC.decode(memoryview(payload)[len(HEADER) :])
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise RemoteProtocolError(f"invalid registration: {e}", counter="malformed") from e
    if not reg.addresses or len(reg.addresses) > 8:
        raise RemoteProtocolError("registration needs 1..8 addresses", counter="malformed")
    for ch, addr in reg.addresses.items():
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise RemoteProtocolError(
                f"registration address {ch}={addr[:40]!r} is not an IP", counter="malformed"
            ) from None
    return reg


class ControlReceiver:
    """The front's side: registrations and heartbeats from workers, applied to a Pool."""

    def __init__(self, pool: Pool, key: bytes, *, allow_join: bool = True) -> None:
        self.pool = pool
        self.key = key
        self.allow_join = allow_join
        self.counters: Counter[str] = Counter()
        self._reg_windows: dict[str, ReplayWindow] = {}
        self._hb_windows: dict[tuple[str, str], ReplayWindow] = {}

    def receive(self, data: bytes, source: str, now: float) -> str:
        """Apply one datagram; return what it did ("join w1", "heartbeat w1/lan", ...)."""
        try:
            if data[:4] == HB_MAGIC:
                what = self._heartbeat(data, source, now)
            elif data[:4] == MAGIC:
                what = self._registration(data, source, now)
            else:
                raise RemoteProtocolError("unknown control datagram", counter="malformed")
        except RemoteProtocolError as e:
            self.counters[e.counter] += 1
            raise
        self.counters["rx_ok"] += 1
        return what

    def _heartbeat(self, data: bytes, source: str, now: float) -> str:
        hb = decode_heartbeat(data, self.key)
        if hb.group != GROUP:
            raise RemoteProtocolError(f"heartbeat of group {hb.group}", counter="wrong_group")
        w = self.pool.workers.get(hb.node_id)
        if w is None:
            raise RemoteProtocolError(f"heartbeat of unknown {hb.node_id}", counter="unknown_peer")
        addr = w.spec.addresses.get(hb.channel)
        if addr is None or ipaddress.ip_address(addr) != ipaddress.ip_address(source):
            raise RemoteProtocolError(
                f"heartbeat of {hb.node_id} for {hb.channel} from {source}", counter="wrong_channel"
            )
        win = self._hb_windows.setdefault((hb.node_id, hb.channel), ReplayWindow())
        verdict = win.check_and_update(hb.incarnation, hb.seq)
        if verdict != "new":
            raise RemoteProtocolError(f"heartbeat {verdict}", counter="replay")
        if hb.type == MsgType.LEAVE:
            self.pool.leave(hb.node_id, now, "heartbeat LEAVE")
            return f"leave {hb.node_id}"
        self.pool.heard(hb.node_id, hb.channel, now)
        return f"heartbeat {hb.node_id}/{hb.channel}"

    def _registration(self, data: bytes, source: str, now: float) -> str:
        reg = decode_registration(data, self.key)
        win = self._reg_windows.setdefault(reg.worker, ReplayWindow())
        verdict = win.check_and_update(reg.incarnation, reg.seq)
        if verdict != "new":
            raise RemoteProtocolError(f"registration {verdict}", counter="replay")
        if source not in {str(ipaddress.ip_address(a)) for a in reg.addresses.values()}:
            raise RemoteProtocolError(
                f"registration of {reg.worker} from {source}, not one of its addresses",
                counter="wrong_channel",
            )
        if reg.type == RegType.LEAVE:
            self.pool.leave(reg.worker, now, "deregistered")
            return f"leave {reg.worker}"
        if not self.allow_join:
            raise RemoteProtocolError("registration is off", counter="refused")
        spec = WorkerSpec(
            id=reg.worker,
            addresses=dict(reg.addresses),
            port=reg.port,
            weight=reg.weight,
            rpc_port=reg.rpc_port,
            heartbeat=True,
        )
        w = self.pool.workers.get(reg.worker)
        if w is None or w.spec != spec or w.draining_since is not None:
            self.pool.add(spec, now, how="registration")
            return f"join {reg.worker}"
        return f"refresh {reg.worker}"


class Announcer:
    """The worker's side: the datagrams to send to one front (addresses per channel)."""

    def __init__(
        self,
        key: bytes,
        *,
        worker: str,
        addresses: dict[str, str],
        port: int,
        incarnation: int,
        weight: int = 1,
        rpc_port: int | None = None,
    ) -> None:
        self.key = key
        self.worker = worker
        self.addresses = dict(addresses)
        self.port = port
        self.weight = weight
        self.rpc_port = rpc_port
        self.incarnation = incarnation
        self._seq = 0
        self._hb_seq = 0

    def registration(self, kind: RegType, now: float) -> bytes:
        self._seq += 1
        reg = Registration(
            kind,
            self.worker,
            self.incarnation,
            self._seq,
            self.addresses,
            self.port,
            self.weight,
            self.rpc_port,
            int(now * 1e6),
        )
        return encode_registration(reg, self.key)

    def heartbeats(self, now: float, *, leave: bool = False) -> list[tuple[str, bytes]]:
        """One heartbeat per channel: (channel, datagram)."""
        self._hb_seq += 1
        out = []
        for ch in self.addresses:
            hb = Heartbeat(
                MsgType.LEAVE if leave else MsgType.HEARTBEAT,
                GROUP,
                self.worker,
                ch,
                self.incarnation,
                self._hb_seq,
                Role.BACKUP,
                0,
                0,
                int(now * 1e6),
                0,
                0,
            )
            out.append((ch, encode_heartbeat(hb, self.key)))
        return out
