"""The front daemon: listeners (HTTP, TCP, RPC), worker control, health, reload, status.

``Front(cfg, key).run()`` owns every task it starts and cancels them on exit (uvicorn's shape).
SIGHUP reloads the config file (workers added, changed and drained; listeners stay); SIGTERM and
SIGINT stop. Listeners bind with IP_FREEBIND, so both nodes of an HA pair can listen on the VIP
while only the master holds it (the agent moves the VIP; see docs/vs.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections import Counter
from typing import Any

from nonstop.common import RemoteProtocolError
from nonstop.vs.config import ListenerConfig, VsConfig, load_vs_config, split_hostport
from nonstop.vs.control import ControlReceiver
from nonstop.vs.health import HealthChecker
from nonstop.vs.http import RequestParser, error_response
from nonstop.vs.journal import JournalLink, JournalServer, JournalStore
from nonstop.vs.l4 import relay
from nonstop.vs.pool import (
    Pool,
    WorkerJoined,
    WorkerRemoved,
    WorkerStateChanged,
)
from nonstop.vs.proxy import HttpProxy, ProxySettings

log = logging.getLogger("nonstop.vs")
IP_FREEBIND = 15


def make_listener(
    host: str, port: int, *, freebind: bool, reuseport: bool = False
) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if freebind:
            level = socket.IPPROTO_IPV6 if fam == socket.AF_INET6 else socket.IPPROTO_IP
            s.setsockopt(level, IP_FREEBIND, 1)
        s.bind((host, port))
        s.listen(4096)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class _Control(asyncio.DatagramProtocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.seen: set[str] = set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            what = self.front.control.receive(data, addr[0], time.monotonic())
        except RemoteProtocolError as e:
            if e.counter not in self.seen:  # logged once per kind
                self.seen.add(e.counter)
                log.warning("control datagram from %s dropped: %s", addr[0], e.reason)
            return
        if not what.startswith(("heartbeat", "refresh")):  # a heartbeat updates the pool itself
            log.info("control: %s", what)
            self.front.wake()


class Front:
    def __init__(self, cfg: VsConfig, key: bytes, *, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.key = key
        self.config_path = config_path
        self.pool = Pool(cfg.pool_config())
        now = time.monotonic()
        self.pool.sync(cfg.worker_specs(), now)
        self.control = ControlReceiver(self.pool, key, allow_join=cfg.front.registration)
        self.proxies: dict[str, HttpProxy] = {}
        self.counters: Counter[str] = Counter()
        self.rpc: dict[str, Any] = {}
        self.protected: dict[str, Any] = {}  # name -> ProtectedHttp
        f = cfg.front
        self.journal = JournalStore(keep=f.journal_keep_ms / 1000)
        self.journal_server = JournalServer(self.journal, key)
        self.journal_link: JournalLink | None = None
        if f.journal_peer:
            peer = split_hostport("<front>", "front.journal_peer", f.journal_peer)
            self.journal_link = JournalLink(peer, key, timeout=f.journal_timeout_ms / 1000)
        self.health = HealthChecker(self.pool, cfg.health)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._socks: list[socket.socket] = []
        self._closers: list[Any] = []
        self._wake: asyncio.Event | None = None
        self._stop: asyncio.Event | None = None
        self.ready: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake, self._stop, self.ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
        transport = None
        try:
            host, port = split_hostport("<front>", "front.control", self.cfg.front.control)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Control(self), local_addr=(host, port)
            )
            for ls in self.cfg.listeners:
                await self._start_listener(ls)
            if self.cfg.front.journal_listen:
                jl = self.cfg.front.journal_listen
                jh, jp = split_hostport("<front>", "front.journal_listen", jl)
                self._servers.append(await asyncio.start_server(self.journal_server.serve, jh, jp))
            if self.cfg.front.admin:
                ah, ap = split_hostport("<front>", "front.admin", self.cfg.front.admin)
                self._servers.append(await asyncio.start_server(self._admin, ah, ap))
            self._spawn(self._timer())
            self._spawn(self.health.run())
            for sig, fn in ((signal.SIGHUP, self.reload), (signal.SIGTERM, self._stop.set)):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, fn)
            self.ready.set()
            log.info("front up: %s", ", ".join(f"{s.mode} {s.listen}" for s in self.cfg.listeners))
            await self._stop.wait()
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
            for ph in self.protected.values():
                ph.stop_waiting()
            for srv in self._servers:
                srv.close()
            for s in self._socks:
                s.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for p in self.proxies.values():
                p.close()
            for fn in self._closers:
                with contextlib.suppress(Exception):
                    fn()
            if self.journal_link is not None:
                self.journal_link.close()
            if transport is not None:
                transport.close()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task[Any]) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("task failed: %r", t.exception(), exc_info=t.exception())

    def reload(self) -> None:
        if not self.config_path:
            return
        try:
            cfg, key = load_vs_config(self.config_path)
        except Exception as e:
            log.error("reload refused: %s", e)
            return
        self.cfg, self.key, self.control.key = cfg, key, key
        self.health.cfg = cfg.health
        self.pool.sync(cfg.worker_specs(), time.monotonic())
        log.info("config reloaded: %d workers in the config", len(cfg.workers))
        self.wake()

    # -- listeners ------------------------------------------------------------------------------
    async def _start_listener(self, ls: ListenerConfig) -> None:
        host, port = split_hostport("<front>", "listen", ls.listen)
        f = self.cfg.front
        if ls.mode != "http":
            sock = make_listener(host, port, freebind=self.cfg.front.freebind)
        if ls.mode == "http":
            proxy = HttpProxy(
                self.pool,
                ProxySettings(
                    retries=f.retries,
                    connect_timeout=f.connect_timeout_ms / 1000,
                    response_timeout=f.response_timeout_ms / 1000,
                    idle_per_worker=f.idle_per_worker,
                    worker_port=ls.worker_port,
                    policy=ls.policy,
                ),
            )
            self.proxies[ls.name] = proxy
            if ls.agent is not None:
                await self._start_protected(ls, proxy, host, port)
            else:
                sock = make_listener(host, port, freebind=self.cfg.front.freebind)
                self._servers.append(await asyncio.start_server(proxy.serve, sock=sock))
        elif ls.mode == "tcp":
            self._socks.append(sock)
            self._spawn(self._l4_accept(sock, ls))
        else:
            from nonstop.vs.rpc.manager import RpcFront

            front = RpcFront(self.pool, worker_port=ls.worker_port)
            self.rpc[ls.name] = front
            self._servers.append(await asyncio.start_server(front.serve, sock=sock))

    async def _start_protected(
        self, ls: ListenerConfig, proxy: HttpProxy, host: str, port: int
    ) -> None:
        from nonstop.app.aio import ns_listen
        from nonstop.vs.protected import ProtectedHttp

        agent = ls.agent
        assert agent is not None

        async def reopen() -> Any:
            # replay: after an adoption it writes its journaled response again from the
            # commit; the bytes the kernel already holds (written after it) are skipped
            return await ns_listen(host, port, agent=agent, backlog=4096, replay=True)

        ph = ProtectedHttp(proxy, await reopen(), link=self.journal_link, store=self.journal,
                           commit_delay=self.cfg.front.test_commit_delay_ms / 1000,
                           reopen=reopen)  # fmt: skip
        self.protected[ls.name] = ph
        self._spawn(ph.run())
        self._closers.append(lambda: ph.listener.close())

    async def _l4_accept(self, lsock: socket.socket, ls: ListenerConfig) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(lsock)
            self._spawn(self._l4_conn(conn, addr, ls))

    async def _l4_conn(self, client: socket.socket, addr: Any, ls: ListenerConfig) -> None:
        loop = asyncio.get_running_loop()
        f = self.cfg.front
        tried: list[str] = []
        upstream = None
        worker = None
        try:
            for _ in range(f.retries + 1):
                worker = self.pool.pick(key=addr[0].encode(), exclude=tried, policy=ls.policy)
                if worker is None:
                    break
                waddr = self.pool.address(worker, time.monotonic())
                fam = socket.AF_INET6 if ":" in waddr else socket.AF_INET
                up = socket.socket(fam, socket.SOCK_STREAM)
                up.setblocking(False)
                try:
                    async with asyncio.timeout(f.connect_timeout_ms / 1000):
                        await loop.sock_connect(up, (waddr, ls.worker_port or worker.spec.port))
                except (OSError, TimeoutError) as e:
                    up.close()
                    self.pool.report_failure(worker.id, time.monotonic(), f"connect: {e}")
                    tried.append(worker.id)
                    self.counters["l4_connect_failures"] += 1
                    continue
                upstream = up
                break
            if upstream is None or worker is None:
                self.counters["l4_no_worker"] += 1
                return
            self.counters["l4_connections"] += 1
            self.pool.acquire(worker)
            try:
                await relay(client, upstream, splice=f.splice)
            except OSError as e:
                self.counters["l4_errors"] += 1
                log.debug("l4 relay %s: %s", addr, e)
            finally:
                self.pool.release(worker, time.monotonic())
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    # -- state ----------------------------------------------------------------------------------
    async def _timer(self) -> None:
        assert self._wake is not None
        while True:
            now = time.monotonic()
            self.pool.handle_timer(now)
            while (ev := self.pool.next_event()) is not None:
                self._log_event(ev)
            delay = min(self.pool.get_timer(now) - now, self.pool.config.dead_interval / 3)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(delay, 0.001)):
                    await self._wake.wait()

    def _log_event(self, ev: WorkerStateChanged | WorkerJoined | WorkerRemoved) -> None:
        if isinstance(ev, WorkerStateChanged):
            log.info("worker %s: %s -> %s: %s", ev.worker, ev.old, ev.new, ev.reason)
            if ev.new not in ("up", "degraded"):
                for p in self.proxies.values():
                    p.drop_worker(ev.worker)
        elif isinstance(ev, WorkerJoined):
            log.info("worker %s joined (%s)", ev.worker, ev.how)
        else:
            log.info("worker %s removed: %s", ev.worker, ev.reason)
            for p in self.proxies.values():
                p.drop_worker(ev.worker)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "workers": [
                {
                    "id": w.id,
                    "state": w.state,
                    "how": w.how,
                    "address": self.pool.address(w, now),
                    "in_flight": w.conns,
                    "weight": w.spec.weight,
                }
                for w in self.pool.workers.values()
            ],
            "stations": [
                {
                    "worker": r.worker,
                    "channel": r.channel,
                    "address": r.address,
                    "state": r.state,
                    "last_heard_ms": None if r.last_heard is None else round(r.last_heard * 1e3, 1),
                }
                for r in self.pool.table(now)
            ],
            "counters": {
                "front": dict(self.counters),
                "control": dict(self.control.counters),
                **{f"http.{n}": dict(p.counters) for n, p in self.proxies.items()},
                **{f"rpc.{n}": dict(r.counters) for n, r in self.rpc.items()},
                **{f"protected.{n}": dict(p.counters) for n, p in self.protected.items()},
                "journal_store": dict(self.journal.counters),
                "journal_server": dict(self.journal_server.counters),
                "journal_link": dict(self.journal_link.counters) if self.journal_link else {},
            },
            "active": {n: p.active for n, p in self.protected.items()},
            "journaled_responses": len(self.journal),
        }

    async def _admin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        p = RequestParser()
        try:
            while (req := p.next_request()) is None:
                data = await reader.read(65536)
                if not data:
                    return
                p.feed(data)
            if req.target != b"/status":
                writer.write(error_response(404, "try /status"))
            else:
                body = json.dumps(self.status()).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            await writer.drain()
        except RemoteProtocolError as e:
            writer.write(error_response(400, e.reason))
        except OSError:
            pass
        finally:
            writer.close()
