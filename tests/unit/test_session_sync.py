"""Session sync: sender and receiver over a fake lossy, reordering link, checked against a model.

The model is the test's own: per connection, the two byte streams, which of their bytes the master
was told about (coverage), the committed read position and the peer's snd_una. After any run of
operations and once the link is quiet, the backup must hold exactly what the model says.
"""

from __future__ import annotations

import itertools
import random

import pytest

from nonstop.common import LocalProtocolError
from nonstop.session.mirror import ConnState, seq_add, seq_diff, seq_lt
from nonstop.session.sync import RESEND_BURST, SyncReceiver, SyncSender
from nonstop.session.wire import CloseReason, Commit, Direction, FullRecord

KEY = bytes(range(32))
M = 2**32


class FakeLink:
    """One direction of a datagram link: loses, duplicates and reorders (random delay)."""

    def __init__(self, rng: random.Random, loss: float, dup: float, max_delay: float) -> None:
        self.rng, self.loss, self.dup, self.max_delay = rng, loss, dup, max_delay
        self.queue: list[tuple[float, int, bytes]] = []
        self.n = 0

    def send(self, data: bytes, now: float) -> None:
        for _ in range(1 + (self.rng.random() < self.dup)):
            if self.rng.random() >= self.loss:
                self.n += 1
                self.queue.append((now + self.rng.uniform(0, self.max_delay), self.n, data))

    def deliver(self, now: float) -> list[bytes]:
        due = sorted(x for x in self.queue if x[0] <= now)
        self.queue = [x for x in self.queue if x[0] > now]
        return [d for _, _, d in due]


def test_seq_helpers_wrap() -> None:
    assert seq_add(M - 1, 2) == 1
    assert seq_diff(1, M - 1) == 2 and seq_diff(M - 1, 1) == -2
    assert seq_lt(M - 10, 5) and not seq_lt(5, M - 10)
    assert seq_diff(0, 2**31) == -(2**31)


def full(conn_id: int, isn_s: int, isn_r: int) -> FullRecord:
    return FullRecord(
        conn_id=conn_id, family=4, local_addr="10.77.0.10", local_port=8080,
        peer_addr="10.77.1.2", peer_port=40000 + conn_id, snd_seq=isn_s, rcv_seq=isn_r, mss=1448,
        snd_wscale=7, rcv_wscale=7, wscale=True, sack=True, timestamps=True, ts_val=12345,
        snd_wl1=isn_r, snd_wnd=65535, max_window=65535, rcv_wnd=65535, rcv_wup=isn_r,
    )


class ModelConn:
    def __init__(self, rng: random.Random, conn_id: int, near_wrap: bool) -> None:
        base = M - rng.randrange(1, 3000) if near_wrap else rng.randrange(M)
        self.full = full(conn_id, base, seq_add(base, rng.randrange(0, 5000) - 2500))
        self.isn = {Direction.RCV: self.full.rcv_seq, Direction.SND: self.full.snd_seq}
        self.stream = {d: rng.randbytes(rng.randrange(0, 6000)) for d in Direction}
        self.covered = {d: bytearray(len(self.stream[d])) for d in Direction}
        self.start = dict.fromkeys(Direction, 0)  # committed read offset / snd_una offset
        self.upd = (self.full.rcv_seq, self.full.snd_seq, self.full.snd_seq, 65535, 65535)
        self.commit: Commit | None = None

    def end(self, d: Direction) -> int:
        i = self.start[d]
        while i < len(self.stream[d]) and self.covered[d][i]:
            i += 1
        return i

    def expected(self) -> ConnState:
        r, s = Direction.RCV, Direction.SND
        return ConnState(
            self.full, seq_add(self.isn[r], self.start[r]),
            self.stream[r][self.start[r] : self.end(r)], seq_add(self.isn[s], self.start[s]),
            self.stream[s][self.start[s] : self.end(s)], *self.upd, self.commit,
        )


