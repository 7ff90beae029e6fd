"""A backup side that holds this node's parked connections must apply a new master's sync that
arrived before it was seeded, not be overwritten by the seed (service._start_backup seeds the
BackupSession before it reads its first datagram)."""

from __future__ import annotations

import time

from test_session_sync import KEY, full

from nonstop.session.backup import BackupSession
from nonstop.session.sync import SyncSender


def test_a_masters_reset_that_came_first_replaces_the_parked_copy() -> None:
    parked_src = SyncSender(KEY, incarnation=1, now=0.0)
    for i in (1, 2, 3):
        parked_src.open(i, full(i, 1000 * i, 2000 * i), 0.0)
    parked = [(cs, time.monotonic()) for cs in parked_src.connections().values()]

    backup = BackupSession(KEY, bind=("127.0.0.1", 0))  # bound, not reading yet
    master = SyncSender(KEY, incarnation=2, now=0.0, max_batch=1)
    master.open(7, full(7, 7000, 8000), 0.0)  # the new master's RESET + FULL
    for d in master.datagrams_to_send(0.0):
        backup._udp.sendto(d, backup.address)  # in the socket before the seed
    backup.seed(parked)
    assert backup.seeded
    with backup:  # open(): the receive thread starts
        deadline = time.monotonic() + 5
        while backup.seeded and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not backup.seeded  # the master's sync won
        assert set(backup.connections()) == {7}


def test_seeding_after_the_masters_sync_would_lose_it() -> None:
    """The hazard the order avoids: a seed applied after the master's RESET replaces it, and
    the next promotion (the copy counts as parked) drops every connection."""
    backup = BackupSession(KEY, bind=("127.0.0.1", 0))
    master = SyncSender(KEY, incarnation=2, now=0.0, max_batch=1)
    master.open(7, full(7, 7000, 8000), 0.0)
    with backup:
        for d in master.datagrams_to_send(0.0):
            backup._udp.sendto(d, backup.address)
        deadline = time.monotonic() + 5
        while not backup.connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        stale = SyncSender(KEY, incarnation=1, now=0.0)
        stale.open(1, full(1, 1000, 2000), 0.0)
        backup.seed([(cs, time.monotonic()) for cs in stale.connections().values()])
        assert backup.seeded and set(backup.connections()) == {1}
