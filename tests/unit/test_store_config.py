"""Store-backed node configs: the fencing margin and the other cross-field checks."""

from __future__ import annotations

import pytest

from nonstop.common import ConfigError
from nonstop.store.config import parse_store_config

BASE = """
[node]
id = "n1"
key_file = "k"
[store]
endpoints = ["http://10.77.2.21:2379"]
{store}
[[channels]]
name = "lan"
address = "10.77.0.11"
[[members]]
id = "n1"
addresses = {{ lan = "10.77.0.11" }}
[[members]]
id = "n2"
addresses = {{ lan = "10.77.0.12" }}
[[groups]]
name = "g0"
vip = "10.77.0.100/24"
interface = "lan"
priorities = {{ n1 = 200, n2 = 100 }}
"""


def parse(store: str = "") -> object:
    return parse_store_config("node.toml", BASE.format(store=store).encode())


def test_good() -> None:
    cfg = parse()
    assert cfg.store.fence_timeout == pytest.approx(0.7)  # type: ignore[attr-defined]


def test_lease_without_margin_is_rejected_with_file_field_reason() -> None:
    with pytest.raises(ConfigError) as e:
        parse("lease_ttl_ms = 1000\nkeepalive_interval_ms = 300\nkeepalive_misses = 3")
    assert e.value.file == "node.toml"
    assert e.value.field == "store.lease_ttl_ms"
    assert "300 * 3 + 200 = 1100" in e.value.reason


@pytest.mark.parametrize(
    ("store", "field"),
    [
        ("lease_ttl_ms = 1500", "store.lease_ttl_ms"),
        ('kind = "zk"', "store.kind"),
        ("drop_margin_ms = 10", "store.drop_margin_ms"),
        ("timeout_ms = 5000", "store.timeout_ms"),
        ('endpoints = ["10.77.2.21:2379"]', "store.endpoints"),
    ],
)
def test_rejected(store: str, field: str) -> None:
    text = BASE.format(store=store)
    if store.startswith("endpoints"):
        text = text.replace('endpoints = ["http://10.77.2.21:2379"]\n', "")
    with pytest.raises(ConfigError) as e:
        parse_store_config("node.toml", text.encode())
    assert e.value.field.startswith(field)


def test_unknown_priority_node() -> None:
    text = BASE.format(store="").replace("n2 = 100", "n9 = 100")
    with pytest.raises(ConfigError) as e:
        parse_store_config("node.toml", text.encode())
    assert e.value.field == "groups[0].priorities.n9"


def test_example_config_is_valid() -> None:
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "etcd" / "node-a.toml"
    cfg = parse_store_config(str(path), path.read_bytes())
    assert [g.name for g in cfg.groups] == ["web", "db"]
