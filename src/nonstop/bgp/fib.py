"""Installs the Loc-RIB's best routes into a kernel routing table through netlink (pyroute2).

Locally originated routes are not installed (they have no next hop). Routes carry protocol 186
(RTPROT_BGP) so ``ip route show proto bgp table N`` lists exactly ours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

from pyroute2 import IPRoute

from nonstop.bgp.nlri import prefix_of
from nonstop.bgp.speaker import Speaker
from nonstop.bgp.wire import IPV4_UNICAST

log = logging.getLogger("nonstop.bgp.fib")
RTPROT_BGP = 186


class Fib:
    def __init__(self, table: int) -> None:
        self.table = table
        self.ipr = IPRoute()
        self.installed = 0
        self.errors = 0

    def apply(self, sp: Speaker) -> None:
        dirty = sp.fib_dirty or {}
        sp.fib_dirty = {}
        for fam, keys in dirty.items():
            v = 4 if fam == IPV4_UNICAST else 6
            loc = sp.loc[fam]
            for k in keys:
                best = loc.get(k)
                dst = prefix_of(k, v)
                nh = best.attrs.next_hop[:16] if best is not None and not best.source.local \
                    else b""
                try:
                    if nh:
                        gw = str(ipaddress.ip_address(nh))
                        self.ipr.route("replace", dst=dst, gateway=gw, table=self.table,
                                       proto=RTPROT_BGP,
                                       family=socket.AF_INET if v == 4 else socket.AF_INET6)
                        self.installed += 1
                    else:
                        with contextlib.suppress(Exception):
                            self.ipr.route("del", dst=dst, table=self.table, proto=RTPROT_BGP,
                                           family=socket.AF_INET if v == 4 else socket.AF_INET6)
                except Exception as e:  # unreachable gateway and the like
                    self.errors += 1
                    log.debug("route %s via %s: %s", dst, nh.hex(), e)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ipr.close()
