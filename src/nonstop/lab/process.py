"""A process started inside a lab host: a ``Popen`` in its own session, signalled as a group."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(eq=False)
class LabProcess:
    """A tracked process in a lab host. Signals go to its whole process group (it leads one), so
    a shell and everything it started stop, continue and die together."""

    name: str
    host: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    start: int | None = field(default=None, repr=False)  # /proc start time, for the state file

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process group; silently nothing if it is all gone."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            if self.popen.poll() is None:  # not a group leader any more: the pid itself
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, sig)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.send_signal(sig)

    def stop(self) -> None:
        """SIGSTOP: the process freezes (a hung node) without dying."""
        self.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 5.0) -> int:
        """SIGTERM (after SIGCONT, in case it was stopped), SIGKILL after ``timeout``; returns the
        exit status."""
        if self.popen.poll() is not None:
            return self.popen.returncode
        self.send_signal(signal.SIGTERM)
        self.send_signal(signal.SIGCONT)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            return self.popen.wait()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def wait_output(self, text: str, timeout: float = 15.0, poll: float = 0.02) -> str:
        """Until ``text`` shows in the output; returns the output. RuntimeError if the process
        dies first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if not self.alive:
                raise RuntimeError(f"{self.name} died:\n{out}")
            time.sleep(poll)
        raise RuntimeError(f"{self.name}: no {text!r} in:\n{self.output()}")

    def output(self) -> str:
        """What the process wrote to its log file so far ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reap(self, timeout: float = 2.0) -> None:
        """Collect the exit status after a kill, so no zombie remains."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.popen.wait(timeout)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