class Harness:
    def __init__(self, seed: int, *, loss: float = 0.2, max_batch: int = 16) -> None:
        self.rng = rng = random.Random(seed)
        self.now = 100.0
        self.tx = SyncSender(KEY, incarnation=7, max_batch=max_batch, max_delay=0.001,
                             now=self.now, rto=0.01, max_datagram=rng.choice([300, 1472]))
        self.rx_inc = 1
        self.rx = SyncReceiver(KEY, now=self.now, incarnation=self.rx_inc)
        self.ab = FakeLink(rng, loss, 0.1, 0.005)
        self.ba = FakeLink(rng, loss, 0.1, 0.005)
        self.model: dict[int, ModelConn] = {}
        self.next_id = 1
        # conn -> highest (rcv, snd) offsets the receiver held when it emitted any ACK
        self.acked_max: dict[int, tuple[int, int]] = {}

    def step(self, dt: float = 0.001) -> None:
        self.now += dt
        for d in self.tx.datagrams_to_send(self.now):
            self.ab.send(d, self.now)
        for d in self.ab.deliver(self.now):
            acks = self.rx.receive(d, self.now)
            if acks:
                self._note_acked()
            for a in acks:
                self.ba.send(a, self.now)
        for a in self.ba.deliver(self.now):
            self.tx.receive_ack(a, self.now)
        self.check_confirmed()

    def _off(self, m: ModelConn, d: Direction, seq: int) -> int:
        return seq_diff(seq, m.isn[d])

    def _note_acked(self) -> None:
        for cid, st in self.rx.connections().items():
            m = self.model.get(cid)
            if m is None:
                continue
            r = self._off(m, Direction.RCV, st.rcv_end)
            s = self._off(m, Direction.SND, st.snd_end)
            old = self.acked_max.get(cid, (-1, -1))
            self.acked_max[cid] = (max(old[0], r), max(old[1], s))

    def check_confirmed(self) -> None:
        for cid, m in self.model.items():
            c = self.tx.confirmed(cid)
            if c is None:
                continue
            top = self.acked_max[cid]
            assert self._off(m, Direction.RCV, c[0]) <= top[0]
            assert self._off(m, Direction.SND, c[1]) <= top[1]

    def quiesce(self) -> None:
        for _ in range(5000):
            self.step()
            if not self.tx.in_flight and not self.ab.queue and not self.ba.queue:
                return
        raise AssertionError("the link never went quiet")

    # -- operations --------------------------------------------------------------------------
    def op_open(self) -> None:
        cid, self.next_id = self.next_id, self.next_id + 1
        m = self.model[cid] = ModelConn(self.rng, cid, self.rng.random() < 0.7)
        self.tx.open(cid, m.full, self.now)

    def op_data(self, m: ModelConn) -> None:
        d = self.rng.choice(list(Direction))
        n = len(m.stream[d])
        if not n:
            return
        end = m.end(d)
        a = max(0, min(n - 1, end + self.rng.randrange(-300, 400)))  # overlap, in order, or gap
        b = min(n, a + self.rng.randrange(1, 2500))
        m.covered[d][a:b] = b"\1" * (b - a)
        self.tx.data(m.full.conn_id, d, seq_add(m.isn[d], a), m.stream[d][a:b], self.now)

    def op_commit(self, m: ModelConn) -> None:
        r = Direction.RCV
        pos = self.rng.randint(m.start[r], min(len(m.stream[r]), m.end(r) + 100))
        m.start[r] = pos
        m.commit = Commit(m.full.conn_id, seq_add(m.isn[r], pos),
                          seq_add(m.isn[Direction.SND], self.rng.randrange(5000)),
                          self.rng.randbytes(self.rng.randrange(256)))
        self.tx.commit(m.full.conn_id, m.commit.rpos, m.commit.wpos, m.commit.state, self.now)

    def op_update(self, m: ModelConn) -> None:
        s = Direction.SND
        una = self.rng.randint(m.start[s], min(len(m.stream[s]), m.end(s) + 100))
        m.start[s] = una
        m.upd = (seq_add(m.isn[Direction.RCV], m.end(Direction.RCV)), seq_add(m.isn[s], una),
                 seq_add(m.isn[s], m.end(s)), self.rng.randrange(M), self.rng.randrange(M))
        self.tx.update(m.full.conn_id, rcv_nxt=m.upd[0], snd_una=m.upd[1], snd_nxt=m.upd[2],
                       snd_wnd=m.upd[3], rcv_wnd=m.upd[4], now=self.now)

    def op_close(self, m: ModelConn) -> None:
        del self.model[m.full.conn_id]
        self.tx.close(m.full.conn_id, self.rng.choice(list(CloseReason)), self.now)

    def op_restart_backup(self) -> None:
        self.rx_inc += 1
        self.rx = SyncReceiver(KEY, now=self.now, incarnation=self.rx_inc)
        if self.rng.random() < 0.5:
            self.tx.resync(self.now)  # the agent saw the backup rejoin; else NEED_RESYNC does it

    def run(self, n_ops: int) -> None:
        for _ in range(n_ops):
            x = self.rng.random()
            conns = list(self.model.values())
            if x < 0.1 or not conns:
                self.op_open()
            elif x < 0.5:
                self.op_data(self.rng.choice(conns))
            elif x < 0.62:
                self.op_commit(self.rng.choice(conns))
            elif x < 0.74:
                self.op_update(self.rng.choice(conns))
            elif x < 0.78:
                self.op_close(self.rng.choice(conns))
            elif x < 0.8:
                self.tx.resync(self.now)
            elif x < 0.82:
                self.op_restart_backup()
            for _ in range(self.rng.randrange(3)):
                self.step()
        if self.model:  # any traffic lets a restarted backup ask for a resync
            self.op_update(next(iter(self.model.values())))
        self.quiesce()

    def check_converged(self) -> None:
        want = {cid: m.expected() for cid, m in self.model.items()}
        assert self.tx.connections() == want
        assert self.rx.connections() == want
        for cid, st in want.items():
            assert self.tx.confirmed(cid) == (st.rcv_end, st.snd_end)


