"""Chat client: sends its nickname, then every stdin line; prints what the server broadcasts.

    python examples/chat/client.py 127.0.0.1 7000 alice
"""

from __future__ import annotations

import argparse
import asyncio
import sys


async def pump_stdin(writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.buffer.readline):
        writer.write(line if line.endswith(b"\n") else line + b"\n")
        await writer.drain()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("nick")
    args = ap.parse_args()
    reader, writer = await asyncio.open_connection(args.host, args.port)
    writer.write(args.nick.encode() + b"\n")

    async def show() -> None:
        while line := await reader.readline():
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()

    shower = asyncio.create_task(show())
    await pump_stdin(writer)
    await asyncio.sleep(0.2)  # let the last broadcasts arrive before leaving
    shower.cancel()
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
