"""The serving loop both RPC ends share (the front's manager and a worker): read frames from one
client connection, run every Call concurrently through ``handle``, write each Reply as it is
ready. A frame that is not a Call, or does not decode, gets one error Reply (id 0) and the
connection closes; calls still running are answered first."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from nonstop.common import RemoteProtocolError
from nonstop.vs.rpc.frame import Call, FrameDecoder, Reply, encode


async def serve_calls(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[Call], Awaitable[Reply]],
    *,
    refuse: str,
    counters: Counter[str],
    workers: list[str] | None = None,
) -> None:
    """``refuse``: the error for a frame that is not a Call; ``workers``: named in error Replies."""
    dec = FrameDecoder()
    tasks: set[asyncio.Task[None]] = set()

    async def one(call: Call) -> None:
        reply = await handle(call)
        if not writer.is_closing():
            writer.write(encode(reply))

    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            dec.feed(data)
            try:
                while (f := dec.next_frame()) is not None:
                    if not isinstance(f, Call):
                        raise RemoteProtocolError(refuse, counter="bad_frame")
                    t = asyncio.ensure_future(one(f))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
            except RemoteProtocolError as e:
                counters["bad_frame"] += 1
                writer.write(encode(Reply(0, False, error=e.reason, workers=workers or [])))
                break
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()
