"""A protected service on an IPv6 VIP whose session sync runs over an IPv4 channel.

The VIP's family picks iptables or ip6tables and the restored sockets' family; the sync sockets
take the sync channel's. (They used to take the VIP's: an IPv6 service with the usual IPv4
heartbeat channel could not even bind its backup side, and the agent failed to start.) A peer or
witness address of the other family than this node's on the same channel, or a TCP-MD5 key for
an address of the other family than the service's VIP, can never be used: the config says so.
"""

from __future__ import annotations

import time

import pytest
from nodecfg import NODE_A, write

from nonstop.agent.sessions import Sessions
from nonstop.common import ConfigError
from nonstop.config import load_agent_config
from nonstop.session.backup import BackupSession
from nonstop.session.manager import MasterSession
from nonstop.session.service import ServiceSpec

KEY = bytes(range(32))

CONFIG = NODE_A + """
[[channels]]
name = "lan"
address = "fd77::11"

[[channels]]
name = "hb"
address = "10.77.1.11"

[[peers]]
id = "node-b"
addresses = { lan = "fd77::12", hb = "10.77.1.12" }

[[vips]]
address = "fd77::100/64"
interface = "lan"

[witness]
addresses = { hb = "10.77.1.13" }

[[services]]
name = "stream"
vip = "fd77::100"
port = 7400
sync_channel = "hb"
md5 = { "fd77::1" = "secret" }
"""




def test_ipv6_service_with_ipv4_sync_channel_loads(cfgdir):
    cfg, key = load_agent_config(write(cfgdir, CONFIG))
    (spec,) = [ServiceSpec(**s) for s in Sessions(cfg, key).specs()]
    assert (spec.vip, spec.family) == ("fd77::100", 6)
    assert (spec.sync_addr, spec.sync_family) == ("10.77.1.11", 4)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (('hb = "10.77.1.12"', 'hb = "fd77:1::12"'), "peers[0].addresses.hb", "is IPv6"),
        (('lan = "fd77::12"', 'lan = "10.77.0.12"'), "peers[0].addresses.lan", "is IPv4"),
        (('hb = "10.77.1.13"', 'hb = "fd77:1::13"'), "witness.addresses.hb", "is IPv6"),
        (('"fd77::1" = "secret"', '"10.77.0.1" = "secret"'), "services[0].md5", "vip is IPv6"),
    ],
)
def test_address_of_the_other_family_is_rejected(cfgdir, change, field, words):
    path = write(cfgdir, CONFIG.replace(*change, 1))
    with pytest.raises(ConfigError) as ei:
        load_agent_config(path)
    assert (ei.value.file, ei.value.field) == (path, field), str(ei.value)
    assert words in ei.value.reason


def test_ipv6_master_syncs_to_its_backup_over_ipv4():
    """The master's side of an IPv6 VIP sends its sync over IPv4 and the backup applies it (a
    backup joining gets a RESET batch at once, even with no connection open)."""
    with BackupSession(KEY, bind=("127.0.0.1", 0), family=4) as backup:
        master = MasterSession("fd77::100", 7400, KEY, backup=None, family=6, sync_family=4,
                               sync_bind=("127.0.0.1", 0))  # fmt: skip
        try:
            master.set_backup(backup.address)
            deadline = time.monotonic() + 5
            while backup.receiver.applied < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert backup.receiver.applied >= 1, backup.receiver.counters
        finally:
            master.close()
