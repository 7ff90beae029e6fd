"""The demo's small TCP service and its client (``python -m nonstop.demoapp server|client``).

server: listens on VIP:PORT (IP_FREEBIND, so it starts before the node holds the VIP) and answers
each line with ``<node> <line>``.
client: connects to VIP:PORT, sends a numbered line every ``--every-ms`` and writes one JSON line
per outcome to ``--log``: replies (with the node that answered), errors, reconnects. It stops by
itself after ``--duration`` seconds. The TCP session takeover issue will make its connection
survive a failover; until then a failover costs it a reset and a reconnect, which it records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time


async def serve(host: str, port: int, node: str) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(f"{node} ".encode() + line)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: bind the VIP before we hold it
    sock.bind((host, port))
    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        await server.serve_forever()


async def client(host: str, port: int, every: float, duration: float, log_path: str) -> None:
    end = time.monotonic() + duration
    seq = 0
    out = open(log_path, "a", buffering=1)  # noqa: SIM115 - one line per event, flushed

    def emit(**kw: object) -> None:
        out.write(json.dumps({"t": time.monotonic(), **kw}) + "\n")

    connects = 0
    while time.monotonic() < end:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (OSError, TimeoutError) as e:
            emit(event="connect_failed", error=str(e) or type(e).__name__)
            await asyncio.sleep(every)
            continue
        connects += 1
        emit(event="connected", n=connects)
        try:
            while time.monotonic() < end:
                seq += 1
                sent = time.monotonic()
                writer.write(f"{seq}\n".encode())
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 2.0)
                if not line:
                    raise ConnectionResetError("EOF from the service")
                node, _, _echoed = line.decode().strip().partition(" ")
                emit(event="reply", seq=seq, node=node, rtt_ms=(time.monotonic() - sent) * 1000)
                await asyncio.sleep(max(0.0, every - (time.monotonic() - sent)))
        except (OSError, TimeoutError) as e:
            emit(event="error", seq=seq, error=str(e) or type(e).__name__)
        finally:
            writer.close()
    emit(event="done", seq=seq, connects=connects)
    out.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nonstop.demoapp")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--node", required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=5000)
    c.add_argument("--every-ms", type=float, default=10)
    c.add_argument("--duration", type=float, default=30)
    c.add_argument("--log", required=True)
    a = p.parse_args()
    if a.cmd == "server":
        asyncio.run(serve(a.host, a.port, a.node))
    else:
        asyncio.run(client(a.host, a.port, a.every_ms / 1000, a.duration, a.log))


if __name__ == "__main__":
    main()