@pytest.mark.parametrize("seed", range(60))
def test_randomized_runs_converge_to_the_model(seed: int) -> None:
    h = Harness(seed, loss=[0.0, 0.1, 0.3][seed % 3], max_batch=[1, 16, 64][seed // 3 % 3])
    h.run(120)
    h.check_converged()
    assert h.rx.counters["data_gap"] == 0 and h.rx.counters["unknown_conn"] == 0
    assert h.rx.counters["bad_auth"] == 0 and h.rx.counters["malformed"] == 0


def test_perfect_link_batches_and_confirms() -> None:
    h = Harness(1, loss=0.0, max_batch=4)
    h.ab.dup = h.ba.dup = 0.0
    for _ in range(3):
        h.op_open()
    assert h.tx.confirmed(1) is None  # nothing confirmed before the backup ACKs
    h.quiesce()
    h.check_converged()
    assert h.tx.counters["retransmits"] == 0 and h.rx.counters["duplicate"] == 0
    m = h.model[1]
    assert h.tx.confirmed(1) == (m.full.rcv_seq, m.full.snd_seq)


def test_wraparound_data_and_commit_across_2_32() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    isn = M - 3
    tx.open(5, full(5, isn, isn), 0.0)
    tx.data(5, Direction.RCV, isn, b"abcdefgh", 0.0)  # crosses 2**32 after 3 bytes
    tx.data(5, Direction.RCV, 0, b"defghXYZ", 0.0)  # overlaps "defgh" (seq 0 is "d")
    tx.commit(5, 2, 0, b"st", 0.0)  # the service read up to 'e' (seq 2 after the wrap)
    tx.data(5, Direction.SND, isn, b"0123456789", 0.0)
    tx.update(5, rcv_nxt=8, snd_una=seq_add(isn, 4), snd_nxt=7, snd_wnd=1, rcv_wnd=2, now=0.0)
    for d in tx.datagrams_to_send(1.0):
        for a in rx.receive(d, 1.0):
            tx.receive_ack(a, 1.0)
    st = rx.connections()[5]
    assert (st.rcv_start, st.rcv_data) == (2, b"fghXYZ")
    assert (st.snd_start, st.snd_data) == (M - 3 + 4 - M, b"456789")
    assert st.rcv_end == 8 and tx.confirmed(5) == (8, 7)
    assert st.commit == Commit(5, 2, 0, b"st")


def test_data_past_a_gap_waits_for_the_gap() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    tx.open(1, full(1, 100, 200), 0.0)
    tx.data(1, Direction.RCV, 205, b"fgh", 0.0)
    assert tx.connections()[1].rcv_data == b"" and tx.counters["data_held"] == 1
    tx.data(1, Direction.RCV, 200, b"abcde", 0.0)
    assert tx.connections()[1].rcv_data == b"abcdefgh"
    tx.data(1, Direction.SND, 110, b"zz", 0.0)  # a gap, then the peer ACKs past it
    tx.update(1, rcv_nxt=208, snd_una=110, snd_nxt=112, snd_wnd=1, rcv_wnd=1, now=0.0)
    assert tx.connections()[1].snd_data == b"zz"


def test_stream_end_is_the_mirror_end_without_gaps() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    with pytest.raises(LocalProtocolError):
        tx.stream_end(1, Direction.RCV)
    isn = M - 2
    tx.open(1, full(1, 100, isn), 0.0)
    assert tx.stream_end(1, Direction.RCV) == isn and tx.stream_end(1, Direction.SND) == 100
    tx.data(1, Direction.RCV, isn, b"abcd", 0.0)  # wraps past 2**32
    assert tx.stream_end(1, Direction.RCV) == 2
    tx.data(1, Direction.RCV, 5, b"zz", 0.0)  # past a gap: held, not counted
    assert tx.stream_end(1, Direction.RCV) == 2
    tx.data(1, Direction.RCV, 2, b"efg", 0.0)  # fills the gap: the held bytes join
    assert tx.stream_end(1, Direction.RCV) == 7
    tx.commit(1, 6, 100, b"", 0.0)  # trimming the front does not move the end
    assert tx.stream_end(1, Direction.RCV) == 7 == tx.connections()[1].rcv_end
    tx.data(1, Direction.SND, 100, b"0123", 0.0)
    tx.update(1, rcv_nxt=7, snd_una=106, snd_nxt=104, snd_wnd=1, rcv_wnd=1, now=0.0)
    assert tx.stream_end(1, Direction.SND) == 106  # acked past the end: the start moved there
    tx.close(1, CloseReason.CLOSED, 0.0)
    with pytest.raises(LocalProtocolError):
        tx.stream_end(1, Direction.SND)


def test_sender_refuses_misuse() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    with pytest.raises(LocalProtocolError):
        tx.data(9, Direction.RCV, 0, b"x", 0.0)
    tx.open(1, full(1, 100, 200), 0.0)
    with pytest.raises(LocalProtocolError):
        tx.open(1, full(1, 100, 200), 0.0)
    tx.commit(1, 250, 0, b"", 0.0)
    with pytest.raises(LocalProtocolError):
        tx.commit(1, 240, 0, b"", 0.0)
    with pytest.raises(LocalProtocolError):
        tx.commit(1, 260, 0, b"x" * 256, 0.0)


def test_timer_flushes_a_partial_batch_after_max_delay() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=64, max_delay=0.002, rto=0.05)
    tx.open(1, full(1, 1, 1), 10.0)
    assert tx.get_timer() == pytest.approx(10.002)
    assert tx.datagrams_to_send(10.001) == []
    (first,) = tx.datagrams_to_send(10.002)
    t = tx.get_timer()
    assert t == pytest.approx(10.052)  # retransmission
    assert tx.datagrams_to_send(t - 1e-6) == []
    assert tx.datagrams_to_send(t) == [first]
    assert tx.counters["retransmits"] == 1


def test_a_batch_not_yet_handed_out_is_not_retransmitted_twice() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=1, rto=0.02)
    tx.open(1, full(1, 1, 1), 0.0)  # sealed and queued at 0.0, handed out only at 1.0
    assert len(tx.datagrams_to_send(1.0)) == 1
    assert tx.get_timer() == pytest.approx(1.02) and tx.counters["retransmits"] == 0


