"""``nonstop status``: a groups node's config goes to the groups status; the pretty output."""

from __future__ import annotations

import io
from pathlib import Path

from nonstop.agent.cli import _is_groups_config

ROOT = Path(__file__).resolve().parents[2]


def test_groups_config_is_recognised(tmp_path: Path) -> None:
    assert _is_groups_config(str(ROOT / "examples" / "etcd" / "node-a.toml"))
    assert not _is_groups_config(str(ROOT / "examples" / "node-a.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[store\n")
    assert not _is_groups_config(str(bad))  # left to the pair's loader, which names the fault
    assert not _is_groups_config(str(tmp_path / "missing.toml"))


def status_doc(instances: list[dict]) -> dict:
    """A status dict as an agent's GET /status answers it (the keys print_status reads)."""
    return {
        "node": "node-a", "group": 1, "role": "fault", "since_s": 3.2, "priority": 200,
        "reason": "fault: service stream-1 crash loop (5 deaths within 60 s)",
        "vips": [{"address": "10.77.0.100/24", "interface": "lan", "held": False}],
        "witness": None, "realtime": {"requested": False, "failed": []},
        "peers": [{"id": "node-b", "alive": True, "role": "master", "priority": 100}],
        "stations": [], "history": [],
        "services": {"instances": instances, "crash_loops": [], "counters": {}},
    }  # fmt: skip


def render(st: dict) -> str:
    from rich.console import Console

    from nonstop.agent.cli import print_status

    buf = io.StringIO()
    print_status(st, console=Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


def test_pretty_status_has_a_table_of_the_supervised_services() -> None:
    ready = {
        "name": "stream-0", "service": "stream", "instance": 0, "state": "ready",
        "reason": "running (no readiness check)", "pid": 4242, "restarts": 2,
        "last_exit": "signal SIGKILL",
    }  # fmt: skip
    looping = {
        "name": "stream-1", "service": "stream", "instance": 1, "state": "crash-loop",
        "reason": "5 deaths within 60 s, last: exit 3", "pid": None, "restarts": 4,
        "last_exit": "exit 3", "container": "nonstop-node-a-stream-1",
    }  # fmt: skip
    out = render(status_doc([ready, looping]))
    assert "Supervised services" in out
    rows = {line.split("│")[2].strip(): line for line in out.splitlines() if "│ stream " in line}
    cells = [c.strip() for c in rows["stream-0"].split("│")[1:-1]]
    assert cells == [
        "stream", "stream-0", "ready", "4242", "2", "signal SIGKILL", "no",
        "running (no readiness check)",
    ]  # fmt: skip
    cells = [c.strip() for c in rows["stream-1"].split("│")[1:-1]]
    assert cells == [
        "stream", "stream-1", "crash-loop", "nonstop-node-a-stream-1", "4", "exit 3", "yes",
        "5 deaths within 60 s, last: exit 3",
    ]  # fmt: skip
    assert "`nonstop service reset stream --config NODE.toml` starts it again" in out


def test_pretty_status_without_supervised_services_has_no_such_table() -> None:
    out = render(status_doc([]))
    assert "node-a" in out and "Supervised services" not in out
    st = status_doc([])
    del st["services"]  # an agent of before: no key at all
    assert "Supervised services" not in render(st)
