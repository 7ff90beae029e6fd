"""Neighbour (ARP/NDP) retransmission on the heartbeat channels.

Heartbeats and witness requests are unicast, so they need the peer's MAC. When a link comes back
after an outage, the kernel's entry for the peer sits in INCOMPLETE and is only probed again
every ``retrans_time_ms`` (1000 ms by default): for up to a second after a heal a node hears its
peer but cannot answer it, so a preemption or a second failover waits that long (measured in the
lab: ~350 ms median). The agent therefore lowers ``retrans_time_ms`` of the interfaces that carry
its channels to the heartbeat interval (never raises it), IPv4 and IPv6, in its own network
namespace. ``[heartbeat] tune_neighbours = false`` turns this off; every change is logged.
"""

from __future__ import annotations

import logging
import os
import socket

from nonstop.failover.netlink import AddrSocket

log = logging.getLogger("nonstop.neigh")


def interfaces_of(addresses: list[str]) -> dict[str, str]:
    """Map each local address to the name of the interface that carries it."""
    sock = AddrSocket()
    try:
        found = {a.address: a.index for a in sock.dump()}
    finally:
        sock.close()
    out = {}
    for addr in addresses:
        idx = found.get(addr)
        if idx is not None:
            out[addr] = socket.if_indextoname(idx)
    return out


def tune_retrans(ifnames: set[str], interval_ms: int) -> list[str]:
    """Lower retrans_time_ms to ``interval_ms`` (at least 10) on each interface; return what
    changed, as ``"lan ipv4 1000->10"``."""
    want = max(10, interval_ms)
    changed = []
    for ifname in sorted(ifnames):
        for family in ("ipv4", "ipv6"):
            path = f"/proc/sys/net/{family}/neigh/{ifname}/retrans_time_ms"
            try:
                with open(path) as f:
                    cur = int(f.read().strip())
                if cur <= want:
                    continue
                with open(path, "w") as f:
                    f.write(str(want))
            except (OSError, ValueError) as e:
                if os.path.exists(path):
                    log.warning("cannot tune %s: %s", path, e)
                continue
            changed.append(f"{ifname} {family} {cur}->{want}")
    if changed:
        log.info("neighbour retransmit time lowered to %d ms: %s", want, ", ".join(changed))
    return changed
