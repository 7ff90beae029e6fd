"""Services file errors, the check probes and the asyncio Supervisor with real processes on
127.0.0.1 (no namespace needed: loopback only, ports picked by the kernel)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from nonstop.app.checks import CheckConfig, run_check
from nonstop.app.runtime import ExitStatus
from nonstop.app.runtime.container import PodmanRuntime
from nonstop.app.runtime.spec import BackoffConfig, ContainerConfig, ServiceConfig, load_services
from nonstop.app.supervisor import CrashLoopDetected, StateChanged, SvcState
from nonstop.app.supervisor_io import Supervisor
from nonstop.common import ConfigError

PY = sys.executable


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "svc.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("[[service]]\nname='a'\n", "service[0]", "command"),
        ("[[service]]\nname='a'\ncommand=['x']\nreadiness={interval_ms=5}\n", "readiness.tcp",
         "exactly one"),
        ("[[service]]\nname='a'\ncommand=['x']\nreadiness={tcp='nope'}\n", "readiness.tcp",
         "host:port"),
        ("[[service]]\nname='a'\ncommand=['x']\nruntime='podman'\n", "service[0].container",
         "needs an image"),
        ("[[service]]\nname='a'\ncommand=['x']\nstop_signal='SIGFOO'\n", "stop_signal", "signal"),
        ("[[service]]\nname='a'\ncommand=['x']\n[[service]]\nname='a'\ncommand=['y']\n",
         "service[1].name", "twice"),
        ("[[service]]\nname='a'\ncommand=['x']\nbackof={}\n", "service[0]", "backof"),
        ("[[service]]\nname='a'\ncommand=['x']\nliveness={http='https://x/'}\n", "liveness.http",
         "http://"),
    ],
)  # fmt: skip
def test_services_file_errors_name_file_field_reason(tmp_path, text, field, reason) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_services(path)
    e = ei.value
    assert e.file == path and field in f"{e.field} {e.reason}" and reason in str(e), str(e)


def test_services_file_resolves_relative_paths(tmp_path) -> None:
    path = write(
        tmp_path,
        "state_dir='st'\n[[service]]\nname='a'\ncommand=['x']\nruntime='podman'\n"
        "state_volume='shared'\ncontainer={image='i', volumes=['data:/data:ro']}\n",
    )
    cfg = load_services(path)
    svc = cfg.service[0]
    assert cfg.state_dir == str(tmp_path / "st")
    assert svc.state_volume == str(tmp_path / "shared") and svc.cwd == str(tmp_path)
    assert svc.container is not None and svc.container.volumes == [f"{tmp_path}/data:/data:ro"]
    args = PodmanRuntime().run_args(svc, "/tmp/logs")
    assert args[:2] == ["run", "-d"] and "--ulimit" in args and "nofile=20000:20000" in args
    assert f"{tmp_path}/shared:/state:rw" in args and "NONSTOP_STATE_DIR=/state" in args
    assert args[-2:] == ["i", "x"]


def test_exit_status_words() -> None:
    assert str(ExitStatus.from_returncode(-9)) == "signal SIGKILL"
    assert str(ExitStatus.from_returncode(3)) == "exit 3"
    assert str(ExitStatus.from_container_code(137)) == "signal SIGKILL"
    assert str(ExitStatus.from_container_code(125)) == "exit 125"


async def _http_server(status: int) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await w.drain()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_probes_pass_and_fail() -> None:
    async def main() -> None:
        ok_srv, bad_srv = await _http_server(204), await _http_server(503)
        ok_port = ok_srv.sockets[0].getsockname()[1]
        bad_port = bad_srv.sockets[0].getsockname()[1]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, not listening: refused
        cases = [
            (CheckConfig(tcp=f"127.0.0.1:{ok_port}"), True, "connected"),
            (CheckConfig(tcp=f"127.0.0.1:{dead}"), False, "refused"),
            (CheckConfig(http=f"http://127.0.0.1:{ok_port}/health"), True, "204"),
            (CheckConfig(http=f"http://127.0.0.1:{bad_port}/"), False, "503"),
            (CheckConfig(http=f"http://127.0.0.1:{bad_port}/", http_status=[503]), True, "503"),
            (CheckConfig(command=["true"]), True, "exited 0"),
            (CheckConfig(command=[PY, "-c", "import sys; sys.exit('boom')"]), False, "boom"),
            (CheckConfig(command=["sleep", "5"], timeout_ms=100, interval_ms=100), False, "100 ms"),
            (CheckConfig(command=["/nonexistent/probe"]), False, "No such file"),
        ]
        for cfg, want, word in cases:
            ok, detail = await run_check(cfg)
            assert (ok, word in detail) == (want, True), (cfg, detail)
        closed.close()
        ok_srv.close()
        bad_srv.close()

    asyncio.run(main())


def server_cmd(port_file: str) -> list[str]:
    code = (
        "import socket,sys,time\n"
        "s=socket.create_server(('127.0.0.1',0))\n"
        f"open({port_file!r},'w').write(str(s.getsockname()[1]))\n"
        "time.sleep(60)\n"
    )
    return [PY, "-c", code]


def test_supervisor_restarts_a_killed_process_and_stops_cleanly(tmp_path) -> None:
    events: list[object] = []

    async def main() -> None:
        svc = ServiceConfig(
            name="t",
            command=[PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            backoff=BackoffConfig(initial_ms=20, jitter=0.0),
        )
        sup = Supervisor(svc, on_event=events.append, log_dir=str(tmp_path))
        out = tmp_path / "t.out"

        async def printed(n: int) -> None:
            async with asyncio.timeout(10):
                while not out.exists() or out.read_text().count("up") < n:
                    await asyncio.sleep(0.01)

        await sup.start()
        await sup.wait_for(SvcState.READY, timeout=5)
        await printed(1)
        pid = sup.status()["pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        await sup.wait_for(SvcState.BACKOFF, timeout=5)
        await sup.wait_for(SvcState.READY, timeout=5)
        await printed(2)
        st = sup.status()
        assert st["generation"] == 2 and st["last_exit"] == "signal SIGKILL"
        await sup.stop()
        assert sup.status()["state"] == "stopped"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    asyncio.run(main())
    news = [str(e.new) for e in events if isinstance(e, StateChanged)]
    assert news == ["starting", "ready", "backoff", "starting", "ready", "stopping", "stopped"]
    assert (tmp_path / "t.out").read_text() == "up\nup\n"


def test_supervisor_crash_loop_on_a_command_that_dies_at_start(tmp_path) -> None:
    events: list[object] = []

    async def main() -> None:
        svc = load_services(
            write(
                tmp_path,
                f"[[service]]\nname='dies'\ncommand=['{PY}', '-c', 'raise SystemExit(3)']\n"
                "backoff={initial_ms=10, max_ms=50}\ncrash_loop={deaths=5, window_ms=30000}\n"
                "readiness={command=['false'], interval_ms=50, timeout_ms=50}\n",
            )
        ).service[0]
        sup = Supervisor(svc, on_event=events.append, log_dir=str(tmp_path))
        await sup.start()
        await sup.wait_for(SvcState.CRASH_LOOP, timeout=20)
        await sup.stop()

    asyncio.run(main())
    loops = [e for e in events if isinstance(e, CrashLoopDetected)]
    assert len(loops) == 1 and loops[0].deaths == 5


def test_launch_failure_is_a_death_with_its_reason(tmp_path) -> None:
    async def main() -> str:
        svc = ServiceConfig(name="nope", command=["/nonexistent/bin"])
        sup = Supervisor(svc, log_dir=str(tmp_path))
        await sup.start()
        await sup.wait_for(SvcState.BACKOFF, timeout=5)
        reason = sup.core.reason
        await sup.stop()
        return reason

    assert "launch failed" in asyncio.run(main())


def test_container_config_defaults_are_this_machines_limits() -> None:
    c = ContainerConfig(image="x")
    assert (c.oci_runtime, c.nofile, c.nproc) == ("runc", 20000, 4096)
