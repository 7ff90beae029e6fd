"""Runtimes: how a service instance is started, signalled and waited for.

One interface, three implementations:

- ``ProcessRuntime`` (default): a subprocess in its own session and process group, with the
  service's env, cwd and user; stdout and stderr appended to ``<log_dir>/<name>.out|.err``.
- ``PodmanRuntime``: ``podman --runtime runc run -d`` (crun fails on this machine kind), ulimits
  lowered to the host's (nofile 20000, nproc 4096), ``--network ns:/run/netns/<host>`` to run in a
  lab namespace, the state volume bind-mounted at ``/state``; exit status from ``podman wait``.
- ``DockerRuntime``: the same code path and flags with the ``docker`` client. The docker engine
  does not run on this machine kind, so it is untested here.

``ensure_python_image()`` (in ``nonstop.app.runtime.container``) builds the local base image the
tests and examples use; no registry is reachable, so it is made with ``podman import``.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Protocol

from nonstop.app.runtime.spec import ServiceConfig


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int | None  # exit code, or None when killed by a signal
    signal: int | None = None

    def __str__(self) -> str:
        if self.signal is not None:
            return f"signal {signal.Signals(self.signal).name}"
        return f"exit {self.code}"

    @classmethod
    def from_returncode(cls, rc: int) -> ExitStatus:
        return cls(None, -rc) if rc < 0 else cls(rc)

    @classmethod
    def from_container_code(cls, rc: int) -> ExitStatus:
        """A container's code: 128 + N is death by signal N (the shell convention engines use)."""
        if 128 < rc < 128 + 65:
            try:
                return cls(None, int(signal.Signals(rc - 128)))
            except ValueError:
                pass
        return cls(rc)


class LaunchError(Exception):
    """The instance could not be started (bad command, missing image, engine error)."""


class Instance(Protocol):
    """One running instance of a service."""

    pid: int | None  # the service's main process as the host sees it, if known

    async def wait(self) -> ExitStatus: ...

    async def signal(self, signum: int) -> None: ...


class Runtime(Protocol):
    name: str

    async def launch(self, svc: ServiceConfig, log_dir: str) -> Instance:
        """Start one instance; raise LaunchError if it cannot start."""
        ...

    async def cleanup(self, svc: ServiceConfig) -> None:
        """Remove what a dead instance may have left (a container); no-op for processes."""
        ...


def runtime_for(svc: ServiceConfig) -> Runtime:
    from nonstop.app.runtime.container import DockerRuntime, PodmanRuntime
    from nonstop.app.runtime.process import ProcessRuntime

    if svc.runtime == "podman":
        return PodmanRuntime()
    if svc.runtime == "docker":
        return DockerRuntime()
    return ProcessRuntime()


__all__ = ["ExitStatus", "Instance", "LaunchError", "Runtime", "ServiceConfig", "runtime_for"]
