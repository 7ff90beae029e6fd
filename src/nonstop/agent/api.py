"""The agent's HTTP interface (Patroni's api.py is the model).

Served on a unix socket in the state directory (for ``nonstop status``, reachable from any network
namespace) and, when ``api.listen`` is set, on TCP for load balancers and Prometheus:

- ``GET /health``: 200 while the agent runs and is not in FAULT, else 503
- ``GET /master``: 200 on the master, 503 elsewhere; ``GET /backup``: 200 on a backup, else 503
- ``GET /status``: the full status as JSON (what ``nonstop status`` prints)
- ``GET /metrics``: Prometheus text format
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nonstop.common import Role

if TYPE_CHECKING:
    from nonstop.agent.daemon import Agent


class AgentCollector(Collector):
    """Reads the agent's state at scrape time: nothing on the hot path."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Any]:
        st = self.agent.status()
        node = st["node"]
        role = GaugeMetricFamily(
            "nonstop_role", "1 for the node's current role", labels=["node", "role"]
        )
        for r in Role:
            role.add_metric([node, str(r)], 1.0 if st["role"] == str(r) else 0.0)
        yield role
        yield GaugeMetricFamily(
            "nonstop_role_since_seconds", "Time in the current role", value=st["since_s"]
        )
        vip = GaugeMetricFamily(
            "nonstop_vip_held", "1 if this node holds the VIP", labels=["address"]
        )
        for v in st["vips"]:
            vip.add_metric([v["address"]], 1.0 if v["held"] else 0.0)
        yield vip
        up = GaugeMetricFamily(
            "nonstop_channel_up",
            "1 if the peer is heard on the channel",
            labels=["peer", "channel"],
        )
        rtt = GaugeMetricFamily(
            "nonstop_channel_rtt_seconds", "Heartbeat round-trip time", labels=["peer", "channel"]
        )
        loss = GaugeMetricFamily(
            "nonstop_channel_loss_ratio", "Recent heartbeat loss", labels=["peer", "channel"]
        )
        for row in st["stations"]:
            labels = [row["peer"], row["channel"]]
            up.add_metric(labels, 1.0 if row["state"] == "up" else 0.0)
            if row["rtt_ms"] is not None:
                rtt.add_metric(labels, row["rtt_ms"] / 1000)
            if row["loss"] is not None:
                loss.add_metric(labels, row["loss"])
        yield up
        yield rtt
        yield loss
        events = CounterMetricFamily(
            "nonstop_events", "Agent counters (heartbeats, drops, faults)", labels=["kind"]
        )
        for k, v in sorted(st["counters"].items()):
            events.add_metric([k], float(v))
        yield events


class AgentApi:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(agent))
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/master", self.master)
        app.router.add_get("/primary", self.master)
        app.router.add_get("/backup", self.backup)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()
        path = self.agent.cfg.socket_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await web.UnixSite(self._runner, path).start()
        os.chmod(path, 0o660)
        listen = self.agent.cfg.api.listen
        if listen:
            host, _, port = listen.rpartition(":")
            await web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True).start()

    async def close(self) -> None:
        await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.agent.cfg.socket_path)

    def _role_reply(self, ok: bool) -> web.Response:
        st = self.agent.status()
        body = {"node": st["node"], "role": st["role"], "reason": st["reason"]}
        return web.json_response(body, status=200 if ok else 503)

    async def health(self, request: web.Request) -> web.Response:
        return self._role_reply(self.agent.roles.role not in (Role.FAULT, Role.STOPPING))

    async def master(self, request: web.Request) -> web.Response:
        return self._role_reply(self.agent.roles.role == Role.MASTER)

    async def backup(self, request: web.Request) -> web.Response:
        return self._role_reply(self.agent.roles.role == Role.BACKUP)

    async def status(self, request: web.Request) -> web.Response:
        await self.agent.sessions.refresh()  # the session worker's part, fresh
        return web.json_response(self.agent.status())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
