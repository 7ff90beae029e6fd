"""A bad config is rejected with the file, the field and the reason; a good one loads."""

from __future__ import annotations

import os

import pytest
from nodecfg import write

from nonstop.common import ConfigError
from nonstop.config import load_agent_config, load_witness_config

GOOD = """
[node]
id = "node-a"
priority = 200
key_file = "key"
state_dir = "state"

[heartbeat]
interval_ms = 10
dead_after = 3

[[channels]]
name = "lan"
address = "10.77.0.11"

[[channels]]
name = "hb"
address = "10.77.1.11"

[[peers]]
id = "node-b"
addresses = { lan = "10.77.0.12", hb = "10.77.1.12" }

[[vips]]
address = "10.77.0.100/24"
interface = "lan"

[witness]
addresses = { lan = "10.77.0.30" }
"""




def test_good_config_loads_and_resolves_paths(cfgdir):
    cfg, key = load_agent_config(write(cfgdir, GOOD))
    assert cfg.node.id == "node-a"
    assert key == b"0123456789abcdef0123456789abcdef"
    assert cfg.node.key_file == os.path.join(cfgdir, "key")
    assert cfg.node.state_dir == os.path.join(cfgdir, "state")
    assert cfg.heartbeat.dead_interval == pytest.approx(0.03)
    assert cfg.fence_timeout == pytest.approx(0.02)  # derived: (dead_after - 1) * interval
    assert cfg.lease == pytest.approx(0.025)  # derived: (dead_after - 1/2) * interval


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("priority = 200", "priority = 300"), "node.priority", "<= 254"),
        (("interval_ms = 10", 'interval_ms = "fast"'), "heartbeat.interval_ms", "Expected `int`"),
        (("dead_after = 3", "dead_after = 1"), "heartbeat.dead_after", ">= 2"),
        (
            ('address = "10.77.0.11"', 'address = "10.77.0.300"'),
            "channels[0].address",
            "not a valid",
        ),
        (('address = "10.77.0.100/24"', 'address = "10.77.0.100"'), "vips[0].address", "prefix"),
        (
            ('lan = "10.77.0.12", hb', 'wan = "10.77.0.12", hb'),
            "peers[0].addresses.wan",
            "no channel",
        ),
        (('id = "node-b"', 'id = "node-a"'), "peers[0].id", "used twice"),
        (("[heartbeat]", "[heartbeat]\nbogus = 1"), "heartbeat", "unknown field `bogus`"),
        (('name = "hb"', 'name = "lan"'), "channels[1].name", "listed twice"),
    ],
)
def test_bad_field_is_named(cfgdir, change, field, words):
    path = write(cfgdir, GOOD.replace(*change, 1))
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert ei.value.file == path
    assert ei.value.field == field, str(ei.value)
    assert words in ei.value.reason


def test_cross_field_timing_checks(cfgdir):
    text = GOOD.replace("[failover]", "").replace(
        "[[vips]]", "[failover]\nfence_timeout_ms = 30\n\n[[vips]]"
    )
    with pytest.raises(ConfigError) as ei:
        load_agent_config(write(cfgdir, text))
    assert ei.value.field == "failover.fence_timeout_ms"
    assert "dead interval" in ei.value.reason

    text = GOOD.replace("[[vips]]", "[failover]\ntakeover_budget_ms = 20\n\n[[vips]]")
    with pytest.raises(ConfigError) as ei:
        load_agent_config(write(cfgdir, text))
    assert ei.value.field == "failover.takeover_budget_ms"

    text = GOOD.replace(
        'addresses = { lan = "10.77.0.30" }', 'addresses = { lan = "10.77.0.30" }\nlease_ms = 15'
    )
    with pytest.raises(ConfigError) as ei:
        load_agent_config(write(cfgdir, text))
    assert ei.value.field == "witness.lease_ms"


def test_syntax_error_and_missing_file(cfgdir):
    with pytest.raises(ConfigError) as ei:
        load_agent_config(write(cfgdir, "[node\nid="))
    assert ei.value.field == "<syntax>"
    with pytest.raises(ConfigError) as ei:
        load_agent_config(str(cfgdir / "nope.toml"))
    assert ei.value.field == "<file>"


def test_key_file_problems(cfgdir):
    path = write(cfgdir, GOOD)
    (cfgdir / "key").write_text("short")
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert ei.value.field == "node.key_file" and "at least 16" in ei.value.reason
    (cfgdir / "key").write_text("0123456789abcdef0123456789abcdef")
    (cfgdir / "key").chmod(0o644)
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert "readable by everyone" in ei.value.reason
    (cfgdir / "key").unlink()
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert "cannot read key file" in ei.value.reason


def test_witness_config(cfgdir):
    p = cfgdir / "w.toml"
    p.write_text('[witness]\nkey_file = "key"\nlisten = ["10.77.0.30:7790", "10.77.1.30:7790"]\n')
    cfg, _key = load_witness_config(str(p))
    assert cfg.witness.listen == ["10.77.0.30:7790", "10.77.1.30:7790"]
    p.write_text('[witness]\nkey_file = "key"\nlisten = ["10.77.0.30"]\n')
    with pytest.raises(ConfigError) as ei:
        load_witness_config(str(p))
    assert ei.value.field == "witness.listen[0]"


def test_example_configs_are_valid(tmp_path):
    """Every example the README points at must load (with a throwaway key)."""
    import shutil

    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    for name in ("node-a.toml", "node-b.toml"):
        shutil.copy(os.path.join(root, name), tmp_path / name)
        key = tmp_path / "nonstop.key"
        key.write_text("0123456789abcdef0123456789abcdef")
        key.chmod(0o600)
        text = (tmp_path / name).read_text().replace("/etc/nonstop/nonstop.key", str(key))
        (tmp_path / name).write_text(text)
        cfg, _ = load_agent_config(str(tmp_path / name))
        assert cfg.vips
