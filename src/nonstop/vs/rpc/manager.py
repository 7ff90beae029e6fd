"""The manager node's RPC listener (seed 003): runs each client call in a fault-tolerance mode
over the pool's workers and replies with the result, the mode it used and why.

- primary/backup: the call goes to one worker; if it crashes, times out or its link drops, the
  same call goes to the next one (up to every usable worker).
- NVP: the call goes to 3 workers at once; a strict majority of equal results wins; a clear error
  without one.
- DRB: the primary variant on the primary node and the alternate variant on the alternate node,
  at once; the acceptance test picks; roles swap after the primary fails.
- auto: :func:`~nonstop.vs.rpc.core.choose_mode` from the usable workers, the recent fault rate,
  the call's reliability and deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from nonstop.vs.pool import Pool, Worker
from nonstop.vs.rpc.client import ConnectionLost, RpcConnection
from nonstop.vs.rpc.core import (
    DRB,
    NVP,
    DrbPair,
    FaultRate,
    NoMajority,
    choose_mode,
    drb_pick,
    vote,
)
from nonstop.vs.rpc.frame import Call, Reply, canonical
from nonstop.vs.rpc.stream import serve_calls

log = logging.getLogger("nonstop.vs.rpc")
NVP_N = 3
DEFAULT_TIMEOUT = 5.0


class RpcFront:
    def __init__(self, pool: Pool, *, worker_port: int | None = None) -> None:
        self.pool = pool
        self.worker_port = worker_port
        self.links: dict[str, RpcConnection] = {}
        self.faults = FaultRate()
        self.latency_ms = 0.0
        self.drb = DrbPair()
        self.counters: Counter[str] = Counter()
        self.last_mode = ""

    # -- client side ----------------------------------------------------------------------------
    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_calls(
            reader, writer, self.handle, refuse="the front only takes calls", counters=self.counters
        )

    async def handle(self, call: Call) -> Reply:
        now = time.monotonic()
        usable = [w for w in self.pool.usable() if (self.worker_port or w.spec.rpc_port)]
        try:
            d = choose_mode(
                available=len(usable),
                fault_rate=self.faults.value(now),
                reliability=call.reliability,
                deadline_ms=call.deadline_ms,
                latency_ms=self.latency_ms,
                requested=call.mode,
            )
        except NoMajority as e:
            self.counters["refused"] += 1
            return Reply(call.id, False, error=e.reason, mode="none", reason=e.reason)
        self.counters[d.mode] += 1
        if d.mode != self.last_mode:
            log.info("rpc mode %s: %s", d.mode, d.reason)
            self.last_mode = d.mode
        timeout = call.deadline_ms / 1000 if call.deadline_ms else DEFAULT_TIMEOUT
        try:
            async with asyncio.timeout(timeout):
                if d.mode == NVP:
                    value, workers, note = await self._nvp(call, usable)
                elif d.mode == DRB:
                    value, workers, note = await self._drb(call, usable)
                else:
                    value, workers, note = await self._pb(call, usable)
        except (NoMajority, _AppError) as e:
            self.counters["failed"] += 1
            return Reply(call.id, False, error=str(e), mode=d.mode, reason=d.reason)
        except TimeoutError:
            self.counters["failed"] += 1
            err = f"deadline of {timeout * 1000:.0f} ms passed"
            return Reply(call.id, False, error=err, mode=d.mode, reason=d.reason)
        reason = d.reason + (f"; {note}" if note else "")
        return Reply(call.id, True, value, mode=d.mode, reason=reason, workers=workers)

    # -- worker calls ---------------------------------------------------------------------------
    def _link(self, w: Worker) -> RpcConnection:
        addr = self.pool.address(w, time.monotonic())
        port = self.worker_port or w.spec.rpc_port
        assert port is not None
        link = self.links.get(w.id)
        if link is None or (link.host, link.port) != (addr, port):
            link = self.links[w.id] = RpcConnection(addr, port, connect_timeout=0.5)
        return link

    async def _one(self, w: Worker, call: Call, variant: str = "primary") -> Reply:
        """One call to one worker; ConnectionLost/TimeoutError when the worker failed."""
        t0 = time.monotonic()
        self.pool.acquire(w)
        try:
            reply = await self._link(w).call(call.method, *call.args, variant=variant, timeout=None)
        except ConnectionLost as e:
            self.pool.report_failure(w.id, time.monotonic(), e.reason)
            raise
        finally:
            self.pool.release(w, time.monotonic())
        ms = (time.monotonic() - t0) * 1000
        self.latency_ms = ms if not self.latency_ms else 0.8 * self.latency_ms + 0.2 * ms
        self.pool.report_success(w.id)
        return reply

    async def _pb(self, call: Call, usable: list[Worker]) -> tuple[Any, list[str], str]:
        usable_ids = {w.id for w in usable}
        tried: list[str] = [wid for wid in self.pool.workers if wid not in usable_ids]
        failures: list[str] = []
        while True:
            w = self.pool.pick(exclude=tried)
            if w is None:
                break
            tried.append(w.id)
            try:
                reply = await self._one(w, call)
            except ConnectionLost as e:
                failures.append(f"{w.id}: {e.reason}")
                self.faults.record(True, time.monotonic())
                continue
            self.faults.record(bool(failures), time.monotonic())
            if not reply.ok:
                raise _AppError(f"{w.id}: {reply.error}")
            note = f"backup {w.id} answered after {'; '.join(failures)}" if failures else ""
            return reply.value, [w.id], note
        raise NoMajority("every worker failed: " + ("; ".join(failures) or "none usable"))

    async def _nvp(self, call: Call, usable: list[Worker]) -> tuple[Any, list[str], str]:
        chosen = usable[:NVP_N]
        replies = await asyncio.gather(
            *(self._one(w, call) for w in chosen), return_exceptions=True
        )
        results: dict[str, Any] = {}
        for w, r in zip(chosen, replies, strict=True):
            if isinstance(r, BaseException):
                results[w.id] = ("error", getattr(r, "reason", None) or type(r).__name__)
            elif not r.ok:
                results[w.id] = ("error", r.error)
            else:
                results[w.id] = ("ok", canonical(r.value), r.value)
        try:
            v = vote(results, len(chosen))
        except NoMajority:
            self.faults.record(True, time.monotonic())
            raise
        self.faults.record(bool(v.disagree), time.monotonic())
        note = f"outvoted {', '.join(v.disagree)}" if v.disagree else ""
        return v.value, list(v.agree), note

    async def _drb(self, call: Call, usable: list[Worker]) -> tuple[Any, list[str], str]:
        by_id = {w.id: w for w in usable}
        p, a = self.drb.assign(list(by_id))
        rp, ra = await asyncio.gather(
            self._one(by_id[p], call, "primary"),
            self._one(by_id[a], call, "alternate"),
            return_exceptions=True,
        )
        side = [_side(rp), _side(ra)]
        try:
            out = drb_pick(side[0], side[1])
        except NoMajority:
            self.faults.record(True, time.monotonic())
            self.drb.outcome(True)
            raise
        self.faults.record(out.primary_failed, time.monotonic())
        swapped = self.drb.outcome(out.primary_failed)
        used = p if out.used == "primary" else a
        note = f"{out.used} on {used}" + (f"; {swapped}" if swapped else "")
        return out.value, [used], note

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()


class _AppError(Exception):
    """The method itself raised on the worker: not a worker fault, not retried."""


def _side(r: Reply | BaseException) -> tuple[bool, bool, Any, str]:
    if isinstance(r, BaseException):
        return False, False, None, getattr(r, "reason", None) or type(r).__name__
    return r.ok, r.accepted, r.value, r.error
