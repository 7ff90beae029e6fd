"""The worker's RPC API: methods registered with ``@rpc.method``; ``await rpc.serve(host, port)``.

    rpc = RpcWorker()

    @rpc.method(alternate=slow_but_simple_sqrt, accept=lambda args, r: abs(r * r - args[0]) < 1e-6)
    def sqrt(x): ...

A method may be sync or async. ``alternate`` is the second version DRB runs on the alternate node;
``accept(args, result) -> bool`` is the acceptance test (both versions are checked with it).
A malformed frame gets one error Reply (id 0) and the connection is closed; the worker goes on.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nonstop.common import RemoteProtocolError
from nonstop.vs.rpc.frame import Call, FrameDecoder, Reply, encode


@dataclass(frozen=True, slots=True)
class Method:
    primary: Callable[..., Any]
    alternate: Callable[..., Any] | None
    accept: Callable[[list[Any], Any], bool] | None


class RpcWorker:
    def __init__(self, name: str = "worker") -> None:
        self.name = name
        self.methods: dict[str, Method] = {}
        self.counters: Counter[str] = Counter()

    def method(
        self,
        name: str | None = None,
        *,
        alternate: Callable[..., Any] | None = None,
        accept: Callable[[list[Any], Any], bool] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.methods[name or fn.__name__] = Method(fn, alternate, accept)
            return fn

        return deco

    async def run_call(self, call: Call) -> Reply:
        m = self.methods.get(call.method)
        if m is None:
            return Reply(call.id, False, error=f"no method {call.method!r}", workers=[self.name])
        fn = m.alternate if call.variant == "alternate" and m.alternate is not None else m.primary
        try:
            value = fn(*call.args)
            if inspect.isawaitable(value):
                value = await value
            accepted = True if m.accept is None else bool(m.accept(call.args, value))
        except Exception as e:
            self.counters["errors"] += 1
            return Reply(call.id, False, error=f"{type(e).__name__}: {e}", workers=[self.name])
        self.counters["calls"] += 1
        return Reply(call.id, True, value, workers=[self.name], accepted=accepted)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        tasks: set[asyncio.Task[None]] = set()

        async def one(call: Call) -> None:
            reply = await self.run_call(call)
            if not writer.is_closing():
                writer.write(encode(reply))

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                dec.feed(data)
                try:
                    while (f := dec.next_frame()) is not None:
                        if not isinstance(f, Call):
                            raise RemoteProtocolError(
                                "a worker only takes calls", counter="bad_frame"
                            )
                        t = asyncio.ensure_future(one(f))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                except RemoteProtocolError as e:
                    self.counters["bad_frame"] += 1
                    writer.write(encode(Reply(0, False, error=e.reason, workers=[self.name])))
                    break
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, reuse_address=True)
