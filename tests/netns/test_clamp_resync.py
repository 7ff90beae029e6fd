"""The ACK clamp while a backup joins (nonstop.session.manager.MasterSession).

Without a backup the master acknowledges freely (no other node could deliver the bytes). The
moment a backup is set, no byte may be acknowledged that the backup does not hold: not after the
resync is acknowledged, from the start. Here the backup first does not answer at all: the peer's
new bytes reach the master's kernel but its acknowledged count must not move; then the backup
answers (a real SyncReceiver) and the acknowledgement catches up. (It used to engage only once
the resync was acknowledged: a master killed right then had told the peer about bytes its backup
never got, and the restored connection waited forever for bytes the peer would not resend.)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
from tcpwatch import answering, bytes_acked, connected, wait_stable

from nonstop.lab import Lab, Topology, nsops
from nonstop.session.manager import MasterSession
from nonstop.session.sync import SyncReceiver

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

A, B, PORT, SYNC = "10.77.0.11", "10.77.0.12", 7350, 7351
KEY = bytes(range(32))


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    topo = Topology(source="<clamp-resync>")
    topo.channel("lan", v4="10.77.0.0/24")
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return lab_factory(topo)


def test_no_byte_acknowledged_past_the_backup_while_it_resyncs(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    m = nsops.in_netns(a.ns, lambda: MasterSession(A, PORT, KEY, backup=None, queue_num=11))
    m.open()
    sync = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sync.bind((B, SYNC))
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        with connected(a, b, A, PORT) as (cli, srv):
            base = bytes_acked(cli)
            cli.sendall(b"x" * 1000)  # no backup: acknowledged at once
            assert wait_stable(lambda: bytes_acked(cli)) - base == 1000
            m.set_backup((B, SYNC))  # a backup that does not answer yet
            cli.sendall(b"y" * 1000)
            got = b""
            srv.settimeout(5)
            while len(got) < 2000:
                got += srv.recv(4096)  # the master's kernel holds it all ...
            # ... and the peer is told nothing of it
            assert wait_stable(lambda: bytes_acked(cli)) - base == 1000
            assert not m.protecting

            rx = SyncReceiver(KEY, now=time.monotonic(), incarnation=1)
            threads.append(answering(sync, rx, stop))
            srv.sendall(b"z")  # a segment carrying the ACK, no need to wait for a timer
            deadline = time.monotonic() + 10
            while bytes_acked(cli) - base < 2000 and time.monotonic() < deadline:
                time.sleep(0.02)
                if not m.protecting:
                    continue
                srv.sendall(b"z")
            assert bytes_acked(cli) - base == 2000 and m.protecting
            (held,) = rx.connections().values()
            assert held.rcv_end - held.full.rcv_seq == 2000  # the backup holds every byte
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        m.close()
        sync.close()
