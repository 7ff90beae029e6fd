"""nonstop.vs.rpc: frames (golden, round trip, random bytes), vote, DRB, adaptive choice."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.common import RemoteProtocolError
from nonstop.vs.rpc.core import (
    DrbPair,
    FaultRate,
    NoMajority,
    choose_mode,
    drb_pick,
    vote,
)
from nonstop.vs.rpc.frame import Call, FrameDecoder, Reply, canonical, encode


def ok(v: object) -> tuple:
    return ("ok", canonical(v), v)


def test_golden_call_frame() -> None:
    wire = encode(Call(7, "add", [1, 2]))
    # length 29 | array(8): tag "call", id 7, "add", [1, 2], "auto", reliability 1, deadline 0,
    # variant "primary"
    golden = "0000001d" "98" "a463616c6c" "07" "a3616464" "920102" "a46175746f" "01" "00"
    golden += "a77072696d617279"
    assert wire.hex() == golden
    d = FrameDecoder()
    d.feed(wire)
    assert d.next_frame() == Call(7, "add", [1, 2])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 2**63 - 1),
    st.text(min_size=1, max_size=20),
    st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=10), st.none())),
    st.sampled_from(["auto", "primary_backup", "nvp", "drb"]),
    st.integers(1, 3),
)
def test_call_round_trip_in_pieces(i: int, m: str, args: list, mode: str, rel: int) -> None:
    call = Call(i, m, args, mode, rel)
    wire = encode(call) + encode(Reply(i, True, args, mode=mode))
    d = FrameDecoder()
    got = []
    for k in range(0, len(wire), 3):
        d.feed(wire[k : k + 3])
        while (f := d.next_frame()) is not None:
            got.append(f)
    assert got == [call, Reply(i, True, args, mode=mode)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_decode_or_raise_the_remote_error(data: bytes) -> None:
    d = FrameDecoder(max_frame=1 << 16)
    d.feed(data)
    try:
        while d.next_frame() is not None:
            pass
    except RemoteProtocolError as e:
        assert e.counter == "bad_frame"


def test_bad_mode_is_refused() -> None:
    d = FrameDecoder()
    d.feed(encode(Call(1, "x", mode="magic")))
    with pytest.raises(RemoteProtocolError):
        d.next_frame()


def test_vote_majority_outvotes_and_errors() -> None:
    v = vote({"a": ok(5), "b": ok(6), "c": ok(5)}, 3)
    assert v.value == 5 and v.agree == ("a", "c") and v.disagree == ("b",)
    v = vote({"a": ok(5), "b": ("error", "reset"), "c": ok(5)}, 3)
    assert v.value == 5
    with pytest.raises(NoMajority, match=r"at most 1 of 3 versions agree, 2 needed"):
        vote({"a": ok(5), "b": ok(6), "c": ("error", "reset")}, 3)
    with pytest.raises(NoMajority):
        vote({"a": ok(1), "b": ok(2)}, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 2), st.none()), min_size=1, max_size=7))
def test_vote_property(answers: list) -> None:
    """The winner, when there is one, was returned by a strict majority of the n asked, and
    nothing else could have been."""
    results = {f"w{i}": ("error", "x") if a is None else ok(a) for i, a in enumerate(answers)}
    n = len(answers)
    counts = {a: answers.count(a) for a in set(answers) if a is not None}
    winners = [a for a, c in counts.items() if c > n // 2]
    if winners:
        assert vote(results, n).value == winners[0]
        assert len(vote(results, n).agree) == counts[winners[0]]
    else:
        with pytest.raises(NoMajority):
            vote(results, n)


def test_drb_pick_and_roles() -> None:
    assert drb_pick((True, True, 1, ""), (True, True, 2, "")).used == "primary"
    out = drb_pick((True, False, 9, ""), (True, True, 2, ""))
    assert (out.value, out.used, out.primary_failed) == (2, "alternate", True)
    assert drb_pick((False, False, None, "reset"), (True, True, 2, "")).primary_failed
    with pytest.raises(NoMajority, match="primary: reset; alternate: acceptance test failed"):
        drb_pick((False, False, None, "reset"), (True, False, 2, ""))
    pair = DrbPair()
    assert pair.assign(["a", "b", "c"]) == ("a", "b")
    assert pair.outcome(False) is None
    assert pair.outcome(True) == "roles swapped: b is primary, a alternate"
    assert pair.assign(["a", "b", "c"]) == ("b", "a")
    assert pair.assign(["a", "c"]) == ("a", "c")  # primary b gone: the alternate takes over
    with pytest.raises(ValueError):
        pair.assign(["a"])


def test_fault_rate_decays_with_time() -> None:
    f = FaultRate(half_life=1.0)
    for t in range(10):
        f.record(True, t * 0.01)
    high = f.value(0.1)
    assert high > 0.5
    assert f.value(1.1) == pytest.approx(high / 2, rel=0.01)
    assert FaultRate().value(5.0) == 0.0


@pytest.mark.parametrize(
    ("kw", "mode"),
    [
        ({"available": 3, "fault_rate": 0, "reliability": 3}, "nvp"),
        ({"available": 2, "fault_rate": 0, "reliability": 3}, "drb"),
        ({"available": 1, "fault_rate": 0, "reliability": 3}, "primary_backup"),
        ({"available": 5, "fault_rate": 0, "reliability": 1}, "primary_backup"),
        ({"available": 5, "fault_rate": 0.2, "reliability": 1}, "drb"),
        (
            {"available": 5, "fault_rate": 0, "reliability": 1, "deadline_ms": 10, "latency_ms": 8},
            "drb",
        ),
        ({"available": 5, "fault_rate": 0, "reliability": 1, "requested": "nvp"}, "nvp"),
    ],
)
def test_choose_mode(kw: dict, mode: str) -> None:
    d = choose_mode(**kw)
    assert d.mode == mode and d.reason


def test_choose_mode_refuses_what_cannot_run() -> None:
    with pytest.raises(NoMajority, match="no worker"):
        choose_mode(available=0, fault_rate=0, reliability=1)
    with pytest.raises(NoMajority, match="nvp needs 3 workers, 2 available"):
        choose_mode(available=2, fault_rate=0, reliability=1, requested="nvp")


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 10), st.floats(0, 1), st.integers(1, 3), st.integers(0, 100), st.floats(0, 50)
)
def test_choose_mode_never_picks_a_mode_it_cannot_staff(
    n: int, fr: float, rel: int, dl: int, lat: float
) -> None:
    d = choose_mode(available=n, fault_rate=fr, reliability=rel, deadline_ms=dl, latency_ms=lat)
    assert {"primary_backup": 1, "drb": 2, "nvp": 3}[d.mode] <= n
