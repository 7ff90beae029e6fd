"""A node of the takeover scenario (tests/netns/test_takeover.py, ``nonstop bench takeover``), run
inside a lab host as ``python -m nonstop.bench.takeover_node``.

``master VIP PORT BACKUP_HOST SYNC_PORT KEYHEX [LAG]``: an echo service on VIP:PORT (reads,
echoes, commits after each echo; with LAG, a position LAG bytes back, as a service whose
checkpoints trail its output: the peer holds echoed bytes past the last commit) behind a
MasterSession that syncs to the backup. On
SIGUSR2 the service stalls: it stops reading and committing (after the echo it is in, if any)
and prints ``STALLED done=N``, its last commit; the kernel keeps receiving the peer's bytes.
``backup VIP/LEN IFACE SYNC_BIND SYNC_PORT KEYHEX``: a BackupSession; on SIGUSR1 it promotes:
restores every connection, adds the VIP, announces it, echoes on the restored sockets.
Progress lines go to stdout (the lab's log file), flushed.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time

from nonstop.failover.vip import VipManager, VipSpec
from nonstop.session.backup import BackupSession
from nonstop.session.manager import MasterSession


def say(*args: object) -> None:
    print(*args, flush=True)


def master(vip: str, port: int, backup: str, sync_port: int, key: bytes,
           lag: int = 0) -> None:  # fmt: skip
    session = MasterSession(vip, port, key, backup=(backup, sync_port)).open()
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((vip, port))
    srv.listen(1024)
    stall = threading.Event()
    signal.signal(signal.SIGUSR2, lambda *_: stall.set())
    say("READY")

    def report() -> None:
        while True:
            time.sleep(0.1)
            st = session.clamp.stats
            c = session.sender.counters
            say(
                f"STATS seen={st.seen} clamped={st.clamped} held={st.held} captured={st.captured} "
                f"dropped={st.dropped} errors={st.errors} batches={c['batches']} "
                f"records={c['records']} retransmits={c['retransmits']} rx_ack={c['rx_ack']} "
                f"tx_bytes={session.tx_bytes}"
            )

    threading.Thread(target=report, daemon=True).start()

    def serve(conn: socket.socket) -> None:
        ft = (*conn.getsockname()[:2], *conn.getpeername()[:2])
        done = 0
        while not stall.is_set() and (data := conn.recv(65536)):
            conn.sendall(data)
            done += len(data)
            if done > lag:  # an echo's output is its input: replay from any point is exact
                session.commit(ft, done - lag, done - lag)  # type: ignore[arg-type]
        if stall.is_set():
            say(f"STALLED done={done}")
            threading.Event().wait()  # until SIGKILL: neither reads nor commits any more

    while True:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def backup(vip: str, iface: str, bind: str, sync_port: int, key: bytes) -> None:
    session = BackupSession(key, bind=(bind, sync_port)).open()
    go = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: go.set())
    say("READY")
    while not go.wait(0.05):
        pass
    t0 = time.monotonic()
    restored = session.promote()
    t1 = time.monotonic()
    vips = VipManager([VipSpec(vip, iface)])
    vips.acquire()
    asyncio.run(vips.announce())
    t2 = time.monotonic()
    for r in restored:
        say(
            f"RESTORED conn={r.conn_id} read_pos={r.read_pos} write_pos={r.write_pos} "
            f"resent={r.resent} pending={r.pending} sent_pos={r.sent_pos}"
        )
    say(
        f"PROMOTED conns={len(restored)} restore_ms={(t1 - t0) * 1e3:.2f} "
        f"vip_garp_ms={(t2 - t1) * 1e3:.2f} counters={session.receiver.counters}"
    )

    def serve(conn: socket.socket, skip: int) -> None:
        """Echo from the commit on; the restored stream holds ``skip`` bytes of it already."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            n = min(skip, len(data))
            skip -= n
            if data[n:]:
                conn.sendall(data[n:])
        say("EOF")

    threads = [threading.Thread(target=serve, args=(r.sock, r.sent_pos - r.write_pos))
               for r in restored]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "master":
        master(rest[0], int(rest[1]), rest[2], int(rest[3]), bytes.fromhex(rest[4]),
               int(rest[5]) if len(rest) > 5 else 0)
    else:
        backup(rest[0], rest[1], rest[2], int(rest[3]), bytes.fromhex(rest[4]))
