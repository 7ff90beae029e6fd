"""An agent's asyncio side of the session worker: the plumbing the pair agent
(:mod:`nonstop.agent.sessions`) and the groups agent (:mod:`nonstop.store.sessions`) share.

Nothing here blocks the agent's loop: a request is sent at once and its reply read by
``loop.add_reader``, in order (the worker answers in order); a reply-less request
(``"reply": False``) is fire-and-forget. A worker that does not read its requests (busy: its
socket is full) gets the next ones queued here, in order, sent when it reads again; past
``MAX_QUEUED`` a request fails at once (its callback gets None). When the worker dies, every
waiting callback gets None and ``on_exit`` runs. Subclasses say what the worker runs
(``specs()``) and what to ask.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from nonstop.common import LocalProtocolError
from nonstop.session.worker import SessionWorker

log = logging.getLogger("nonstop.sessions")

Reply = dict[str, Any]
MAX_QUEUED = 256  # requests waiting for a busy worker to read; more fail at once


class WorkerDriver:
    def __init__(self, key: bytes, *, verbose: int = 0) -> None:
        self._key, self._verbose = key, verbose
        self.worker: SessionWorker | None = None
        self._waiting: collections.deque[Callable[[Reply | None], None]] = collections.deque()
        self._on_exit: Callable[[], None] | None = None
        self.counters: dict[str, int] = {"promote_errors": 0, "worker_errors": 0,
                                         "worker_backlog": 0, "worker_backlog_refused": 0}
        self.cached: list[dict[str, Any]] = []  # the last status the worker gave
        # requests the worker's full socket did not take yet, oldest first
        self._queued: collections.deque[dict[str, Any]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def specs(self) -> list[dict[str, Any]]:
        """The worker's services (``ServiceSpec`` fields); none: no worker is started."""
        raise NotImplementedError

    # -- lifecycle --
    def start(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
        specs = self.specs()
        if not specs:
            return
        self.worker = SessionWorker.spawn(specs, self._key, verbose=self._verbose)
        self._on_exit = on_exit
        self._loop = loop
        loop.add_reader(self.worker.fileno(), self._readable)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.worker is None:
            return
        loop.remove_reader(self.worker.fileno())
        self._stop_writing()
        self._fail_waiting()
        self.worker.close()  # silences what it holds
        self.worker = None

    # -- requests --
    def _send(self, req: dict[str, Any], done: Callable[[Reply | None], None] | None) -> bool:
        if self.worker is None:
            return False
        if done is None:
            req = {**req, "reply": False}
        if self._queued:  # behind those already waiting: the worker answers in order
            if len(self._queued) >= MAX_QUEUED:
                self.counters["worker_errors"] += 1
                self.counters["worker_backlog_refused"] += 1
                if self.counters["worker_backlog_refused"] == 1:
                    log.error("session worker: %d requests wait for it to read: %s refused",
                              len(self._queued), req["op"])  # fmt: skip
                return False
            self._queued.append(req)
        else:
            try:
                if not self.worker.send(req):
                    self._queued.append(req)
                    self.counters["worker_backlog"] += 1
                    if self._loop is not None:
                        self._loop.add_writer(self.worker.fileno(), self._writable)
            except LocalProtocolError as e:
                self.counters["worker_errors"] += 1
                log.error("%s", e)
                return False
        if done is not None:
            self._waiting.append(done)
        return True

    def _writable(self) -> None:
        """The worker reads again: send what waits, in order."""
        try:
            while self._queued and self.worker is not None:
                if not self.worker.send(self._queued[0]):
                    return
                self._queued.popleft()
        except LocalProtocolError as e:  # the worker is gone: the reader sees EOF
            self.counters["worker_errors"] += 1
            log.error("%s", e)
            self._queued.clear()
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._loop is not None and self.worker is not None:
            self._loop.remove_writer(self.worker.fileno())

    def _readable(self) -> None:
        assert self.worker is not None
        replies = self.worker.read_replies()
        if replies is None:  # EOF: the worker died
            asyncio.get_running_loop().remove_reader(self.worker.fileno())
            self._stop_writing()
            self._queued.clear()
            self._fail_waiting()
            self.worker = None
            if self._on_exit is not None:
                self._on_exit()
            return
        for r in replies:
            if not self._waiting:
                log.error("session worker: unexpected reply %r", r)
                continue
            cb = self._waiting.popleft()
            if not r.get("ok"):
                self.counters["worker_errors"] += 1
                log.error("session worker: %s", r.get("error"))
                r = None
            cb(r)

    def _fail_waiting(self) -> None:
        while self._waiting:
            self._waiting.popleft()(None)

    async def refresh(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Ask the worker for its status (``cached`` keeps the answer)."""
        fut: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()

        def on_reply(r: Reply | None) -> None:
            if not fut.done():
                fut.set_result(r)

        if self._send({"op": "status"}, on_reply):
            try:
                r = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                r = None
            if r is not None:
                self.cached = r["services"]
        return self.cached
