"""asyncio adapter around the sans-IO :class:`Speaker`: TCP (with RFC 2385 TCP-MD5), one re-armed
timer, optional kernel route install, and the operator API (api.py) on a unix socket.

The adapter owns no protocol logic: it moves bytes between sockets and the speaker, calls
``speaker.timer(now)`` at ``speaker.next_deadline()``, and does what the events ask
(ConnectRequested -> connect, DisconnectRequested -> close).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nonstop.bgp.config import PeerConfig, SpeakerConfig
from nonstop.bgp.fsm import ConnectRequested, DisconnectRequested, SessionClosed, StateChanged
from nonstop.bgp.speaker import PeerEvent, Speaker
from nonstop.bgp.wire import IPV4_UNICAST

log = logging.getLogger("nonstop.bgp")
TCP_MD5SIG = 14
TCP_REPAIR = 19  # read only here: a socket in repair mode was taken away by the session worker


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


class _Conn:
    """One peer connection on a non-blocking socket. Reads PEEK, hand the bytes to the speaker
    (which journals them first), then consume them: bytes leave the kernel only once a standby
    could have them. Writes report to the speaker what the kernel accepted."""

    def __init__(self, svc: SpeakerService, peer: str, sock: socket.socket, active: bool) -> None:
        self.svc = svc
        self.peer = peer
        self.sock = sock
        self.active = active  # we connected (TCP_INFO bytes_acked then counts our SYN)
        self.out = bytearray()
        self.closed = False
        # ECONNABORTED seen: the agent's session worker took the connection away (silenced it,
        # this node no longer serves the VIP); not a loss the peer saw
        self.aborted = False
        sock.setblocking(False)
        svc.loop.add_reader(sock.fileno(), self._readable)

    def _sent(self, n: int) -> None:
        self.svc.speaker.sent(self.peer, n)

    def _readable(self) -> None:
        self._peek(65536)

    def _recv(self, size: int, flags: int = 0) -> bytes | None:
        """Up to ``size`` bytes the kernel holds; None: nothing yet. EOF or an error: the service
        is told the connection is lost, and b"" returned."""
        try:
            data = self.sock.recv(size, flags)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._failed(e)
            data = b""
        if not data:
            self._failed(None)
            self.svc.on_lost(self.peer, self)
        return data

    def _failed(self, e: OSError | None) -> None:
        """A read or write failed (or EOF): was the connection taken away? The agent's session
        worker silences one with repair mode and a disconnect: reads then fail with EINVAL or
        EPERM (repair mode), the pending error is ECONNABORTED, and a write may report it
        before the reader sees anything. Noted wherever it shows."""
        if self.aborted:
            return
        if e is not None and e.errno == errno.ECONNABORTED:
            self.aborted = True
            return
        try:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            repair = self.sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR)
        except OSError:
            return
        self.aborted = err == errno.ECONNABORTED or repair != 0

    def _peek(self, size: int) -> None:
        """Hand what the kernel holds (peeked: consumed only once journaled) to the service."""
        if data := self._recv(size, socket.MSG_PEEK):
            self.svc.on_data(self.peer, data, self)

    def consume(self, n: int) -> None:
        """Take ``n`` peeked bytes out of the kernel's queue. A connection that died meanwhile
        (its queue purged) stops it: the reader reports the loss."""
        while n > 0:
            try:
                got = self.sock.recv(n)
            except OSError as e:
                self._failed(e)
                return
            if not got:
                return
            n -= len(got)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.out:
            try:
                n = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._failed(e)
                return  # the reader sees the error and reports the loss
            self._sent(n)
            data = data[n:]
            if not data:
                return
            self.svc.loop.add_writer(self.sock.fileno(), self._writable)
        self.out += data

    def _writable(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._failed(e)
            self.svc.loop.remove_writer(self.sock.fileno())
            return
        self._sent(n)
        del self.out[:n]
        if not self.out:
            self.svc.loop.remove_writer(self.sock.fileno())

    def detach(self) -> None:
        if not self.closed:
            self.closed = True
            self.svc.loop.remove_reader(self.sock.fileno())
            self.svc.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """Flush what is queued (best effort), FIN even if a standby holds a copy, close."""
        if self.closed:
            return
        self.detach()
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            if self.out:
                self.sock.sendall(self.out)
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class SpeakerService:
    """Runs a speaker: ``await svc.start()`` ... ``await svc.close()``."""

    def __init__(self, cfg: SpeakerConfig, *, speaker: Speaker | None = None,
                 on_event: Callable[[PeerEvent], None] | None = None) -> None:
        self.cfg = cfg
        self.speaker = speaker or Speaker(cfg)
        self.conns: dict[str, _Conn] = {}
        self.listener: socket.socket | None = None
        self.replica: Any = None  # replica.ReplicaServer when a standby is served
        self.api_runner: Any = None
        self.on_event = on_event
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.started = time.monotonic()
        self.fib = None
        self.counters: dict[str, int] = {}
        self.takeover: dict[str, Any] | None = None  # set when this speaker took over
        self.takeover_written_at = 0.0
        self.deposed: str | None = None  # why this speaker stopped serving (protected.py)
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

    async def start(self, *, api: bool = True, resumed: bool = False) -> None:
        """Listen, serve the API, start the sessions. ``resumed``: the speaker came from a
        Standby that took over (sessions already running, sockets adopted)."""
        if resumed:  # first the KEEPALIVEs (the peers' hold timers run), then the rest
            self._dispatch([])
            self.takeover_written_at = time.monotonic()
        if self.cfg.listen is not None:
            fam = socket.AF_INET6 if ":" in self.cfg.listen else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for p in self.cfg.peers:
                if p.md5_password:
                    set_md5(s, p.address, p.md5_password)
            # after a takeover the dead master's listener may take a moment to go away (its
            # process is still closing files when the standby sees the replica socket close)
            for attempt in range(200 if resumed else 1):
                try:
                    s.bind((self.cfg.listen, self.cfg.port))
                    break
                except OSError as e:
                    if e.errno != errno.EADDRINUSE or attempt == (199 if resumed else 0):
                        s.close()
                        raise
                    await asyncio.sleep(0.01)
            s.listen(16)
            s.setblocking(False)
            self.listener = s
            self.loop.add_reader(s.fileno(), self._accept)
        if api:
            from nonstop.bgp.api import start_api

            self.api_runner = await start_api(self, self.cfg.api_socket)
        if resumed:
            self._dispatch([])
        else:
            self._dispatch(self.speaker.start(self.now()))

    async def close(self) -> None:
        self._closing = True
        if self.deposed is None:  # a deposed speaker's sessions live on elsewhere: no Cease
            self._dispatch(self.speaker.stop(self.now()))
        for c in list(self.conns.values()):
            c.close()
        self.conns.clear()
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
        if self.replica is not None:
            self.replica.close()
        if self.api_runner is not None:
            await self.api_runner.cleanup()
        if self.fib is not None:
            self.fib.close()

    # -- connections -------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = self.peer_by_address(addr[0])
        ok = peer is not None and peer not in self.conns and \
            self.speaker.peers[peer].session.state.name in ("CONNECT", "ACTIVE")
        if not ok or peer is None:
            log.info("refusing connection from %s", addr[0])
            sock.close()
            return
        self.adopt(peer, sock, active=False, new=True)

    def adopt(self, peer: str, sock: socket.socket, *, active: bool, new: bool) -> None:
        """Run ``peer``'s session on ``sock``: a new connection (``new``: the speaker is told)
        or one taken over from a master (the speaker already knows it)."""
        conn = _Conn(self, peer, sock, active)
        self.conns[peer] = conn
        if new:
            local = sock.getsockname()[0]
            events = self.speaker.connection_made(peer, self.now(), local)
            if self.replica is not None:
                self.replica.send_fd(self.speaker.peers[peer].index, sock, active)
            self._dispatch(events)

    def on_data(self, peer: str, data: bytes, conn: _Conn) -> None:
        events = self.speaker.receive_data(peer, data, self.now())
        conn.consume(len(data))
        self._dispatch(events)

    def on_lost(self, peer: str, conn: _Conn) -> None:
        if self.conns.get(peer) is conn:
            del self.conns[peer]
        conn.detach()
        conn.sock.close()
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
        if pc.name in self.conns or self._closing or \
                self.speaker.peers[pc.name].session.state.name not in ("CONNECT", "ACTIVE"):
            s.close()
            return
        self.adopt(pc.name, s, active=True, new=True)

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
                if c is not None:
                    c.close()
        if self.fib is not None and self.speaker.fib_dirty:
            self.fib.apply(self.speaker)
        self._arm()

    def _flush(self) -> None:
        for name, c in self.conns.items():
            data = self.speaker.data_to_send(name, journal=False)
            if data:
                c.write(data)

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

    def extra_summary(self) -> dict[str, Any]:
        return {}

    def standbys(self) -> int:
        """Standbys following this speaker's journal."""
        return len(self.replica.clients) if self.replica is not None else 0

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


