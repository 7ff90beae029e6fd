"""The speaker's operator interface on a unix socket (like nonstop.agent.api):

- ``GET /summary``: one row per peer (state, since, prefixes, counters)
- ``GET /routes?prefix=P&limit=N``: Loc-RIB best routes (equal to or inside P)
- ``GET /metrics``: Prometheus text, per peer
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nonstop.bgp.attrs import Attrs
from nonstop.bgp.fsm import State
from nonstop.bgp.nlri import prefix_of
from nonstop.bgp.policy import format_community
from nonstop.bgp.wire import IPV4_UNICAST, IPV6_UNICAST

if TYPE_CHECKING:
    from nonstop.bgp.aio import SpeakerService


_STATES = {str(s): s for s in State}


def route_row(key: int, v: int, source: str, a: Attrs) -> dict[str, Any]:
    nh = a.next_hop[:16]
    return {
        "prefix": prefix_of(key, v),
        "from": source,
        "next_hop": str(ipaddress.ip_address(nh)) if len(nh) in (4, 16) else None,
        "as_path": " ".join(("{" + ",".join(map(str, s)) + "}") if t == 1 else
                            " ".join(map(str, s)) for t, s in a.as_path),
        "origin": ("igp", "egp", "incomplete")[a.origin],
        "local_pref": a.local_pref,
        "med": a.med,
        "communities": [format_community(c) for c in a.communities],
        "large_communities": [":".join(map(str, c)) for c in a.large_communities],
    }


def routes(svc: SpeakerService, prefix: str | None, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    net = ipaddress.ip_network(prefix, strict=False) if prefix else None
    for fam, v in ((IPV4_UNICAST, 4), (IPV6_UNICAST, 6)):
        if net is not None and net.version != v:
            continue
        for k, path in svc.speaker.loc[fam].items():
            if net is not None:
                plen = k & 0xFF
                bits = 32 if v == 4 else 128
                if plen < net.prefixlen or (k >> 8) >> (bits - net.prefixlen) != \
                        int(net.network_address) >> (bits - net.prefixlen):
                    continue
            out.append(route_row(k, v, path.source.name, path.attrs))
            if len(out) >= limit:
                return out
    return out


class BgpCollector(Collector):
    def __init__(self, svc: SpeakerService) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Any]:
        rows = self.svc.summary()
        up = GaugeMetricFamily("nonstop_bgp_peer_up", "1 if the session is Established",
                               labels=["peer"])
        state = GaugeMetricFamily("nonstop_bgp_peer_state", "FSM state (1 Idle .. 6 "
                                  "Established)", labels=["peer"])
        pfx = GaugeMetricFamily("nonstop_bgp_prefixes_received", "Adj-RIB-In size",
                                labels=["peer", "family"])
        sent = GaugeMetricFamily("nonstop_bgp_prefixes_sent", "Adj-RIB-Out size",
                                 labels=["peer", "family"])
        msgs = CounterMetricFamily("nonstop_bgp_events", "Per-peer counters (messages, "
                                   "errors)", labels=["peer", "kind"])
        for r in rows:
            st = _STATES[r["state"]]
            up.add_metric([r["peer"]], 1.0 if st == State.ESTABLISHED else 0.0)
            state.add_metric([r["peer"]], float(st))
            for f, n in r["prefixes_received"].items():
                pfx.add_metric([r["peer"], f], float(n))
            for f, n in r["prefixes_sent"].items():
                sent.add_metric([r["peer"], f], float(n))
            for k, n in r["counters"].items():
                msgs.add_metric([r["peer"], k], float(n))
        yield from (up, state, pfx, sent, msgs)


async def start_api(svc: SpeakerService, path: str) -> web.AppRunner:
    registry = CollectorRegistry()
    registry.register(BgpCollector(svc))

    async def summary(_: web.Request) -> web.Response:
        return web.json_response({"router_id": svc.cfg.router_id, "asn": svc.cfg.asn,
                                  "pid": os.getpid(), "takeover": svc.takeover,
                                  "standbys": svc.standbys(),
                                  "peers": svc.summary(), **svc.extra_summary()})

    async def get_routes(req: web.Request) -> web.Response:
        prefix = req.query.get("prefix")
        try:
            limit = int(req.query.get("limit", "1000"))
            rows = routes(svc, prefix, limit)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        total = sum(len(t) for t in svc.speaker.loc.values())
        return web.json_response({"total": total, "routes": rows})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    app = web.Application()
    app.router.add_get("/summary", summary)
    app.router.add_get("/routes", get_routes)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    await web.UnixSite(runner, path).start()
    return runner
