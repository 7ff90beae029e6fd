"""Seed 000's setting on one lab node: two podman instances of examples/containers/kv.py share a
state volume; SIGKILL of the active one: the standby takes over from the shared checkpoint on the
same address (no VIP move), and the supervisor restarts the dead one as the new standby.

Containers are removed at the end (by name); the cached base image is kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nonstop.app.cli import read_status
from nonstop.lab import Lab

pytestmark = pytest.mark.netns

NONSTOP = str(Path(sys.executable).with_name("nonstop"))
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "containers"
PORT = 7100
KEYS = 200


def config(tmp: Path, lab: Lab, image: str) -> Path:
    host = lab.host("a").addr("lan")
    parts = [f'state_dir = "{tmp / "run"}"']
    for name, health in (("kv-a", 7101), ("kv-b", 7102)):
        env = {"INSTANCE": name, "HOST": host, "PORT": str(PORT), "HEALTH_PORT": str(health)}
        parts.append(f"""
[[service]]
name = "{name}"
runtime = "podman"
command = ["python3", "/app/kv.py"]
env = {json.dumps(env).replace('":', '" =')}
state_volume = "{tmp / "state"}"
stop_timeout_ms = 2000
readiness = {{ tcp = "127.0.0.1:{health}", interval_ms = 50, timeout_ms = 50 }}
backoff = {{ initial_ms = 200 }}
[service.container]
image = "{image}"
network = "ns:/run/netns/{lab.host("a").ns}"
volumes = ["{EXAMPLE}:/app:ro"]
name = "nonstop-test-{name}"
""")
    path = tmp / "services.toml"
    path.write_text("\n".join(parts))
    return path


CLIENT = """
import socket, sys, time
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def ask(f, w, line):
    w.write(line.encode() + b"\\n"); w.flush()
    return f.readline().decode().strip()
def connect(deadline):
    while True:
        try:
            s = socket.create_connection((host, port), timeout=2)
            return s, s.makefile("rb"), s.makefile("wb")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)
if mode == "set":
    s, f, w = connect(time.monotonic() + 10)
    print(ask(f, w, "WHO"), sum(ask(f, w, f"SET k{i} v{i}") == "OK" for i in range(n)))
else:  # watch: ask WHO on fresh connections until another instance answers
    first, last_old, t_end = None, None, time.monotonic() + 30
    while time.monotonic() < t_end:
        try:
            s, f, w = connect(t_end)
            who = ask(f, w, "WHO")
        except OSError:
            who = ""
        now = time.monotonic()
        if who and first is None:
            first = who
            print("watching", first, flush=True)
        if who == first:
            last_old = now
        elif who:
            break
        time.sleep(0.001)
    good = sum(ask(f, w, f"GET k{i}") == f"v{i}" for i in range(n))
    print(who, good, round((now - last_old) * 1000, 1))
"""


def client(lab: Lab, mode: str) -> list[str]:
    host = lab.host("a").addr("lan")
    r = lab.host("b").sh([sys.executable, "-c", CLIENT, host, str(PORT), str(KEYS), mode])
    return r.stdout.split()


def services(tmp: Path) -> dict[str, dict]:
    doc = read_status(str(tmp / "run")) or {"services": []}
    return {s["name"]: s for s in doc["services"]}


def wait(tmp: Path, pred, timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        svcs = services(tmp)
        if len(svcs) == 2 and pred(svcs):
            return svcs
        time.sleep(0.05)
    raise AssertionError(f"never matched: {services(tmp)}")


def role(lab: Lab, health: int) -> str:
    code = f"import socket; print(socket.create_connection(('127.0.0.1', {health})).recv(20))"
    return lab.host("a").sh([sys.executable, "-c", code]).stdout.strip()


def test_standby_takes_over_from_the_shared_checkpoint(lab: Lab, tmp_path: Path) -> None:
    from nonstop.app.runtime.container import ensure_python_image, podman_unavailable

    why = podman_unavailable()
    if why:
        pytest.skip(why)
    path = config(tmp_path, lab, ensure_python_image())
    sup = lab.host("a").run([NONSTOP, "-v", "service", "run", "--config", str(path)],
                            name="supervisor")  # fmt: skip
    try:
        try:
            wait(tmp_path, lambda s: all(v["state"] == "ready" for v in s.values()))
        except AssertionError as e:
            raise AssertionError(f"{e}; supervisor output: {sup.output()[-2000:]}") from None
        active, stored = client(lab, "set")
        assert int(stored) == KEYS
        standby = "kv-b" if active == "kv-a" else "kv-a"
        assert (tmp_path / "state" / "active").read_text().strip() == active
        host = lab.host("a").addr("lan")
        watch = lab.host("b").run(
            [sys.executable, "-c", CLIENT, host, str(PORT), str(KEYS), "watch"],
            stdout=subprocess.PIPE, name="watch",
        )  # fmt: skip
        assert watch.popen.stdout is not None
        assert watch.popen.stdout.readline().split() == [b"watching", active.encode()]
        subprocess.run(["podman", "kill", "--signal", "KILL", f"nonstop-test-{active}"],
                       check=True, capture_output=True)  # fmt: skip
        out, _ = watch.popen.communicate(timeout=40)
        who, good, gap_ms = out.decode().split()
        assert who == standby and int(good) == KEYS
        print(f"\nstandby {standby} answered {float(gap_ms):.1f} ms after the last answer of "
              f"{active} (client polling every ~1 ms), with all {KEYS} keys")  # fmt: skip
        svcs = wait(tmp_path, lambda s: s[active]["generation"] == 2
                    and s[active]["state"] == "ready")  # fmt: skip
        assert svcs[active]["last_exit"] == "signal SIGKILL"
        assert "standby" in role(lab, 7101 if active == "kv-a" else 7102)
        assert "active" in role(lab, 7101 if standby == "kv-a" else 7102)
    finally:
        if sup.popen.poll() is None:
            os.kill(sup.popen.pid, signal.SIGTERM)
            try:
                sup.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                sup.popen.kill()
        for name in ("kv-a", "kv-b"):
            subprocess.run(["podman", "rm", "-f", "-t", "0", f"nonstop-test-{name}"],
                           capture_output=True)  # fmt: skip
    left = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                          text=True).stdout.split()  # fmt: skip
    assert not [n for n in left if n.startswith("nonstop-test-")], left
