"""EmbeddedStore: today's pair (heartbeats + witness) described through ``AbstractStore``.

The embedded default has no database: the witness (``nonstop witness``) keeps one lease per
group, granted to one node at a time, and that lease *is* the master key. So for a pair:

- session = this node's incarnation; ``keepalive`` = renew the witness lease (timing-critical,
  the same request the agent sends every heartbeat interval);
- ``acquire`` = ask for the lease: the witness grants it only if it is free, ours, or expired
  (compare-and-set by construction); ``release`` = give it back (``want=False``);
- ``read`` = who holds it, as the witness last answered; there are no revisions (the lease
  expiry plays their part) and no watch (the pair learns changes from heartbeats);
- switchover = the heartbeat ``FLAG_HANDOVER_REQUEST`` in ``nonstop agent``, not a store key.

Only a pair: a third node would need the witness to order more than two contenders, which is
what etcd is for. The real pair agent (``nonstop.agent.daemon``) drives the same sans-IO
``WitnessClient``; this adapter lets tools and tests see both backends through one interface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from nonstop.common import RemoteProtocolError
from nonstop.failover.witness import LeaseDenied, LeaseGranted, WitnessClient
from nonstop.store.base import AbstractStore, ClusterView, GroupRecord, StoreUnavailable


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.store._received(data)


class EmbeddedStore(AbstractStore):
    def __init__(
        self, key: bytes, *, node: str, group: int, incarnation: int,
        witness: tuple[str, int], lease: float, timeout: float = 0.5,
    ) -> None:  # fmt: skip
        self.node, self.group, self.witness = node, group, witness
        self.client = WitnessClient(key, group, node, incarnation, lease=lease)
        self.timeout = timeout
        self.session: int | None = None
        self._holder = ""
        self._until: float | None = None
        self._waiter: asyncio.Future[LeaseGranted | LeaseDenied] | None = None
        self._transport: asyncio.DatagramTransport | None = None

    def _received(self, data: bytes) -> None:
        try:
            reply = self.client.receive(data, time.monotonic())
        except RemoteProtocolError:
            return  # counted in client.counters
        if reply is not None and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    async def _ask(self, want: bool, deadline: float) -> LeaseGranted | LeaseDenied | None:
        loop = asyncio.get_running_loop()
        if self._transport is None:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(self), remote_addr=self.witness
            )
        self._waiter = loop.create_future()
        self._transport.sendto(self.client.request(time.monotonic(), want))
        if not want:
            return None
        try:
            return await asyncio.wait_for(self._waiter, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise StoreUnavailable(f"no answer from the witness at {self.witness}") from None

    # -- plain ------------------------------------------------------------------------------
    async def open_session(self, ttl: float) -> int:
        self.session = self.client.incarnation
        return self.session

    async def register_member(self) -> None:
        """Membership is the heartbeats' business in a pair: nothing to store."""

    async def read(self) -> ClusterView:
        now = time.monotonic()
        groups = {}
        if self._holder and (self._holder != self.node or (self._until or 0) > now):
            groups[str(self.group)] = GroupRecord(str(self.group), self._holder, 0, 0)
        return ClusterView(0, groups, {self.node: self.session or 0})

    async def watch(self) -> AsyncIterator[int]:  # type: ignore[override]
        raise StoreUnavailable("the embedded store has no watch: heartbeats carry changes")
        yield 0  # pragma: no cover - makes this an async generator

    async def request_switchover(self, group: str, target: str) -> None:
        raise StoreUnavailable("embedded: a switchover is a heartbeat handover request")

    # -- timing-critical ----------------------------------------------------------------------
    async def keepalive(self, deadline: float) -> float:
        reply = await self._ask(True, deadline)
        if isinstance(reply, LeaseGranted):
            self._holder, self._until = self.node, reply.until
            return max(0.0, reply.until - time.monotonic())
        assert isinstance(reply, LeaseDenied)
        self._holder, self._until = reply.holder, None
        raise StoreUnavailable(f"the witness lease is held by {reply.holder or 'nobody yet'}")

    # -- compare-and-set ----------------------------------------------------------------------
    async def acquire(self, group: str) -> int | None:
        try:
            await self.keepalive(time.monotonic() + self.timeout)
        except StoreUnavailable:
            if self._holder and self._holder != self.node:
                return None
            raise
        return 0

    async def release(self, group: str, revision: int) -> bool:
        await self._ask(False, time.monotonic())
        self._holder, self._until = "", None
        return True

    async def clear_switchover(self, group: str, revision: int) -> bool:
        return False

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
