"""The agent's HTTP interface (Patroni's api.py is the model).

Served on a unix socket in the state directory (for ``nonstop status``, reachable from any network
namespace) and, when ``api.listen`` is set, on TCP for load balancers and Prometheus:

- ``GET /health``: 200 while the agent runs and is not in FAULT, else 503
- ``GET /master``: 200 on the master, 503 elsewhere; ``GET /backup``: 200 on a backup, else 503
- ``GET /status``: the full status as JSON (what ``nonstop status`` prints)
- ``GET /metrics``: Prometheus text format

and, on the unix socket only (``nonstop service reset``):

- ``POST /services/{name}/reset``: clear the crash loop of a supervised service (every instance)
  or of one instance; 200 with what was done (``changed`` false if it was not in a crash loop),
  404 if the agent supervises no such service.

The API has no login: the TCP listener only reads, and whoever may act on the node must be able
to open the unix socket, which is created mode 0660 (owner and group of the agent) before it
listens. Nothing mutates over TCP: ``POST`` there is a 404.
"""

from __future__ import annotations

import contextlib
import os
import socket
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
        self._runner = web.AppRunner(self._app(control=True), access_log=None, handle_signals=False)
        self._tcp_runner: web.AppRunner | None = None
        if agent.cfg.api.listen:  # read-only: no POST route at all
            self._tcp_runner = web.AppRunner(
                self._app(control=False), access_log=None, handle_signals=False
            )

    def _app(self, *, control: bool) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/master", self.master)
        app.router.add_get("/primary", self.master)
        app.router.add_get("/backup", self.backup)
        app.router.add_get("/status", self.status)
        app.router.add_get("/metrics", self.metrics)
        if control:
            app.router.add_post("/services/{name}/reset", self.reset_service)
        return app

    async def start(self) -> None:
        await self._runner.setup()
        path = self.agent.cfg.socket_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        # bound, made 0660, and only then listening: no connection is accepted before the mode
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o660)
        except BaseException:
            sock.close()
            raise
        await web.SockSite(self._runner, sock).start()
        listen = self.agent.cfg.api.listen
        if self._tcp_runner is not None:
            await self._tcp_runner.setup()
            host, _, port = listen.rpartition(":")
            site = web.TCPSite(self._tcp_runner, host.strip("[]"), int(port), reuse_address=True)
            await site.start()

    async def close(self) -> None:
        await self._runner.cleanup()
        if self._tcp_runner is not None:
            await self._tcp_runner.cleanup()
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

    async def reset_service(self, request: web.Request) -> web.Response:
        try:
            out = self.agent.reset_service(request.match_info["name"])
        except KeyError as e:
            return web.json_response({"error": e.args[0]}, status=404)
        return web.json_response(out)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
