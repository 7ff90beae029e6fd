"""Installs the Loc-RIB's best routes into a kernel routing table through netlink (pyroute2).

Locally originated routes are not installed (they have no next hop). Routes carry protocol 186
(RTPROT_BGP) so ``ip route show proto bgp table N`` lists exactly ours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import socket
import threading

from pyroute2 import IPRoute

from nonstop.bgp.nlri import prefix_of
from nonstop.bgp.speaker import Speaker
from nonstop.bgp.wire import IPV4_UNICAST

log = logging.getLogger("nonstop.bgp.fib")
RTPROT_BGP = 186


class Fib:
    """Route changes are taken from the speaker on the event loop and applied by one worker
    thread that owns the netlink socket (pyroute2's sync IPRoute cannot run inside a loop)."""

    def __init__(self, table: int) -> None:
        self.table = table
        self.installed = 0
        self.errors = 0
        self.q: queue.Queue[list[tuple[str, str | None, int]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="bgp-fib", daemon=True)
        self.thread.start()

    def apply(self, sp: Speaker) -> None:
        dirty = sp.fib_dirty or {}
        sp.fib_dirty = {}
        batch: list[tuple[str, str | None, int]] = []
        for fam, keys in dirty.items():
            v = 4 if fam == IPV4_UNICAST else 6
            loc = sp.loc[fam]
            for k in keys:
                best = loc.get(k)
                nh = best.attrs.next_hop[:16] if best is not None and not best.source.local \
                    else b""
                gw = str(ipaddress.ip_address(nh)) if len(nh) in (4, 16) else None
                batch.append((prefix_of(k, v), gw, socket.AF_INET if v == 4 else
                              socket.AF_INET6))
        if batch:
            self.q.put(batch)

    def _work(self) -> None:
        ipr = IPRoute()
        try:
            while (batch := self.q.get()) is not None:
                for dst, gw, family in batch:
                    try:
                        if gw is not None:
                            ipr.route("replace", dst=dst, gateway=gw, table=self.table,
                                      proto=RTPROT_BGP, family=family)
                            self.installed += 1
                        else:
                            with contextlib.suppress(Exception):
                                ipr.route("del", dst=dst, table=self.table, proto=RTPROT_BGP,
                                          family=family)
                    except Exception as e:  # unreachable gateway and the like
                        self.errors += 1
                        log.debug("route %s via %s: %s", dst, gw, e)
        finally:
            ipr.close()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=5)
