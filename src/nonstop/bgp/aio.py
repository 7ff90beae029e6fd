"""asyncio adapter around the sans-IO :class:`Speaker`: TCP (with RFC 2385 TCP-MD5), one re-armed
timer, optional kernel route install, and the operator API (api.py) on a unix socket.

The adapter owns no protocol logic: it moves bytes between sockets and the speaker, calls
``speaker.timer(now)`` at ``speaker.next_deadline()``, and does what the events ask
(ConnectRequested -> connect, DisconnectRequested -> close).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from nonstop.bgp.config import PeerConfig, SpeakerConfig
from nonstop.bgp.fsm import ConnectRequested, DisconnectRequested, SessionClosed, StateChanged
from nonstop.bgp.speaker import PeerEvent, Speaker
from nonstop.bgp.wire import IPV4_UNICAST

log = logging.getLogger("nonstop.bgp")
TCP_MD5SIG = 14


def md5_option(address: str, password: str) -> bytes:
    """struct tcp_md5sig for ``address`` (RFC 2385 key for that peer)."""
    ip = ipaddress.ip_address(address)
    if ip.version == 4:
        ss = struct.pack("=H", socket.AF_INET) + b"\0\0" + ip.packed
    else:
        ss = struct.pack("=H", socket.AF_INET6) + b"\0\0" + b"\0" * 4 + ip.packed
    key = password.encode()
    return struct.pack("=128sBBHI80s", ss, 0, 0, len(key), 0, key)


def set_md5(sock: socket.socket, address: str, password: str) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, md5_option(address, password))


class _Conn(asyncio.Protocol):
    def __init__(self, svc: SpeakerService, peer: str | None) -> None:
        self.svc = svc
        self.peer = peer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.peer is None:  # accepted: find the peer by its address
            remote = transport.get_extra_info("peername")[0]
            self.peer = self.svc.peer_by_address(remote)
            if self.peer is None or not self.svc.accept(self.peer, self):
                log.info("refusing connection from %s", remote)
                transport.close()
                self.peer = None
                return
        self.svc.attach(self.peer, self)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.svc.conns.get(self.peer) is self:
            self.svc.on_data(self.peer, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.svc.conns.get(self.peer) is self:
            self.svc.on_lost(self.peer)


class SpeakerService:
    """Runs a speaker: ``await svc.start()`` ... ``await svc.close()``."""

    def __init__(self, cfg: SpeakerConfig, *, speaker: Speaker | None = None,
                 on_event: Callable[[PeerEvent], None] | None = None) -> None:
        self.cfg = cfg
        self.speaker = speaker or Speaker(cfg)
        self.conns: dict[str, _Conn] = {}
        self.server: asyncio.base_events.Server | None = None
        self.api_runner: Any = None
        self.on_event = on_event
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.started = time.monotonic()
        self.fib = None
        self.counters: dict[str, int] = {}
        if cfg.kernel_table:
            from nonstop.bgp.fib import Fib

            self.fib = Fib(cfg.kernel_table)
            self.speaker.fib_dirty = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return time.monotonic()

    def peer_by_address(self, addr: str) -> str | None:
        a = ipaddress.ip_address(addr.split("%")[0])
        if a.version == 6 and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        for p in self.cfg.peers:
            if ipaddress.ip_address(p.address) == a:
                return p.name
        return None

    async def start(self, *, api: bool = True) -> None:
        if self.cfg.listen is not None:
            fam = socket.AF_INET6 if ":" in self.cfg.listen else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for p in self.cfg.peers:
                if p.md5_password:
                    set_md5(s, p.address, p.md5_password)
            s.bind((self.cfg.listen, self.cfg.port))
            s.listen(16)
            s.setblocking(False)
            self.server = await self.loop.create_server(lambda: _Conn(self, None), sock=s)
        if api:
            from nonstop.bgp.api import start_api

            self.api_runner = await start_api(self, self.cfg.api_socket)
        self._dispatch(self.speaker.start(self.now()))

    async def close(self) -> None:
        self._closing = True
        self._dispatch(self.speaker.stop(self.now()))
        for c in list(self.conns.values()):
            if c.transport is not None:
                c.transport.close()
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.server is not None:
            self.server.close()
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        if self.fib is not None:
            self.fib.close()

    # -- connections -------------------------------------------------------------------------------

    def accept(self, peer: str, conn: _Conn) -> bool:
        cur = self.conns.get(peer)
        if cur is not None and cur is not conn:
            return False  # one connection per peer (fsm.py: no collision detection)
        return self.speaker.peers[peer].session.state.name in ("CONNECT", "ACTIVE")

    def attach(self, peer: str, conn: _Conn) -> None:
        self.conns[peer] = conn
        assert conn.transport is not None
        local = conn.transport.get_extra_info("sockname")[0]
        self._dispatch(self.speaker.connection_made(peer, self.now(), local))

    def on_data(self, peer: str, data: bytes) -> None:
        self._dispatch(self.speaker.receive_data(peer, data, self.now()))

    def on_lost(self, peer: str) -> None:
        self.conns.pop(peer, None)
        if not self._closing:
            self._dispatch(self.speaker.connection_lost(peer, self.now()))

    async def _connect(self, pc: PeerConfig) -> None:
        fam = socket.AF_INET6 if ":" in pc.address else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            if pc.md5_password:
                set_md5(s, pc.address, pc.md5_password)
            if self.cfg.listen is not None and (":" in self.cfg.listen) == (fam ==
                                                                          socket.AF_INET6):
                s.bind((self.cfg.listen, 0))
            await asyncio.wait_for(self.loop.sock_connect(s, (pc.address, pc.port)),
                                   pc.connect_retry)
        except (OSError, TimeoutError) as e:
            s.close()
            log.debug("connect to %s failed: %s", pc.name, e)
            return  # the connect-retry timer asks again
        if pc.name in self.conns or self._closing:
            s.close()
            return
        await self.loop.create_connection(lambda: _Conn(self, pc.name), sock=s)

    # -- events and output -------------------------------------------------------------------------

    def _dispatch(self, events: list[PeerEvent]) -> None:
        for pe in events:
            e = pe.event
            if isinstance(e, ConnectRequested) and not self._closing:
                t = self.loop.create_task(self._connect(self.speaker.peers[pe.peer].cfg))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            elif isinstance(e, StateChanged):
                log.info("%s: %s -> %s (%s)", pe.peer, e.old, e.new, e.reason)
            elif isinstance(e, SessionClosed):
                self.counters["session_closed"] = self.counters.get("session_closed", 0) + 1
            if self.on_event is not None:
                self.on_event(pe)
        self._flush()
        for pe in events:
            if isinstance(pe.event, DisconnectRequested):
                c = self.conns.pop(pe.peer, None)
                if c is not None and c.transport is not None:
                    c.transport.close()
        if self.fib is not None and self.speaker.fib_dirty:
            self.fib.apply(self.speaker)
        self._arm()

    def _flush(self) -> None:
        for name, c in self.conns.items():
            data = self.speaker.data_to_send(name)
            if data and c.transport is not None:
                c.transport.write(data)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        d = self.speaker.next_deadline()
        if d is not None and not self._closing:
            # time.monotonic() and loop.time() are the same clock on Linux
            self._timer = self.loop.call_at(d, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._dispatch(self.speaker.timer(self.now()))

    # -- views (api.py) ----------------------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        now = self.now()
        out = []
        for p in self.speaker.by_index:
            s = p.session
            out.append({
                "peer": p.name,
                "address": p.cfg.address,
                "asn": p.cfg.asn,
                "state": str(s.state),
                "since_s": round(now - s.established_at, 3) if s.established_at else None,
                "hold_time": s.hold_time,
                "prefixes_received": {f"ipv{4 if f == IPV4_UNICAST else 6}": len(v)
                                      for f, v in p.adj_in.items()},
                "prefixes_sent": {f"ipv{4 if f == IPV4_UNICAST else 6}": len(v)
                                  for f, v in p.adj_out.items()},
                "rx_position": s.rx_position,
                "tx_position": s.tx_position,
                "counters": dict(sorted(s.counters.items())),
                "last_error": s.last_error,
                "md5": bool(p.cfg.md5_password),
            })
        return out


async def run(cfg: SpeakerConfig) -> None:
    """``nonstop bgp speaker``: run until SIGINT/SIGTERM."""
    import signal

    svc = SpeakerService(cfg)
    await svc.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await svc.close()
