"""nonstop.spawn: children started and waited for without holding up the event loop."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from nonstop.spawn import DEVNULL, PIPE, spawn


def _slow_exec() -> None:  # runs in the child before its exec: a child that waits for a CPU
    time.sleep(0.4)


async def _max_gap(until: asyncio.Future[object]) -> float:
    gap, last = 0.0, time.monotonic()
    while not until.done():
        await asyncio.sleep(0.005)
        now = time.monotonic()
        gap, last = max(gap, now - last), now
    return gap


def test_the_loop_runs_while_a_child_is_slow_to_exec() -> None:
    async def main() -> tuple[float, int]:
        start = asyncio.ensure_future(
            spawn([sys.executable, "-c", "pass"], preexec_fn=_slow_exec, stdin=DEVNULL)
        )
        gap = await _max_gap(start)
        return gap, await (await start).wait()

    gap, rc = asyncio.run(main())
    assert rc == 0
    assert gap < 0.2  # create_subprocess_exec blocks the loop for the whole 0.4 s


def test_wait_and_communicate() -> None:
    async def main() -> tuple[int, bytes | None, bytes | None, int, int]:
        child = await spawn([sys.executable, "-c", "import sys; print('out'); "
                             "sys.stderr.write('err' * 50000); sys.exit(3)"],
                            stdout=PIPE, stderr=PIPE)  # fmt: skip
        out, err = await child.communicate()
        again = await child.wait()
        return child.returncode or 0, out, err, again, child.pid

    rc, out, err, again, pid = asyncio.run(main())
    assert rc == 3 and again == 3 and pid > 0
    assert out == b"out\n" and err == b"err" * 50000


def test_signals_and_many_waiters() -> None:
    async def main() -> list[int]:
        child = await spawn(["sleep", "30"], stdin=DEVNULL)
        waiters = [asyncio.ensure_future(child.wait()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        child.send_signal(signal.SIGTERM)
        return await asyncio.gather(*waiters)

    assert asyncio.run(main()) == [-signal.SIGTERM] * 3


def test_a_missing_program_raises() -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(spawn(["/nonexistent/nonstop-no-such-program"]))


def test_cancelled_start_kills_the_child() -> None:
    async def main() -> int:
        t = asyncio.ensure_future(spawn([sys.executable, "-c", "import time; time.sleep(30)"],
                                        preexec_fn=_slow_exec))  # fmt: skip
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        await asyncio.sleep(0.6)  # the start finishes, the child is killed and reaped
        return 0

    before = _children()
    asyncio.run(main())
    deadline = time.monotonic() + 5
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before


def _children() -> set[int]:
    import os

    pid = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.add(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out