def test_timeout_adapts_to_a_slow_backup_and_backs_off() -> None:
    """A backup that answers in 60 ms: after a few samples nothing is resent (a fixed 20 ms timer
    resent every batch, and a busy backup only got busier); with no answer at all the timer
    doubles up to max_rto."""
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=1, rto=0.02, max_rto=0.25)
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    now, late = 0.0, []
    for i in range(1, 41):
        tx.open(i, full(i, i, i), now)
        for d in tx.datagrams_to_send(now):
            late += [(now + 0.06, a) for a in rx.receive(d, now)]
        for _ in range(10):  # 10 ms per connection, ACKs come back 60 ms after the batch
            now += 0.001
            late += [(now + 0.06, a) for d in tx.datagrams_to_send(now) for a in rx.receive(d, now)]
            for _, a in [x for x in late if x[0] <= now]:
                tx.receive_ack(a, now)
            late = [x for x in late if x[0] > now]
        if i == 10:
            early = tx.counters["retransmits"]
    assert tx.srtt == pytest.approx(0.06, abs=0.005)
    assert tx.current_rto > 0.06
    assert early > 0 and tx.counters["retransmits"] == early  # none once the RTT is known
    lost = SyncSender(KEY, incarnation=1, now=0.0, max_batch=1, rto=0.02, max_rto=0.25)
    lost.open(1, full(1, 1, 1), 0.0)
    t, sends = 0.0, []
    while t < 1.5:
        if lost.datagrams_to_send(t):
            sends.append(round(t, 3))
        t += 0.001
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sends)]
    assert gaps[:5] == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.25], abs=0.002)
    assert gaps[4:] == pytest.approx([0.25] * len(gaps[4:]), abs=0.002)


