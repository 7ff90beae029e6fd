"""EmbeddedStore against a real WitnessCore served over loopback UDP."""

from __future__ import annotations

import asyncio
import time

import pytest

from nonstop.failover.witness import WitnessCore
from nonstop.store.base import StoreUnavailable
from nonstop.store.embedded import EmbeddedStore

KEY = b"k" * 32


class _Serve(asyncio.DatagramProtocol):
    def __init__(self, core: WitnessCore) -> None:
        self.core = core

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        for dest, out in self.core.receive(data, addr, time.monotonic()):
            self.t.sendto(out, dest)  # type: ignore[attr-defined]


async def scenario() -> None:
    loop = asyncio.get_running_loop()
    core = WitnessCore(KEY, lease=0.3, now=time.monotonic(), grace=0.0)
    t, _ = await loop.create_datagram_endpoint(lambda: _Serve(core), local_addr=("127.0.0.1", 0))
    addr = t.get_extra_info("sockname")
    a = EmbeddedStore(KEY, node="a", group=1, incarnation=1, witness=addr, lease=0.3)
    b = EmbeddedStore(KEY, node="b", group=1, incarnation=1, witness=addr, lease=0.3)
    try:
        await a.open_session(0.3)
        assert await a.acquire("1") == 0  # free: granted
        assert await b.acquire("1") is None  # held by a: compare-and-set says no
        assert (await b.read()).groups["1"].holder == "a"
        ttl = await a.keepalive(time.monotonic() + 0.2)
        assert 0 < ttl <= 0.3
        await a.release("1", 0)
        await asyncio.sleep(0.05)
        assert await b.acquire("1") == 0  # released: b gets it at once
        with pytest.raises(StoreUnavailable):
            await a.keepalive(time.monotonic() + 0.2)
    finally:
        await a.close()
        await b.close()
        t.close()


def test_embedded_store_is_the_witness_lease() -> None:
    asyncio.run(scenario())
