"""ProcessRuntime: the service as a plain subprocess in its own process group."""

from __future__ import annotations

import contextlib
import os

from nonstop.app.runtime import ExitStatus, LaunchError
from nonstop.app.runtime.spec import ServiceConfig
from nonstop.spawn import DEVNULL, Child, spawn


class ProcessInstance:
    def __init__(self, proc: Child) -> None:
        self._proc = proc
        self.pid: int | None = proc.pid

    async def wait(self) -> ExitStatus:
        rc = await self._proc.wait()
        # The group outlives its leader if the service forked: a dead instance leaves nothing.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, 9)
        return ExitStatus.from_returncode(rc)

    async def signal(self, signum: int) -> None:
        """Signal the whole process group (the service and whatever it forked)."""
        if self._proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signum)


class ProcessRuntime:
    name = "process"

    async def launch(self, svc: ServiceConfig, log_dir: str) -> ProcessInstance:
        os.makedirs(log_dir, exist_ok=True)
        env = dict(os.environ, **svc.env, NONSTOP_SERVICE=svc.name)
        if svc.state_volume:
            os.makedirs(svc.state_volume, exist_ok=True)
            env["NONSTOP_STATE_DIR"] = svc.state_volume
        out = open(os.path.join(log_dir, f"{svc.name}.out"), "ab")  # noqa: SIM115
        err = open(os.path.join(log_dir, f"{svc.name}.err"), "ab")  # noqa: SIM115
        try:
            proc = await spawn(
                list(svc.command),
                cwd=svc.cwd or None,
                env=env,
                user=svc.user or None,
                stdin=DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # own session and process group: killpg reaches all
            )
        except (OSError, ValueError, KeyError) as e:  # KeyError: unknown user
            raise LaunchError(f"{svc.command[0]}: {getattr(e, 'strerror', None) or e}") from e
        finally:
            out.close()
            err.close()
        return ProcessInstance(proc)

    async def cleanup(self, svc: ServiceConfig) -> None:
        return None
