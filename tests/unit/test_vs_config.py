"""nonstop.vs.config: the example loads; wrong configs name the file, the field and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nonstop.common import ConfigError
from nonstop.vs.config import load_vs_config
from nonstop.vs.pool import Policy

EXAMPLE = Path(__file__).parents[2] / "examples" / "vs" / "front.toml"


def _write(tmp_path: Path, text: str) -> str:
    key = tmp_path / "vs.key"
    key.write_text("k" * 32)
    os.chmod(key, 0o600)
    p = tmp_path / "front.toml"
    p.write_text(text)
    return str(p)


def test_example_loads(tmp_path: Path) -> None:
    cfg, key = load_vs_config(_write(tmp_path, EXAMPLE.read_text()))
    assert key == b"k" * 32
    assert [ls.policy for ls in cfg.listeners][:2] == [Policy.LEAST_CONN, Policy.CONSISTENT_HASH]
    specs = cfg.worker_specs()
    assert specs[0].addresses == {"lan": "10.77.0.21", "hb": "10.77.1.21"} and specs[0].heartbeat
    assert cfg.pool_config().dead_interval == pytest.approx(0.06)


BASE = (
    '[front]\nkey_file = "vs.key"\n'
    '[[listeners]]\nname = "web"\nmode = "http"\nlisten = "10.77.0.1:80"\n'
)


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ("[health]\nfall = 0\n", "health.fall", ">= 1"),
        ('[health]\nkind = "command"\n', "health.command", "needs a command"),
        (
            '[[workers]]\nid = "a"\naddresses = { lan = "nope" }\nport = 1\n',
            "workers[0].addresses.lan",
            "not an IP",
        ),
        (
            '[[workers]]\nid = "a"\naddresses = { lan = "10.77.0.2" }\nport = 1\n'
            '[[workers]]\nid = "a"\naddresses = { lan = "10.77.0.3" }\nport = 1\n',
            "workers[1].id",
            "used twice",
        ),
        (
            '[[listeners]]\nname = "r"\nmode = "rpc"\nlisten = "10.77.0.1:7900"\n'
            '[[workers]]\nid = "a"\naddresses = { lan = "10.77.0.2" }\nport = 1\n',
            "workers[0].rpc_port",
            "rpc listener",
        ),
        (
            '[[listeners]]\nname = "x"\nmode = "udp"\nlisten = "10.77.0.1:1"\n',
            "listeners[1].mode",
            "",
        ),
        ("[bogus]\n", "<root>", "unknown field `bogus`"),
    ],
)
def test_bad_configs_name_file_field_reason(
    tmp_path: Path, extra: str, field: str, reason: str
) -> None:
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as e:
        load_vs_config(path)
    assert e.value.file == path and e.value.field == field, e.value
    assert reason.lower() in e.value.reason.lower(), e.value.reason


def test_bad_listen_address(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_vs_config(_write(tmp_path, BASE.replace("10.77.0.1:80", "localhost")))
    assert e.value.field == "listeners[0].listen"
