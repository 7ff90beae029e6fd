"""Children started without holding up the event loop: ``await spawn(argv, ...)``.

``asyncio.create_subprocess_exec`` runs ``subprocess.Popen`` in the loop's own thread, and Popen
returns only once the child has called exec. The agent runs at SCHED_FIFO with RESET_ON_FORK, so
its children start at normal priority: on a box whose CPUs are busy (256 streams at 50 msg/s
each way) a child waited 100-230 ms for a CPU before it reached exec, and the agent's loop waited
with it. That loop feeds the fence guard, so each restart of a killed service instance fenced a
healthy master (``bench restart``: "the agent stalled for 117 ms ... on a CPU for 2.9 ms of it").

Here Popen runs in a thread of its own, at the caller's scheduling policy (with RESET_ON_FORK:
the child still starts at normal priority). CPython releases the GIL while a vfork child runs up
to its exec, so the loop goes on meanwhile. The exit is waited for through a pidfd on the loop
(Linux >= 5.3) and the pipes are read on the loop: no thread per living child.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from typing import IO, Any

PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL


class Child:
    """A started child: ``pid``, ``returncode``, ``await wait()``, ``await communicate()``,
    ``send_signal`` / ``kill`` / ``terminate``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._exited: asyncio.Future[int] | None = None

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signum)  # a no-op once reaped

    def kill(self) -> None:
        self.popen.kill()

    def terminate(self) -> None:
        self.popen.terminate()

    async def wait(self) -> int:
        """The exit status (reaped); any number of callers."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            self._watch(self._exited)
        return await asyncio.shield(self._exited)

    def _watch(self, fut: asyncio.Future[int]) -> None:
        loop = fut.get_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # reaped already (by poll() elsewhere)
            fut.set_result(self.popen.wait())
            return

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            if not fut.done():
                fut.set_result(self.popen.wait())  # a zombie now: no wait

        loop.add_reader(fd, exited)

    async def communicate(self) -> tuple[bytes | None, bytes | None]:
        """Read stdout and stderr (those opened with PIPE) to EOF, then wait for the exit."""
        out, err = await asyncio.gather(_read_all(self.popen.stdout), _read_all(self.popen.stderr))
        await self.wait()
        return out, err


async def _read_all(f: IO[bytes] | None) -> bytes | None:
    if f is None:
        return None
    fd = f.fileno()
    os.set_blocking(fd, False)
    loop = asyncio.get_running_loop()
    chunks: list[bytes] = []
    eof = loop.create_future()

    def readable() -> None:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            b = b""
        if b:
            chunks.append(b)
        elif not eof.done():
            eof.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await eof
    finally:
        loop.remove_reader(fd)
        f.close()
    return b"".join(chunks)


def _policy() -> tuple[int, int]:
    try:
        policy = os.sched_getscheduler(0)
        return policy, os.sched_getparam(0).sched_priority
    except OSError:
        return os.SCHED_OTHER, 0


async def spawn(argv: list[str], **popen: Any) -> Child:
    """``subprocess.Popen(argv, **popen)`` from a thread of its own; raises what Popen raises
    (OSError when the program cannot run). Cancelled meanwhile: the child is killed and reaped."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[subprocess.Popen[bytes]] = loop.create_future()
    policy, priority = _policy()

    def settle(ok: subprocess.Popen[bytes] | None, e: BaseException | None) -> None:
        if fut.cancelled():
            if ok is not None:  # nobody wants it any more
                ok.kill()
                threading.Thread(target=ok.wait, daemon=True).start()
        elif e is not None:
            fut.set_exception(e)
        else:
            fut.set_result(ok)  # type: ignore[arg-type]

    def run() -> None:
        if policy & ~os.SCHED_RESET_ON_FORK not in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE):
            # the caller's real-time priority, so the Python part of Popen (under the GIL) is
            # not held off a CPU by normal tasks while the loop waits for the GIL
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, policy | os.SCHED_RESET_ON_FORK,
                                      os.sched_param(priority))  # fmt: skip
        try:
            p = subprocess.Popen(argv, **popen)
        except BaseException as e:
            loop.call_soon_threadsafe(settle, None, e)
            return
        try:
            loop.call_soon_threadsafe(settle, p, None)
        except RuntimeError:  # the loop is gone
            p.kill()
            p.wait()

    threading.Thread(target=run, name="nonstop-spawn", daemon=True).start()
    return Child(await fut)
