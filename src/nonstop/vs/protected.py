"""The HTTP listener as a protected service: client connections survive the front master's death.

The listener opens with the prefixed socket API (``nonstop.app.aio.ns_listen``, the agent's
``[[services]]`` endpoint for VIP:port), so the node agent syncs each client connection to the
backup node and restores it there with TCP_REPAIR when this node dies. Per request:

1. read the request (peeked: it stays in the kernel until the commit);
2. a non-idempotent request is journaled as *in flight* before it goes to a worker;
3. forward it (``HttpProxy.handle``: retries on other workers, 502/503 as usual);
4. journal the response bytes to the standby front (``nonstop.vs.journal``) and wait for its Ack;
5. write the response, then ``commit(upto=end of the request)``: the commit's write position is
   the end of the response.

A standby front (on the backup node) waits in ``adopted()`` until its node is promoted, then serves
every restored connection from its last commit: for each request still in the receive queue, the
journal says what the dead front wrote at that write position: the same bytes are written again
(the client's TCP drops what it had and takes the rest); an in-flight mark means a non-idempotent
request reached a worker with no journaled answer: 502, not retried (nginx's choice); nothing
means no byte of an answer was written: the request is forwarded (it never reached a worker if it
is not idempotent). A journal that cannot tell (evicted, or a response written while no standby
was connected and the position is not covered) closes the connection rather than risk writing
bytes that differ from those the client already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from nonstop.app.aio import AsyncNsConn, AsyncNsListener
from nonstop.common import RemoteProtocolError, wait_readable
from nonstop.vs.http import RequestParser, error_response
from nonstop.vs.journal import ConnJournal, ConnKey, JournalGap, JournalLink, JournalStore
from nonstop.vs.proxy import HttpProxy, requests

log = logging.getLogger("nonstop.vs.protected")


class ProtectedHttp:
    def __init__(self, proxy: HttpProxy, listener: AsyncNsListener, *,
                 link: JournalLink | None, store: JournalStore | None,
                 commit_delay: float = 0.0,
                 reopen: Callable[[], Awaitable[AsyncNsListener]] | None = None,
                 ) -> None:  # fmt: skip
        self.proxy, self.listener, self.link, self.store = proxy, listener, link, store
        self.commit_delay = commit_delay
        self.reopen = reopen
        self.counters: Counter[str] = Counter()
        self.active = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._link_task: asyncio.Task[Any] | None = None

    async def run(self) -> None:
        """Adopt what the agent hands over (a standby waits here until its node is promoted),
        then accept. When the agent drops this front (its node stepped down: the connections
        here are silenced), serve again as a standby on a fresh listener (``reopen``)."""
        try:
            while True:
                try:
                    adopted = await self.listener.adopted()
                except (OSError, RemoteProtocolError) as e:
                    log.error("adoption failed: %s", e)
                    raise
                self.active = True
                self.counters["adopted"] += len(adopted)
                log.info("serving: adopted %d connections", len(adopted))
                if self.link is not None and self._link_task is None:
                    self._link_task = asyncio.ensure_future(self.link.run())
                for conn, _record in adopted:
                    self._spawn(self.serve(conn, adopted=True))
                self._spawn(self._accept())
                await self._agent_gone()
                self.active = False
                self.counters["dropped_by_agent"] += 1
                log.warning("the agent dropped this front (its node stepped down): standby again")
                await self._cancel_all()
                self.listener.close()
                if self.reopen is None:
                    return
                self.listener = await self.reopen()
        finally:
            await self._cancel_all()
            if self._link_task is not None:
                self._link_task.cancel()

    async def _accept(self) -> None:
        while True:
            conn = await self.listener.ns_accept()
            self._spawn(self.serve(conn, adopted=False))

    async def _agent_gone(self) -> None:
        """Returns when the agent closes its end of the channel (nothing else arrives on it
        once the adoption is over)."""
        agent = self.listener.agent
        if agent is None:
            await asyncio.Event().wait()
            return
        while True:
            await wait_readable(agent.sock)
            try:
                if agent.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return
            except BlockingIOError:
                continue
            except OSError:
                return
            await asyncio.sleep(0.1)  # unexpected bytes: not ours to read; look again later

    async def _cancel_all(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def stop_waiting(self) -> None:
        """Unblock a standby's adoption wait (the thread in ``adopted()``) before exiting."""
        if self.listener.agent is not None:
            with contextlib.suppress(OSError):
                self.listener.agent.sock.shutdown(socket.SHUT_RDWR)

    async def serve(self, conn: AsyncNsConn, *, adopted: bool) -> None:
        try:
            peer = conn.getpeername()
        except OSError:
            await conn.ns_close()
            return
        key: ConnKey = (self.listener.port, peer[0], peer[1])
        journal: ConnJournal | None = None
        if adopted:
            journal = self.store.take(key) if self.store is not None else None
            self.counters["adopted_with_journal" if journal else "adopted_without_journal"] += 1
        client = peer[0].encode()
        parser = RequestParser()
        try:
            async with contextlib.aclosing(
                requests(parser, conn.ns_recv, conn.ns_send, self.counters)
            ) as reqs:
                async for req in reqs:
                    rend = conn.delivered - parser.pending
                    wpos = conn.write_pos
                    out: bytes | None = None
                    keep = req.keep_alive
                    if journal is not None:
                        entry = journal.at(wpos, rend)  # JournalGap: ends the connection below
                        if entry is None:
                            journal = None  # nothing written here: from now on, a fresh stream
                        elif entry.inflight:
                            self.counters["inflight_not_retried"] += 1
                            msg = (f"{req.method.decode()} was in flight on the failed front; "
                                   "not idempotent, not retried")  # fmt: skip
                            out = error_response(502, msg, keep_alive=keep)
                            journal = None
                        else:
                            self.counters["replayed"] += 1
                            out = entry.data
                    if out is None:
                        if not req.idempotent and self.link is not None:
                            await self.link.record(key, wpos, rend, inflight=True)
                        out, keep = await self.proxy.handle(req, client)
                    if self.link is not None:
                        await self.link.record(key, wpos, rend, out)
                    await conn.ns_send(out)
                    if self.commit_delay:
                        await asyncio.sleep(self.commit_delay)
                    await conn.commit(upto=rend)
                    if not keep:
                        break
        except JournalGap as e:
            self.counters["journal_gap"] += 1
            log.warning("connection %s:%d closed: %s", peer[0], peer[1], e)
        except (ConnectionError, OSError) as e:
            self.counters["conn_errors"] += 1
            log.debug("connection %s:%d: %r", peer[0], peer[1], e)
        finally:
            if self.link is not None:
                self.link.closed(key)
            with contextlib.suppress(OSError):
                await conn.ns_close()
            conn.sock.close()  # also when the agent is gone and the CLOSE could not be sent
