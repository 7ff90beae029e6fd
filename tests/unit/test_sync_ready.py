"""A master syncs to a backup only once that backup's worker listens (FLAG_SYNC_READY).

The master's clamp engages as soon as it has a backup: if the backup's worker is still starting
or demoting, the first sync datagrams are lost and every stream on the master waits for their
retransmissions (the demo's planned handovers: 300-800 ms of silence). The backup says when its
worker listens, in its heartbeats; the master's agent picks only such a peer.
"""

from __future__ import annotations

from typing import Any

import pytest
from nodecfg import NODE_A, write

from nonstop.agent.sessions import Sessions
from nonstop.common import Role
from nonstop.config import load_agent_config
from nonstop.membership import FLAG_SYNC_READY, PeerView

CONFIG = NODE_A + """
[[channels]]
name = "hb"
address = "10.77.1.11"

[[peers]]
id = "node-b"
addresses = { hb = "10.77.1.12" }

[[vips]]
address = "10.77.0.100/24"
interface = "hb"

[[services]]
name = "stream"
vip = "10.77.0.100"
port = 7400
sync_channel = "hb"
sync_port = 7781
"""


@pytest.fixture
def sessions(cfgdir: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Sessions, list[Any]]:
    cfg, key = load_agent_config(write(cfgdir, CONFIG))
    s = Sessions(cfg, key)
    sent: list[Any] = []

    def send(req: dict[str, Any], done: Any) -> bool:  # the worker's channel, recorded
        sent.append((req, done))
        return True

    monkeypatch.setattr(s, "_send", send)
    return s, sent


def view(flags: int, role: Role = Role.BACKUP) -> dict[str, PeerView]:
    return {"node-b": PeerView("node-b", True, role, 100, flags, 1, 0.0, ("hb",))}


def test_master_syncs_only_to_a_backup_that_listens(sessions: tuple[Sessions, list[Any]]) -> None:
    s, sent = sessions
    s.peers_changed(Role.MASTER, view(0))  # alive, backup, worker not listening yet
    assert sent == []
    s.peers_changed(Role.MASTER, view(FLAG_SYNC_READY))
    assert [r for r, _ in sent] == [{"op": "set_backup", "peers": [["10.77.1.12", 7781]]}]
    s.peers_changed(Role.MASTER, view(0))  # its worker went (restarting, demoting): stop
    assert sent[-1][0] == {"op": "set_backup", "peers": [None]}


def test_sync_ready_after_start_and_after_the_demote_reply(
    sessions: tuple[Sessions, list[Any]],
) -> None:
    s, sent = sessions
    assert not s.sync_ready  # no worker
    s.worker = object()  # type: ignore[assignment]  # as after start(): spawn waited for init
    s._backup_side = True
    assert s.sync_ready
    s.promote(lambda: None)
    assert not s.sync_ready  # master side now
    s.demote()
    assert not s.sync_ready  # until the worker says it is a backup again
    req, done = sent[-1]
    assert req == {"op": "demote"} and done is not None
    done({"ok": True})
    assert s.sync_ready
    s.demote()
    sent[-1][1](None)  # the worker died meanwhile
    assert not s.sync_ready
