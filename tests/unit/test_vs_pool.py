"""nonstop.vs.pool and nonstop.vs.control: states from heartbeats on two channels, checks,
ejection, draining, balancing policies; authenticated registration with a replay window."""

from __future__ import annotations

from collections import Counter

import pytest

from nonstop.common import RemoteProtocolError
from nonstop.vs.control import Announcer, ControlReceiver, RegType
from nonstop.vs.pool import (
    Policy,
    Pool,
    PoolConfig,
    WorkerJoined,
    WorkerRemoved,
    WorkerSpec,
    WorkerStateChanged,
)

KEY = b"k" * 32
ADDR = {"lan": "10.77.0.21", "hb": "10.77.1.21"}


def spec(wid: str = "w1", weight: int = 1, hb: bool = True, n: int = 21) -> WorkerSpec:
    return WorkerSpec(
        id=wid,
        addresses={"lan": f"10.77.0.{n}", "hb": f"10.77.1.{n}"},
        port=8080,
        weight=weight,
        heartbeat=hb,
    )


def events(pool: Pool) -> list:
    out = []
    while (e := pool.next_event()) is not None:
        out.append(e)
    return out


def test_channels_degraded_then_down_then_back() -> None:
    pool = Pool(PoolConfig(dead_interval=0.06))
    pool.add(spec(), 0.0)
    w = pool.workers["w1"]
    pool.heard("w1", "lan", 0.01)
    pool.heard("w1", "hb", 0.01)
    pool.handle_timer(0.05)
    assert w.state == "up"
    pool.heard("w1", "hb", 0.06)
    pool.handle_timer(0.071)  # lan silent for 61 ms
    assert w.state == "degraded"
    assert pool.address(w, 0.071) == "10.77.1.21"  # data path moves to hb
    pool.handle_timer(0.121)
    assert w.state == "down"
    assert pool.pick() is None
    pool.heard("w1", "lan", 0.2)
    assert w.state == "degraded" and pool.address(w, 0.2) == "10.77.0.21"
    evs = [e for e in events(pool) if isinstance(e, WorkerStateChanged)]
    assert [(e.old, e.new) for e in evs] == [
        ("up", "degraded"),
        ("degraded", "down"),
        ("down", "degraded"),
    ]
    assert "no heartbeat on lan, hb" in evs[1].reason
    rows = {(r.worker, r.channel): r.state for r in pool.table(0.2)}
    assert rows == {("w1", "lan"): "up", ("w1", "hb"): "down"}


def test_get_timer_is_the_next_heartbeat_deadline() -> None:
    pool = Pool(PoolConfig(dead_interval=0.06))
    pool.add(spec(), 0.0)
    pool.heard("w1", "lan", 0.03)
    assert pool.get_timer(0.04) == pytest.approx(0.06)


def test_active_checks_fall_and_rise() -> None:
    pool = Pool(PoolConfig(fall=2, rise=2))
    pool.add(spec(hb=False), 0.0)
    pool.check_result("w1", False, 1.0, "tcp refused")
    assert pool.workers["w1"].state == "up"
    pool.check_result("w1", False, 2.0, "tcp refused")
    assert pool.workers["w1"].state == "down"
    pool.check_result("w1", True, 3.0)
    assert pool.workers["w1"].state == "down"
    pool.check_result("w1", True, 4.0)
    assert pool.workers["w1"].state == "up"


def test_passive_ejection_and_cooldown() -> None:
    pool = Pool(PoolConfig(max_fails=2, cooldown=1.0))
    pool.add(spec(hb=False), 0.0)
    pool.report_failure("w1", 1.0, "reset")
    pool.report_success("w1")
    pool.report_failure("w1", 1.1, "reset")
    assert pool.workers["w1"].state == "up"  # not two in a row
    pool.report_failure("w1", 1.2, "reset")
    assert pool.workers["w1"].state == "ejected"
    assert pool.get_timer(1.3) == pytest.approx(2.2)
    pool.handle_timer(2.2)
    assert pool.workers["w1"].state == "up"


def test_draining_waits_for_in_flight_then_removes() -> None:
    pool = Pool(PoolConfig(drain_timeout=5.0))
    pool.add(spec(hb=False), 0.0)
    pool.add(spec("w2", hb=False, n=22), 0.0)
    w1 = pool.workers["w1"]
    pool.acquire(w1)
    pool.leave("w1", 1.0)
    assert w1.state == "draining" and "w1" in pool.workers
    assert all(pool.pick().id == "w2" for _ in range(5))
    pool.release(w1, 1.5)
    assert "w1" not in pool.workers
    assert any(isinstance(e, WorkerRemoved) and e.reason == "drained" for e in events(pool))
    pool.add(spec("w3", hb=False, n=23), 2.0)
    pool.acquire(pool.workers["w3"])
    pool.leave("w3", 2.0)
    pool.handle_timer(7.0)
    assert "w3" not in pool.workers


def test_sync_adds_changes_and_drains_only_config_workers() -> None:
    pool = Pool()
    pool.sync([spec("a", hb=False, n=1), spec("b", hb=False, n=2)], 0.0)
    pool.add(spec("r", n=3), 0.0, how="registration")
    pool.sync([spec("b", hb=False, n=2), spec("c", hb=False, n=4)], 1.0)
    assert set(pool.workers) == {"b", "c", "r"}  # a had nothing in flight: removed at once
    assert [e.worker for e in events(pool) if isinstance(e, WorkerJoined)] == ["a", "b", "r", "c"]


