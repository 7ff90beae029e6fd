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

from nonstop.vs.rpc.frame import Call, Reply
from nonstop.vs.rpc.stream import serve_calls


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
        await serve_calls(
            reader, writer, self.run_call, refuse="a worker only takes calls",
            counters=self.counters, workers=[self.name],
        )  # fmt: skip

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, reuse_address=True)
