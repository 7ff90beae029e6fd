"""``nonstop status --config``: a groups node's config goes to the groups status."""

from __future__ import annotations

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
