"""The agent's status: what ``nonstop status`` (the control socket) and the HTTP API show."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nonstop import __version__
from nonstop.common import Role

if TYPE_CHECKING:
    from nonstop.agent.daemon import Agent


def agent_status(agent: Agent) -> dict[str, Any]:
    """What ``nonstop status`` shows of one agent (the control socket's and the API's view)."""
    now = time.monotonic()
    cfg = agent.cfg
    held = set(agent.vips.held())
    return {
        "node": cfg.node.id,
        "group": cfg.node.group,
        "role": str(agent.roles.role),
        "since_s": round(now - agent.role_since, 3),
        "reason": agent.roles.reason,
        "priority": cfg.node.priority,
        "incarnation": agent.incarnation,
        "uptime_s": round(now - agent.started, 3),
        "monotonic": now,
        "version": __version__,
        "heartbeat": {
            "interval_ms": cfg.heartbeat.interval_ms,
            "dead_after": cfg.heartbeat.dead_after,
            "copies": cfg.heartbeat.copies,
        },
        "vips": [
            {"address": v.address, "interface": v.interface, "held": v.address in held}
            for v in cfg.vips
        ],
        "peers": [_peer_view(agent, p.id) for p in cfg.peers],
        "stations": [_row(r) for r in agent.membership.table(now)],
        "links": agent.links.status(),
        "witness": None
        if cfg.witness is None
        else {
            "addresses": cfg.witness.addresses,
            "lease_ms_left": None
            if agent.roles.lease_until is None
            else round(max(0.0, agent.roles.lease_until - now) * 1000, 1),
        },
        "stalls": {  # this node not running: a host freeze, or no CPU (_woke)
            "count": agent.membership.stalls,
            "total_ms": round(agent.membership.stalled_s * 1000, 1),
        },
        "counters": {
            **dict(agent.membership.counters),
            **{f"link_{k}": v for k, v in agent.links.counters.items()},
            **dict(agent.counters),
            "hook_runs": agent.hooks.runs,
            "hook_failures": agent.hooks.failures,
        },
        "realtime": {"requested": cfg.failover.realtime, "failed": agent.realtime_failed},
        "neighbours_tuned": agent.neigh_tuned,
        "sessions": agent.sessions.cached,
        "session_worker": agent.sessions.status(),
        "services": agent.services.status(),
        "faults": list(agent.faults.causes.values()),
        "history": list(agent.history),
    }


def _peer_view(agent: Agent, peer: str) -> dict[str, Any]:
    v = agent.membership.peer(peer)
    if v is None:
        return {"id": peer, "alive": False, "role": None, "priority": None}
    return {
        "id": peer,
        "alive": v.alive,
        "role": str(Role(v.role)) if v.role is not None else None,
        "priority": v.priority,
        "incarnation": v.incarnation,
    }


def _row(r: Any) -> dict[str, Any]:
    return {
        "peer": r.peer,
        "channel": r.channel,
        "state": r.state,
        "last_heard_ms": None if r.last_heard is None else round(r.last_heard * 1000, 1),
        "rtt_ms": None if r.rtt_ms is None else round(r.rtt_ms, 3),
        "loss": None if r.loss is None else round(r.loss, 4),
        "role": None if r.role is None else str(Role(r.role)),
        "priority": r.priority,
    }
