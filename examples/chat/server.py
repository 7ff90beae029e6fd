"""Reference chat service on nonstop.app (asyncio): every line a client sends goes to all clients.

The first line a client sends is its nickname; it is the connection's commit state, so a restarted
server that adopts the connection (after a crash or a failover) still knows who is talking. The
server commits after each processed line: a line it had not finished broadcasting when it died is
read again by its successor, none twice relative to the last commit.

    python examples/chat/server.py --host 127.0.0.1 --port 7000 [--agent /run/nonstop/app.sock]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from nonstop.app.aio import AsyncNsConn, AsyncNsListener, ns_listen

MAX_LINE = 4096


class ChatServer:
    def __init__(self, listener: AsyncNsListener) -> None:
        self.listener = listener
        self.nicks: dict[AsyncNsConn, bytes] = {}

    async def broadcast(self, line: bytes) -> None:
        for conn in list(self.nicks):
            try:
                await conn.ns_send(line)
            except OSError:
                self.nicks.pop(conn, None)

    async def serve_conn(self, conn: AsyncNsConn, nick: bytes) -> None:
        buf = b""
        pos = conn.read_pos  # absolute read position of buf[0]
        if nick:
            self.nicks[conn] = nick
        try:
            while True:
                data = await conn.ns_recv(MAX_LINE)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    pos += len(line) + 1
                    line = line.rstrip(b"\r")
                    if not nick:
                        nick = line[:32] or b"anon"
                        self.nicks[conn] = nick
                        await self.broadcast(b"* " + nick + b" joined\n")
                    else:
                        await self.broadcast(nick + b": " + line + b"\n")
                    await conn.commit(nick, upto=pos)
                if len(buf) > MAX_LINE:
                    break
        except OSError:
            pass
        finally:
            self.nicks.pop(conn, None)
            with contextlib.suppress(OSError):
                await conn.ns_close()
            if nick:
                await self.broadcast(b"* " + nick + b" left\n")

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            adopted = await self.listener.adopted()
            for conn, record in adopted:  # all known before any of them broadcasts
                if record.state:
                    self.nicks[conn] = record.state
            for conn, record in adopted:
                tg.create_task(self.serve_conn(conn, record.state))
            while True:
                conn = await self.listener.ns_accept()
                tg.create_task(self.serve_conn(conn, b""))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--agent", default=None, help="the nonstop agent's app socket")
    args = ap.parse_args()
    listener = await ns_listen(args.host, args.port, agent=args.agent)
    print(f"listening {listener.port}", flush=True)
    try:
        await ChatServer(listener).run()
    finally:
        listener.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
