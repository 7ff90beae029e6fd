"""The agent link: one authenticated TCP connection per (peer, channel) between agents.

It carries nothing after its handshake. Its only job is to end: when a peer's agent process dies
on a live node (SIGKILL, crash), that node's kernel closes the socket and we read EOF (or get a
RST) at once, instead of waiting ``dead_after`` heartbeat intervals. A partition, by contrast,
produces no EOF, so a silent link proves nothing and is left to the heartbeats.

Handshake (both sides at once, so neither trusts the other before it proves the key):
each side sends ``CHALLENGE(nonce)``; on the other's challenge it answers
``RESPONSE(node_id, group, incarnation, channel, mac)`` with
``mac = HMAC-SHA256(key, b"NSLK" + their_nonce + node_id + group + incarnation + channel)``.
A replayed response fails (fresh nonce); a connection that never authenticates is closed and can
never make us declare a peer dead. Frames: 2-byte big-endian length, then a msgpack array.

The node whose id sorts lower connects; the other accepts. The connector retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import socket
import struct
from collections.abc import Callable

import msgspec

from nonstop.common import RemoteProtocolError

log = logging.getLogger("nonstop.link")

HANDSHAKE_TIMEOUT = 2.0
MAX_FRAME = 512


class Challenge(msgspec.Struct, array_like=True, frozen=True, tag=1):
    nonce: bytes


class Response(msgspec.Struct, array_like=True, frozen=True, tag=2):
    node_id: str
    group: int
    incarnation: int
    channel: str
    mac: bytes


_decoder = msgspec.msgpack.Decoder(Challenge | Response)
_encoder = msgspec.msgpack.Encoder()


def _mac(
    key: bytes, nonce: bytes, node_id: str, group: int, incarnation: int, channel: str
) -> bytes:
    msg = b"NSLK" + nonce + struct.pack("!HQ", group, incarnation) + node_id.encode() + b"\0"
    return hmac.digest(key, msg + channel.encode(), hashlib.sha256)


async def _read_frame(reader: asyncio.StreamReader) -> Challenge | Response:
    head = await reader.readexactly(2)
    (n,) = struct.unpack("!H", head)
    if n > MAX_FRAME:
        raise RemoteProtocolError(f"link frame of {n} bytes is too long")
    try:
        return _decoder.decode(await reader.readexactly(n))
    except msgspec.MsgspecError as e:
        raise RemoteProtocolError(f"bad link frame: {e}") from e


def _frame(msg: Challenge | Response) -> bytes:
    body = _encoder.encode(msg)
    return struct.pack("!H", len(body)) + body


class AgentLinks:
    """Owns every agent link of this node. ``on_closed(peer, channel, reason)`` is called once when
    an authenticated link ends by EOF or RST, the proof that the peer's agent process is gone."""

    def __init__(
        self,
        *,
        key: bytes,
        node_id: str,
        group: int,
        incarnation: int,
        port: int,
        channels: dict[str, str],  # channel -> our address
        peers: dict[str, dict[str, str]],  # peer -> channel -> its address
        on_closed: Callable[[str, str, str], None],
        on_up: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self._key, self._node_id, self._group = key, node_id, group
        self._incarnation, self._port = incarnation, port
        self._channels, self._peers = channels, peers
        self._on_closed, self._on_up = on_closed, on_up
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._up: dict[tuple[str, str], asyncio.StreamWriter] = {}
        self._closing = False
        self.counters = {"handshake_failed": 0, "closed_eof": 0, "closed_error": 0, "up": 0}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        for channel, addr in self._channels.items():
            srv = await asyncio.start_server(
                lambda r, w, ch=channel: self._spawn(self._serve(r, w, ch)),
                host=addr,
                port=self._port,
                reuse_address=True,
            )
            self._servers.append(srv)
        for peer, addrs in self._peers.items():
            if self._node_id < peer:
                for channel, addr in addrs.items():
                    if channel in self._channels:
                        self._spawn(self._connect_loop(peer, channel, addr))

    async def close(self) -> None:
        self._closing = True
        for srv in self._servers:
            srv.close()
        for w in list(self._up.values()):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()

    def status(self) -> list[dict[str, str]]:
        return [{"peer": p, "channel": c} for (p, c) in sorted(self._up)]

    # -- internals --------------------------------------------------------------------------
    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _connect_loop(self, peer: str, channel: str, addr: str) -> None:
        delay = 0.05
        while not self._closing:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        addr, self._port, local_addr=(self._channels[channel], 0)
                    ),
                    HANDSHAKE_TIMEOUT,
                )
            except (OSError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            await self._run(reader, writer, channel, expect=peer)
            if not self._closing:
                await asyncio.sleep(delay)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ch: str
    ) -> None:
        await self._run(reader, writer, ch, expect=None)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, channel: str
    ) -> tuple[str, int]:
        mine = os.urandom(16)
        writer.write(_frame(Challenge(mine)))
        theirs: bytes | None = None
        peer: Response | None = None
        while theirs is None or peer is None:
            msg = await _read_frame(reader)
            if isinstance(msg, Challenge) and theirs is None:
                if len(msg.nonce) != 16:
                    raise RemoteProtocolError("link challenge nonce is not 16 bytes")
                theirs = msg.nonce
                mac = _mac(
                    self._key, theirs, self._node_id, self._group, self._incarnation, channel
                )
                writer.write(
                    _frame(Response(self._node_id, self._group, self._incarnation, channel, mac))
                )
            elif isinstance(msg, Response) and peer is None:
                want = _mac(self._key, mine, msg.node_id, msg.group, msg.incarnation, msg.channel)
                if not hmac.compare_digest(want, msg.mac):
                    raise RemoteProtocolError("link response does not prove the key")
                if msg.group != self._group or msg.channel != channel:
                    raise RemoteProtocolError("link response is for another group or channel")
                peer = msg
            else:
                raise RemoteProtocolError("unexpected link frame during the handshake")
        await writer.drain()
        return peer.node_id, peer.incarnation

    async def _run(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: str,
        *,
        expect: str | None,
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            peer, incarnation = await asyncio.wait_for(
                self._handshake(reader, writer, channel), HANDSHAKE_TIMEOUT
            )
            if (expect is not None and peer != expect) or peer not in self._peers:
                raise RemoteProtocolError(f"link from unexpected node {peer!r}")
        except (RemoteProtocolError, OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            self.counters["handshake_failed"] += 1
            log.debug("agent link handshake on %s failed: %s", channel, e)
            writer.transport.abort()
            return
        old = self._up.pop((peer, channel), None)
        if old is not None:
            old.transport.abort()  # the peer opened a new link: it no longer uses the old one
        self._up[(peer, channel)] = writer
        self.counters["up"] += 1
        if self._on_up is not None:
            self._on_up(peer, channel, incarnation)
        reason = ""
        try:
            while True:
                data = await reader.read(64)
                if not data:
                    reason = f"agent link to {peer} on {channel} closed (EOF): its agent exited"
                    self.counters["closed_eof"] += 1
                    break
                # Nothing is sent after the handshake; ignore anything that is.
        except ConnectionResetError:
            reason = f"agent link to {peer} on {channel} reset (RST): its agent is gone"
            self.counters["closed_eof"] += 1
        except (OSError, asyncio.CancelledError) as e:
            # A timeout or unreachable host says the network is broken, not that the agent died.
            self.counters["closed_error"] += 1
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            if self._up.get((peer, channel)) is writer:
                del self._up[(peer, channel)]
            writer.transport.abort()
        if reason and not self._closing:
            self._on_closed(peer, channel, reason)
