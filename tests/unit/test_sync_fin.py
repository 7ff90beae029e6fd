"""The end of a stream in the session sync: FIN records (nonstop.session.sync, .mirror).

A FIN takes one sequence number. The master syncs it at its stream's end, the backup holds it,
and the confirmed end counts it, so the ACK clamp may acknowledge the peer's FIN (and let ours
leave) exactly when the backup holds it. (Before FIN records the peer's FIN was never
acknowledged while the master lived: the confirmed end stopped at the last byte.)
"""

from __future__ import annotations

from nonstop.session.mirror import ConnMirror, apply_record, seq_add
from nonstop.session.sync import SyncReceiver, SyncSender
from nonstop.session.wire import CloseReason, Direction, Fin, FullRecord

KEY = bytes(range(32))
RCV, SND = Direction.RCV, Direction.SND
ISS, IRS = 0xFFFF_FFF0, 1000  # our stream wraps


def full(conn_id: int = 1) -> FullRecord:
    return FullRecord(conn_id=conn_id, family=4, local_addr="10.77.0.10", local_port=80,
                      peer_addr="10.77.1.2", peer_port=40000, snd_seq=ISS, rcv_seq=IRS, mss=1448)


def pair() -> tuple[SyncSender, SyncReceiver]:
    tx = SyncSender(KEY, incarnation=7, now=0.0, max_delay=0.0)
    rx = SyncReceiver(KEY, now=0.0, incarnation=9)
    tx.open(1, full(), 0.0)
    return tx, rx


def pump(tx: SyncSender, rx: SyncReceiver, now: float = 0.0) -> None:
    """Deliver everything queued, and the ACKs back, until quiet."""
    for _ in range(10):
        out = tx.datagrams_to_send(now)
        if not out:
            return
        for d in out:
            for a in rx.receive(d, now):
                tx.receive_ack(a, now)


def test_the_peers_fin_is_confirmed_as_one_more_sequence_number() -> None:
    tx, rx = pair()
    tx.data(1, RCV, IRS, b"hello", 0.0)
    pump(tx, rx)
    assert tx.confirmed(1) == (IRS + 5, ISS)
    assert tx.fin(1, RCV, IRS + 5, 0.0)
    pump(tx, rx)
    assert tx.confirmed(1) == (IRS + 6, ISS)  # the clamp may acknowledge the FIN now
    held = rx.connections()[1]
    assert held.rcv_fin == IRS + 5 and held.rcv_data == b"hello" and held.snd_fin is None


def test_a_fin_past_a_gap_waits_for_the_bytes_before_it() -> None:
    tx, rx = pair()
    tx.data(1, RCV, IRS + 3, b"lo", 0.0)  # out of order: "hel" is missing
    assert tx.fin(1, RCV, IRS + 5, 0.0)
    pump(tx, rx)
    assert tx.confirmed(1) is None or tx.confirmed(1)[0] == IRS
    assert rx.connections()[1].rcv_fin is None
    tx.data(1, RCV, IRS, b"hel", 0.0)
    pump(tx, rx)
    assert tx.confirmed(1)[0] == IRS + 6
    assert rx.connections()[1].rcv_data == b"hello" and rx.connections()[1].rcv_fin == IRS + 5


def test_a_fin_again_is_nothing_and_a_contradicting_one_is_refused() -> None:
    tx, rx = pair()
    tx.data(1, RCV, IRS, b"abc", 0.0)
    assert not tx.fin(1, RCV, IRS + 1, 0.0)  # before the end: a forged or broken FIN
    assert tx.fin(1, RCV, IRS + 3, 0.0)
    pump(tx, rx)
    records = tx.counters["records"]
    assert tx.fin(1, RCV, IRS + 3, 0.0)  # the peer sent it again
    assert not tx.fin(1, RCV, IRS + 4, 0.0)
    pump(tx, rx)
    assert tx.counters["records"] == records  # nothing new was queued
    assert rx.connections()[1].rcv_fin == IRS + 3


def test_bytes_after_a_fin_are_dropped_and_counted() -> None:
    tx, rx = pair()
    tx.data(1, RCV, IRS, b"abc", 0.0)
    tx.fin(1, RCV, IRS + 3, 0.0)
    tx.data(1, RCV, IRS + 3, b"late", 0.0)
    pump(tx, rx)
    assert tx.counters["past_fin"] == 1
    assert rx.connections()[1].rcv_data == b"abc"
    assert tx.confirmed(1)[0] == IRS + 4


def test_our_fin_is_confirmed_and_its_ack_is_not_counted_twice() -> None:
    tx, rx = pair()
    tx.data(1, SND, ISS, b"0123456789abcdef-x", 0.0)  # crosses 2**32
    fin = seq_add(ISS, 18)
    assert tx.fin(1, SND, fin, 0.0)
    pump(tx, rx)
    assert tx.confirmed(1) == (IRS, seq_add(fin, 1))  # the clamp lets our FIN leave now
    # the peer acknowledges everything, the FIN too: the stream is trimmed past it
    tx.update(1, rcv_nxt=IRS, snd_una=seq_add(fin, 1), snd_nxt=seq_add(fin, 1), snd_wnd=1000,
              rcv_wnd=1000, now=0.0)
    pump(tx, rx)
    assert tx.confirmed(1) == (IRS, seq_add(fin, 1))
    held = rx.connections()[1]
    assert held.snd_data == b"" and held.snd_start == seq_add(fin, 1) and held.snd_fin == fin
    tx.close(1, CloseReason.CLOSED, 0.0)
    pump(tx, rx)
    assert rx.connections() == {}


def test_a_resync_carries_the_fins() -> None:
    tx, rx = pair()
    tx.data(1, RCV, IRS, b"question", 0.0)
    tx.fin(1, RCV, IRS + 8, 0.0)
    tx.data(1, SND, ISS, b"answer", 0.0)
    tx.fin(1, SND, seq_add(ISS, 6), 0.0)
    pump(tx, rx)
    fresh = SyncReceiver(KEY, now=0.0, incarnation=10)  # a backup that rejoined
    tx.resync(1.0, new_backup=True)
    pump(tx, fresh, 1.0)
    held = fresh.connections()[1]
    assert (held.rcv_fin, held.snd_fin) == (IRS + 8, seq_add(ISS, 6))
    assert (held.rcv_data, held.snd_data) == (b"question", b"answer")
    assert tx.confirmed(1) == (IRS + 9, seq_add(ISS, 7))


def test_the_mirror_takes_a_fin_only_at_its_streams_end() -> None:
    conns = {1: ConnMirror(full())}
    assert apply_record(conns, Fin(1, RCV, IRS + 1)) == "data_gap"
    assert apply_record(conns, Fin(1, RCV, IRS)) is None
    assert conns[1].ends() == (IRS + 1, ISS)
    assert apply_record(conns, Fin(2, RCV, IRS)) == "unknown_conn"
    restored = ConnMirror.from_state(conns[1].snapshot())  # a parked copy keeps it
    assert restored.rcv_fin == IRS and restored.ends() == (IRS + 1, ISS)