def test_a_timeout_resends_only_the_oldest_few() -> None:
    """40 batches in flight, the backup silent: a timeout resends RESEND_BURST of them, the
    oldest (it used to resend the whole window at every timeout)."""
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=1, rto=0.02)
    for i in range(1, 41):
        tx.open(i, full(i, i, i), 0.0)
    first = tx.datagrams_to_send(0.0)
    assert len(first) == 40
    again = tx.datagrams_to_send(0.02)
    assert again == first[:RESEND_BURST]
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    for d in first[1:]:  # all but the oldest reached it: buffered, the ACK still says nothing
        rx.receive(d, 0.03)
    for d in again[:1]:  # the resent oldest fills the gap: everything applies
        (ack,) = rx.receive(d, 0.03)
    tx.receive_ack(ack, 0.03)
    assert tx.in_flight == 0 and rx.open_connections == 40
    assert [cid for cid, _ in rx.take_new_fulls()] == list(range(1, 41))
    assert rx.take_new_fulls() == []


def test_full_batch_goes_at_once_and_window_limits_flight() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=2, window=3)
    for i in range(1, 9):
        tx.open(i, full(i, i, i), 0.0)
    assert len(tx.datagrams_to_send(0.0)) == 3  # 4 batches sealed, 3 may fly
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    acks = [a for d in tx.datagrams_to_send(0.0) for a in rx.receive(d, 0.0)]
    assert acks == []