def test_round_robin_least_conn_weighted() -> None:
    pool = Pool()
    for i, wt in ((1, 1), (2, 2), (3, 3)):
        pool.add(spec(f"w{i}", weight=wt, hb=False, n=i), 0.0)
    rr = Counter(pool.pick().id for _ in range(30))
    assert rr == {"w1": 10, "w2": 10, "w3": 10}
    wr = [pool.pick(policy=Policy.WEIGHTED).id for _ in range(12)]
    assert Counter(wr) == {"w1": 2, "w2": 4, "w3": 6}
    assert wr[:6].count("w3") == 3  # smooth: spread, not bunched
    pool.acquire(pool.workers["w1"])
    pool.acquire(pool.workers["w2"])
    assert pool.pick(policy=Policy.LEAST_CONN).id == "w3"
    assert pool.pick(exclude=["w1", "w2", "w3"]) is None


def test_consistent_hash_is_stable_and_moves_only_the_lost_workers_keys() -> None:
    pool = Pool(PoolConfig(policy=Policy.CONSISTENT_HASH))
    for i in range(1, 5):
        pool.add(spec(f"w{i}", hb=False, n=i), 0.0)
    keys = [f"10.77.0.{i}".encode() for i in range(200)]
    before = {k: pool.pick(key=k).id for k in keys}
    assert before == {k: pool.pick(key=k).id for k in keys}
    assert len(set(before.values())) == 4
    pool.check_result("w2", False, 1.0)
    pool.check_result("w2", False, 2.0)
    after = {k: pool.pick(key=k).id for k in keys}
    for k in keys:
        if before[k] != "w2":
            assert after[k] == before[k]
        else:
            assert after[k] != "w2"


def _ann(**kw) -> Announcer:
    return Announcer(KEY, worker="w9", addresses=ADDR, port=8080, incarnation=5, **kw)


def test_registration_join_heartbeat_leave() -> None:
    pool = Pool(PoolConfig(dead_interval=0.06))
    rx = ControlReceiver(pool, KEY)
    ann = _ann(rpc_port=7901)
    assert rx.receive(ann.registration(RegType.JOIN, 1.0), "10.77.0.21", 1.0) == "join w9"
    w = pool.workers["w9"]
    assert w.spec.rpc_port == 7901 and w.how == "registration" and w.spec.heartbeat
    assert rx.receive(ann.registration(RegType.JOIN, 1.0), "10.77.1.21", 1.0) == "refresh w9"
    for ch, data in ann.heartbeats(1.01):
        rx.receive(data, ADDR[ch], 1.01)
    assert w.heard == {"lan": 1.01, "hb": 1.01}
    assert rx.receive(ann.registration(RegType.LEAVE, 1.1), "10.77.0.21", 1.1) == "leave w9"
    assert "w9" not in pool.workers  # nothing in flight: drained at once


def test_registration_forged_replayed_or_spoofed_is_refused() -> None:
    pool = Pool()
    rx = ControlReceiver(pool, KEY)
    ann = _ann()
    join = ann.registration(RegType.JOIN, 1.0)
    rx.receive(join, "10.77.0.21", 1.0)
    cases = [
        (join, "10.77.0.21", "replay"),
        (join[:-1] + bytes([join[-1] ^ 1]), "10.77.0.21", "bad_auth"),
        (
            Announcer(b"x" * 32, worker="w9", addresses=ADDR, port=1, incarnation=9).registration(
                RegType.LEAVE, 1.0
            ),
            "10.77.0.21",
            "bad_auth",
        ),
        (ann.registration(RegType.LEAVE, 1.0), "10.77.0.99", "wrong_channel"),
        (b"NSVR\x01garbage-that-is-long-enough", "10.77.0.21", "bad_auth"),
        (b"junk", "10.77.0.21", "malformed"),
    ]
    for data, src, counter in cases:
        with pytest.raises(RemoteProtocolError) as e:
            rx.receive(data, src, 2.0)
        assert e.value.counter == counter, (data, counter)
    assert "w9" in pool.workers and pool.workers["w9"].draining_since is None
    hbs = dict(ann.heartbeats(2.0))
    with pytest.raises(RemoteProtocolError) as e:  # lan heartbeat from the hb address
        rx.receive(hbs["lan"], ADDR["hb"], 2.0)
    assert e.value.counter == "wrong_channel"
    rx.receive(hbs["lan"], ADDR["lan"], 2.0)
    with pytest.raises(RemoteProtocolError):
        rx.receive(hbs["lan"], ADDR["lan"], 2.0)  # the same heartbeat again
    assert rx.counters["replay"] == 2


def test_registration_off_refuses_join() -> None:
    rx = ControlReceiver(Pool(), KEY, allow_join=False)
    with pytest.raises(RemoteProtocolError) as e:
        rx.receive(_ann().registration(RegType.JOIN, 0.0), "10.77.0.21", 0.0)
    assert e.value.counter == "refused"