def take_over(cfg: SpeakerConfig) -> tuple[Speaker, Any, Any, dict[str, Any]]:
    """Standby mode (blocking): follow the master at ``cfg.replica_socket`` until it is gone,
    then reconcile and resume its sessions. Returns (speaker, follower, journal, timings)."""
    from nonstop.bgp.journal import Journal
    from nonstop.bgp.replica import StandbyFollower

    assert cfg.replica_socket is not None
    follower = StandbyFollower(cfg, cfg.replica_socket)
    follower.follow()
    eof = time.monotonic()
    sp = follower.standby.speaker
    journal = Journal(sp, history=follower.history)  # the takeover is journaled for the next
    resumed = follower.take_over(eof)
    log.info("took over %d session(s) after %d records", len(resumed), len(follower.history))
    return sp, follower, journal, {"master_gone_at": eof, "resumed": [r.peer for r in resumed],
                          "resets": follower.resets}


async def run(cfg: SpeakerConfig, *, standby: bool = False) -> None:
    """``nonstop bgp speaker``: run until SIGINT/SIGTERM. With ``standby``, first follow the
    master (cfg.replica_socket) and take its sessions over when it goes away."""
    from nonstop.bgp.journal import Journal
    from nonstop.bgp.replica import ReplicaServer

    if standby:
        import nonstop.bgp.api  # noqa: F401  (imported now, not during the takeover)

        sp, follower, journal, info = await asyncio.to_thread(take_over, cfg)
        svc = SpeakerService(cfg, speaker=sp)
        for name, (sock, active) in follower.socks.items():
            svc.adopt(name, sock, active=active, new=False)
        follower.socks.clear()
        svc.replica = ReplicaServer(svc, cfg.replica_socket or "", journal)
        await svc.start(resumed=True)
        info["resumed_at"] = svc.takeover_written_at
        svc.takeover = info
    else:
        svc = SpeakerService(cfg)
        if cfg.replica_socket:
            svc.replica = ReplicaServer(svc, cfg.replica_socket, Journal(svc.speaker))
        await svc.start()
    await serve_until_signal(svc.close)


async def serve_until_signal(close: Callable[[], Awaitable[None]],
                             stop: asyncio.Event | None = None) -> None:
    """Wait for SIGINT or SIGTERM (or ``stop``), then ``close()`` (also if the wait is
    cancelled)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await close()