def test_forged_and_replayed_batches_change_nothing() -> None:
    h = Harness(3, loss=0.0)
    h.op_open()
    sent = h.tx.datagrams_to_send(h.now + 1)
    for d in sent:
        h.rx.receive(d, h.now)
    before = h.rx.connections()
    evil = SyncSender(b"another key, 32 bytes long......", incarnation=99, now=0.0)
    evil.open(1, full(1, 0, 0), 0.0)
    for d in [*evil.datagrams_to_send(1.0), *sent, b"", b"NSSY", bytes(100)]:
        h.rx.receive(d, h.now)
    assert h.rx.connections() == before
    assert h.rx.counters["bad_auth"] == 1 and h.rx.counters["duplicate"] == len(sent)
    assert h.rx.counters["malformed"] == 3


def test_restarted_backup_asks_for_a_resync() -> None:
    h = Harness(4, loss=0.0)
    h.ab.dup = h.ba.dup = 0.0
    h.op_open()
    h.op_data(h.model[1])
    h.quiesce()
    h.rx = SyncReceiver(KEY, now=h.now, incarnation=2)  # state lost; the agent did not tell
    h.op_commit(h.model[1])
    h.quiesce()
    assert h.tx.counters["resyncs"] == 1
    h.check_converged()


def test_a_new_master_incarnation_resets_the_backup() -> None:
    h = Harness(5, loss=0.0)
    h.op_open()
    h.quiesce()
    h.tx = SyncSender(KEY, incarnation=8, now=h.now)  # the master restarted with no connections
    h.model.clear()
    h.tx.resync(h.now)
    h.quiesce()
    assert h.rx.connections() == {}
    old = SyncSender(KEY, incarnation=7, now=h.now)
    old.open(3, full(3, 0, 0), h.now)
    for d in old.datagrams_to_send(h.now + 1):
        assert h.rx.receive(d, h.now) == []
    assert h.rx.counters["stale"] == 1 and h.rx.connections() == {}


def test_acks_from_elsewhere_are_counted_not_trusted() -> None:
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    tx.open(1, full(1, 0, 0), 0.0)
    tx.datagrams_to_send(1.0)
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    other = SyncSender(KEY, incarnation=2, now=0.0)
    other.open(1, full(1, 0, 0), 0.0)
    (ack,) = rx.receive(other.datagrams_to_send(1.0)[0], 1.0)  # an ACK for another master
    tx.receive_ack(ack, 1.0)
    tx.receive_ack(b"garbage", 1.0)
    assert tx.counters["stale"] == 1 and tx.counters["malformed"] == 1
    assert tx.confirmed(1) is None


def test_close_is_applied_and_confirmed_dropped() -> None:
    h = Harness(6, loss=0.0)
    h.op_open()
    h.op_open()
    h.quiesce()
    h.op_close(h.model[1])
    h.quiesce()
    h.check_converged()
    assert 1 not in h.rx.connections() and h.tx.confirmed(1) is None


def test_parked_mirror_seeds_a_backup_until_a_master_syncs() -> None:
    """A master that steps down parks its own mirror in its new backup side: the same states as
    a backup would hold; a new master's RESET replaces them; discard_seed drops them."""
    h = Harness(11, loss=0.0)
    for _ in range(3):
        h.op_open()
    h.quiesce()
    mirror = h.tx.connections()
    parked = SyncReceiver(KEY, now=h.now, incarnation=99)
    assert not parked.seeded
    parked.seed(mirror)
    assert parked.seeded and parked.connections() == mirror
    assert parked.connections() == h.rx.connections()  # exactly what the backup holds
    assert parked.discard_seed() == 3 and parked.connections() == {} and not parked.seeded
    parked.seed(mirror)
    new_master = SyncSender(KEY, incarnation=12, now=h.now)  # another node took over: RESET
    new_master.resync(h.now)
    for d in new_master.datagrams_to_send(h.now):
        parked.receive(d, h.now)
    assert not parked.seeded and parked.connections() == {}
    assert parked.discard_seed() == 0


