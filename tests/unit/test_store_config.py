"""Store-backed node configs: the fencing margin and the other cross-field checks."""

from __future__ import annotations

import pytest

from nonstop.common import ConfigError
from nonstop.store.config import StoreAgentConfig, parse_store_config

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
    assert cfg.store.fence_timeout == pytest.approx(0.7)


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


SERVICES = """
[[channels]]
name = "hb"
address = "10.77.1.11"
[[groups]]
name = "g1"
vip = "10.77.0.101/24"
interface = "lan"
priorities = {{ n1 = 100, n2 = 200 }}
services = [{svc}]
"""


def parse_services(svc: str, *, first: str = "") -> StoreAgentConfig:
    text = BASE.format(store="").replace(
        'priorities = { n1 = 200, n2 = 100 }',
        'priorities = { n1 = 200, n2 = 100 }\nservices = [' + first + "]",
    )
    text = text.replace('addresses = { lan = "10.77.0.11" }',
                        'addresses = { lan = "10.77.0.11", hb = "10.77.1.11" }')
    text = text.replace('addresses = { lan = "10.77.0.12" }',
                        'addresses = { lan = "10.77.0.12", hb = "10.77.1.12" }')
    head, _, groups = text.partition("[[groups]]")
    extra = SERVICES.format(svc=svc)
    ch, _, g1 = extra.partition("[[groups]]")
    return parse_store_config("node.toml", (head + ch + "[[groups]]" + groups + "[[groups]]"
                                            + g1).encode())


def test_group_services_defaults() -> None:
    cfg = parse_services('{ name = "b", port = 81, sync_channel = "hb" }',
                        first='{ name = "a", port = 80 }')
    assert [(g.name, s.name) for g, s in cfg.services()] == [("g0", "a"), ("g1", "b")]
    assert [cfg.sync_port(i) for i in range(2)] == [7781, 7782]
    assert [cfg.service_queue(i) for i in range(2)] == [100, 101]
    a, b = (s for _, s in cfg.services())
    assert cfg.sync_channel(a) == "lan" and cfg.sync_channel(b) == "hb"


@pytest.mark.parametrize(
    ("first", "svc", "field", "reason"),
    [
        ('{ name = "a", port = 80 }', '{ name = "a", port = 81 }',
         "groups[1].services[0].name", "listed twice"),
        ("", '{ name = "b", port = 81, sync_channel = "x" }',
         "groups[1].services[0].sync_channel", "no channel named 'x'"),
        ('{ name = "a", port = 80, sync_port = 9000 }',
         '{ name = "b", port = 81, sync_port = 9000 }',
         "groups[1].services[0].sync_port", "used by groups[0].services[0]"),
        ('{ name = "a", port = 80, queue = 7 }', '{ name = "b", port = 81, queue = 7 }',
         "groups[1].services[0].queue", "NFQUEUE 7"),
        ("", '{ name = "b", port = 81, sync_port = 7780 }',
         "groups[1].services[0].sync_port", "heartbeat port"),
    ],
)
def test_group_services_rejected(first: str, svc: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_services(svc, first=first)
    assert e.value.file == "node.toml"
    assert e.value.field == field
    assert reason in e.value.reason


def test_group_service_member_without_sync_address() -> None:
    text = BASE.format(store="").replace(
        "priorities = { n1 = 200, n2 = 100 }",
        'priorities = { n1 = 200, n2 = 100 }\nservices = [{ name = "a", port = 80, '
        'sync_channel = "hb" }]',
    ).replace('[[members]]', '[[channels]]\nname = "hb"\naddress = "10.77.1.11"\n[[members]]', 1)
    text = text.replace('addresses = { lan = "10.77.0.11" }',
                        'addresses = { lan = "10.77.0.11", hb = "10.77.1.11" }')
    with pytest.raises(ConfigError) as e:
        parse_store_config("node.toml", text.encode())
    assert e.value.field == "groups[0].services[0].sync_channel"
    assert "'n2'" in e.value.reason