def test_a_new_backup_started_before_the_old_one_is_heard() -> None:
    """The groups agent moved a master's sync from n3 to n2, and n2's agent had started first:
    its receiver's incarnation is lower, so every ACK it sent read as older than n3's last one
    (17,393 counted as reordered) and the master never protected its connections."""

    def exchange(tx: SyncSender, rx: SyncReceiver, now: float) -> None:
        for d in tx.datagrams_to_send(now):
            for a in rx.receive(d, now):
                tx.receive_ack(a, now)

    tx = SyncSender(KEY, incarnation=1, now=0.0)
    tx.open(1, full(1, 100, 200), 0.0)
    tx.data(1, Direction.RCV, 200, b"abc", 0.0)
    n3 = SyncReceiver(KEY, now=0.0, incarnation=300)
    tx.resync(0.0, new_backup=True)
    for i in range(5):
        exchange(tx, n3, 0.01 * (i + 1))
    assert tx.resynced and tx.confirmed(1) == (203, 100)
    n2 = SyncReceiver(KEY, now=0.0, incarnation=200)
    tx.resync(0.1, new_backup=True)
    assert not tx.resynced
    tx.data(1, Direction.RCV, 203, b"de", 0.1)
    for i in range(5):
        exchange(tx, n2, 0.1 + 0.01 * (i + 1))
    assert tx.counters["ack_reordered"] == 0
    assert tx.resynced and tx.confirmed(1) == (205, 100)
    assert n2.connections()[1].rcv_data == b"abcde"


def test_acks_are_taken_only_from_the_backup_synced_to() -> None:
    from nonstop.session.manager import _same_endpoint

    assert _same_endpoint(("10.77.1.12", 7781), ("10.77.1.12", 7781))
    assert not _same_endpoint(("10.77.1.13", 7781), ("10.77.1.12", 7781))
    assert not _same_endpoint(("10.77.1.12", 7782), ("10.77.1.12", 7781))
    assert not _same_endpoint(("10.77.1.12", 7781), None)
    assert _same_endpoint(("fd77:1::12", 7781, 0, 0), ("fd77:1:0::0:12", 7781))


def test_a_paused_sender_keeps_the_mirror_and_seals_nothing() -> None:
    """No backup (a new master adopting its connections): records update the mirror only, and
    the next resync gives a backup the whole of it."""
    tx = SyncSender(KEY, incarnation=1, now=0.0, max_batch=2)
    tx.pause()
    isn = 1000
    tx.open(3, full(3, isn, isn), 0.0)
    tx.data(3, Direction.RCV, isn, b"hello world", 0.0)
    tx.data(3, Direction.SND, isn, b"reply", 0.0)
    tx.commit(3, seq_add(isn, 6), seq_add(isn, 2), b"s", 0.0)
    tx.update(3, rcv_nxt=seq_add(isn, 11), snd_una=seq_add(isn, 2), snd_nxt=seq_add(isn, 5),
              snd_wnd=9, rcv_wnd=9, now=0.0)
    assert tx.datagrams_to_send(1.0) == [] and tx.in_flight == 0
    assert tx.counters["batches"] == 0 and tx.counters["records"] == 0
    mirror = tx.connections()[3]
    assert (mirror.rcv_start, mirror.rcv_data) == (seq_add(isn, 6), b"world")
    assert (mirror.snd_start, mirror.snd_data) == (seq_add(isn, 2), b"ply")
    with pytest.raises(LocalProtocolError):  # still checked: a bad record is refused
        tx.commit(3, isn, isn, b"", 0.0)
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    tx.resync(2.0, new_backup=True)
    for _ in range(3):
        for d in tx.datagrams_to_send(2.0):
            for a in rx.receive(d, 2.0):
                tx.receive_ack(a, 2.0)
    assert tx.counters["batches"] > 0 and tx.resynced
    assert rx.connections()[3] == mirror
    assert tx.confirmed(3) == (mirror.rcv_end, mirror.snd_end)


def by_records(state: ConnState, *, paused: bool = False) -> SyncSender:
    """A sender that tracked ``state`` through the records themselves: open, update, commit,
    data both ways (and the peer's FIN, if any)."""
    cid = state.full.conn_id
    s = SyncSender(KEY, incarnation=1, now=0.0)
    if paused:
        s.pause()
    s.open(cid, state.full, 0.0)
    s.update(cid, rcv_nxt=state.rcv_nxt, snd_una=state.snd_una, snd_nxt=state.snd_nxt,
             snd_wnd=state.snd_wnd, rcv_wnd=state.rcv_wnd, now=0.0)
    assert state.commit is not None
    s.commit(cid, state.commit.rpos, state.commit.wpos, state.commit.state, 0.0)
    s.data(cid, Direction.RCV, state.rcv_start, state.rcv_data, 0.0)
    s.data(cid, Direction.SND, state.snd_start, state.snd_data, 0.0)
    if state.rcv_fin is not None:
        assert s.fin(cid, Direction.RCV, state.rcv_fin, 0.0)
    return s


@pytest.mark.parametrize("paused", [True, False])
def test_adopt_holds_what_the_records_would(paused: bool) -> None:
    """A promotion's restored connection, tracked from its whole state at once: the mirror is the
    one the records (open, update, commit, data both ways, the peer's FIN) leave, and a backup
    synced afterwards holds it whole."""
    isn = M - 4  # the streams cross 2**32
    state = ConnState(
        full(5, isn, isn), seq_add(isn, 6), b"world", seq_add(isn, 2), b"ply",
        seq_add(isn, 11), seq_add(isn, 2), seq_add(isn, 5), 9, 9,
        Commit(5, seq_add(isn, 6), seq_add(isn, 2), b"s"), seq_add(isn, 11))
    assert by_records(state, paused=True).connections()[5] == state

    tx = SyncSender(KEY, incarnation=1, now=0.0)
    rx = SyncReceiver(KEY, now=0.0, incarnation=1)
    if paused:
        tx.pause()
    tx.adopt(state, 0.0)
    assert tx.connections()[5] == state
    with pytest.raises(LocalProtocolError):
        tx.adopt(state, 0.0)  # already open
    if paused:
        assert tx.datagrams_to_send(1.0) == [] and tx.counters["records"] == 0
        tx.resync(1.0, new_backup=True)
    for _ in range(3):
        for d in tx.datagrams_to_send(2.0):
            for a in rx.receive(d, 2.0):
                tx.receive_ack(a, 2.0)
    assert rx.connections()[5] == state
    assert tx.confirmed(5) == (seq_add(state.rcv_end, 1), state.snd_end)  # the FIN counts


def test_adopt_of_input_past_the_commit_goes_through_the_records() -> None:
    """A restored connection whose unread input does not start at its commit (not seen: the
    commit is kept at or past where the kernel's queue starts) is adopted through the records
    themselves: the mirror is the one they leave, and a second adopt is refused the same way."""
    isn = M - 4
    state = ConnState(
        full(7, isn, isn), seq_add(isn, 8), b"rld", seq_add(isn, 2), b"ply",
        seq_add(isn, 11), seq_add(isn, 2), seq_add(isn, 5), 9, 9,
        Commit(7, seq_add(isn, 6), seq_add(isn, 2), b"s"), None)
    records = by_records(state)
    tx = SyncSender(KEY, incarnation=1, now=0.0)
    tx.adopt(state, 0.0)
    assert tx.connections()[7] == records.connections()[7]
    assert tx.counters["records"] == records.counters["records"]
    with pytest.raises(LocalProtocolError):
        tx.adopt(state, 0.0)
