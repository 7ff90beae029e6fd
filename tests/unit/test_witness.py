"""WitnessCore and WitnessClient, driven with explicit ``now`` and bytes (no sockets)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.auth import seal
from nonstop.common import RemoteProtocolError
from nonstop.failover.witness import (
    MAGIC,
    LeaseAcquired,
    LeaseDenied,
    LeaseGranted,
    LeaseReleased,
    LeaseReply,
    LeaseRequest,
    WitnessClient,
    WitnessCore,
    decode,
    encode,
)

KEY = b"k" * 32
LEASE = 0.030  # 30 ms
ADDR_A, ADDR_B = ("10.77.0.11", 7780), ("10.77.0.12", 7780)


def denied(reply: object) -> str:
    """The holder named by a denial (its ``remaining`` is checked where it matters)."""
    assert isinstance(reply, LeaseDenied), reply
    return reply.holder


def core(now: float = 0.0) -> WitnessCore:
    return WitnessCore(KEY, LEASE, now, grace=0.0)


def client(node: str, incarnation: int = 1, margin: float | None = 0.002) -> WitnessClient:
    return WitnessClient(KEY, 1, node, incarnation, lease=LEASE, margin=margin)


def ask(w: WitnessCore, c: WitnessClient, addr: tuple, now: float, *, want: bool = True,
        rtt: float = 0.0) -> LeaseGranted | LeaseDenied | None:  # fmt: skip
    replies = w.receive(c.request(now, want=want), addr, now + rtt / 2)
    assert len(replies) == 1 and replies[0][0] == addr
    return c.receive(replies[0][1], now + rtt)


def test_grant_to_first_then_deny_other_until_expiry() -> None:
    w, a, b = core(), client("node-a"), client("node-b")
    assert ask(w, a, ADDR_A, 1.0) == LeaseGranted(pytest.approx(1.0 + LEASE - 0.002), (0, 1))
    assert denied(ask(w, b, ADDR_B, 1.01)) == "node-a"
    assert ask(w, a, ADDR_A, 1.02) == LeaseGranted(pytest.approx(1.02 + LEASE - 0.002), (0, 1))
    # a stops renewing: b gets it once a's lease ran out at the witness (1.02 + 30 ms)
    assert denied(ask(w, b, ADDR_B, 1.049)) == "node-a"
    assert ask(w, b, ADDR_B, 1.050) == LeaseGranted(pytest.approx(1.050 + LEASE - 0.002), (0, 2))
    assert denied(ask(w, a, ADDR_A, 1.06)) == "node-b"
    assert w.status(1.06)["groups"][1]["holder"] == "node-b"
    assert w.status(1.06)["groups"][1]["transfers"] == 1
    evs = []
    while (e := w.next_event()) is not None:
        evs.append(e)
    assert evs == [LeaseAcquired(1, "node-a", "", 1.0), LeaseAcquired(1, "node-b", "node-a", 1.05)]


def test_term_counts_holder_changes_not_lapses() -> None:
    """A node granted the lease again under the same (run, term) knows nobody held it meanwhile
    (its parked TCP sessions are still the truth); any other holder in between moves the term."""
    w, a, b = WitnessCore(KEY, LEASE, 0.0, grace=0.0, run=77), client("node-a"), client("node-b")
    g1 = ask(w, a, ADDR_A, 1.0)
    assert isinstance(g1, LeaseGranted) and g1.term == (77, 1)
    ask(w, a, ADDR_A, 1.5, want=False)  # released (or lapsed): nobody holds it
    g2 = ask(w, a, ADDR_A, 2.0)  # a again, after a gap: same term
    assert isinstance(g2, LeaseGranted) and g2.term == (77, 1)
    assert isinstance(ask(w, b, ADDR_B, 3.0), LeaseGranted)  # a lapsed, b took it
    g3 = ask(w, a, ADDR_A, 4.0)
    assert isinstance(g3, LeaseGranted) and g3.term == (77, 3)  # b in between: a cannot resume
    assert w.status(4.0)["groups"][1]["term"] == 3
    # a restarted witness is another run: terms from the previous run never match
    w2 = WitnessCore(KEY, LEASE, 5.0, grace=0.0, run=78)
    g4 = ask(w2, a, ADDR_A, 5.0)
    assert isinstance(g4, LeaseGranted) and g4.term == (78, 1)


def test_a_grant_given_back_unused_puts_the_term_back() -> None:
    """``served=False``: the holder never acted on its grant (it heard the old master again
    first), so the term and the last holder go back to what they were: the old master, asking
    again, is granted under its own term. Given back served, or after any other grant, the
    term stays moved."""
    w, a, b = WitnessCore(KEY, LEASE, 0.0, grace=0.0, run=5), client("node-a"), client("node-b")
    assert ask(w, a, ADDR_A, 1.0).term == (5, 1)  # type: ignore[union-attr]
    assert ask(w, b, ADDR_B, 1.05).term == (5, 2)  # type: ignore[union-attr]  # a lapsed
    replies = w.receive(b.request(1.051, want=False, served=False), ADDR_B, 1.051)
    assert len(replies) == 1
    assert w.status(1.051)["groups"][1]["term"] == 1 and w.counters["unused"] == 1
    g = ask(w, a, ADDR_A, 1.06)
    assert isinstance(g, LeaseGranted) and g.term == (5, 1)
    evs = []
    while (e := w.next_event()) is not None:
        evs.append(e)
    assert LeaseReleased(1, "node-b", 1.051, 1) in evs
    # served: the term stays moved
    ask(w, a, ADDR_A, 1.07, want=False)
    assert ask(w, b, ADDR_B, 1.08).term == (5, 2)  # type: ignore[union-attr]
    ask(w, b, ADDR_B, 1.09, want=False)  # served (the default)
    assert ask(w, a, ADDR_A, 1.10).term == (5, 3)  # type: ignore[union-attr]
    # unused, but a grant to the same holder again changed nothing: nothing to put back
    ask(w, a, ADDR_A, 1.11, want=False)
    assert ask(w, a, ADDR_A, 1.12).term == (5, 3)  # type: ignore[union-attr]
    w.receive(a.request(1.13, want=False, served=False), ADDR_A, 1.13)
    assert w.status(1.13)["groups"][1]["term"] == 3


def test_served_is_a_trailing_field_both_versions_read() -> None:
    """An older witness (no ``served``) reads a new release and ignores the field; an older
    agent's release (no field) reads as served."""
    import msgspec

    from nonstop.auth import unseal

    class OldRequest(msgspec.Struct, array_like=True, frozen=True, tag=1):
        group: int
        node_id: str
        incarnation: int
        seq: int
        want: bool
        lease_ms: int

    new = unseal(KEY, encode(KEY, LeaseRequest(1, "node-a", 7, 9, False, 30, served=False)))
    old_view = msgspec.msgpack.Decoder(OldRequest | LeaseReply).decode(new[4:])
    assert old_view == OldRequest(1, "node-a", 7, 9, False, 30)
    old = seal(KEY, MAGIC + msgspec.msgpack.encode(OldRequest(1, "node-a", 7, 9, False, 30)))
    msg = decode(KEY, old)
    assert isinstance(msg, LeaseRequest) and msg.served is True


def test_clients_view_ends_before_the_witness() -> None:
    """Granted counting from the send time: with a 4 ms round trip the client's lease ends
    at least 2 ms (half the rtt) before the witness's."""
    w, a = core(), client("node-a", margin=0.0)
    g = ask(w, a, ADDR_A, 5.0, rtt=0.004)
    assert isinstance(g, LeaseGranted)
    witness_until = 5.002 + LEASE
    assert g.until <= witness_until - 0.002 + 1e-9


def test_release_frees_at_once_and_only_by_holder() -> None:
    w, a, b = core(), client("node-a"), client("node-b")
    assert isinstance(ask(w, a, ADDR_A, 1.0), LeaseGranted)
    assert ask(w, b, ADDR_B, 1.001, want=False) is None  # a release by a non-holder: no effect
    assert denied(ask(w, b, ADDR_B, 1.002)) == "node-a"
    assert ask(w, a, ADDR_A, 1.003, want=False) is None  # a release reply is not a grant
    assert isinstance(ask(w, b, ADDR_B, 1.004), LeaseGranted)
    assert w.counters["released"] == 1
    kinds = []
    while (e := w.next_event()) is not None:
        kinds.append(type(e))
    assert kinds == [LeaseAcquired, LeaseReleased, LeaseAcquired]


def test_grace_period_after_start_grants_nothing() -> None:
    w = WitnessCore(KEY, LEASE, now=10.0)  # grace defaults to the maximum lease
    a = client("node-a")
    assert denied(ask(w, a, ADDR_A, 10.01)) == ""
    assert isinstance(ask(w, a, ADDR_A, 10.031), LeaseGranted)


def test_lease_capped_at_the_witness_maximum() -> None:
    w = core()
    greedy = WitnessClient(KEY, 1, "node-a", 1, lease=10.0, margin=0.0)
    g = ask(w, greedy, ADDR_A, 0.0)
    assert g == LeaseGranted(until=pytest.approx(LEASE), term=(0, 1))


def test_replayed_request_dropped_and_counted() -> None:
    w, a = core(), client("node-a")
    req = a.request(1.0)
    assert len(w.receive(req, ADDR_A, 1.0)) == 1
    assert w.receive(req, ADDR_A, 1.1) == []  # replay after the lease expired: no new grant
    assert w.counters["replay"] == 1
    assert w.status(1.1)["groups"][1]["holder"] == ""


def test_old_incarnation_dropped_new_one_accepted() -> None:
    w = core()
    assert isinstance(ask(w, client("node-a", incarnation=2), ADDR_A, 1.0), LeaseGranted)
    assert w.receive(client("node-a", incarnation=1).request(1.01), ADDR_A, 1.01) == []
    assert isinstance(ask(w, client("node-a", incarnation=3), ADDR_A, 1.02), LeaseGranted)


def test_forged_and_malformed_dropped_and_counted() -> None:
    w, a = core(), client("node-a")
    req = bytearray(a.request(1.0))
    req[6] ^= 1
    assert w.receive(bytes(req), ADDR_A, 1.0) == []
    assert w.receive(WitnessClient(b"x" * 32, 1, "node-a", 1).request(1.0), ADDR_A, 1.0) == []
    assert w.receive(seal(KEY, b"NSHB" + b"\x00" * 10), ADDR_A, 1.0) == []
    assert w.receive(seal(KEY, MAGIC + b"\x93\x01\x02"), ADDR_A, 1.0) == []
    assert w.receive(b"short", ADDR_A, 1.0) == []
    # a reply sent to the witness is not a request
    reply = encode(KEY, LeaseReply(1, "node-a", 1, 1, "node-a", True, 30))
    assert w.receive(reply, ADDR_A, 1.0) == []
    c = w.counters
    assert (c["bad_auth"], c["malformed"], c["unexpected"]) == (2, 3, 1)
    assert c["granted"] == 0 and w.leases == {}


def test_client_ignores_stale_replayed_and_foreign_replies() -> None:
    w, a, b = core(), client("node-a"), client("node-b")
    req = a.request(1.0)
    (_, reply), = w.receive(req, ADDR_A, 1.0)  # fmt: skip
    assert isinstance(a.receive(reply, 1.0), LeaseGranted)
    assert a.receive(reply, 1.5) is None  # the same reply again: already answered
    assert b.receive(reply, 1.0) is None  # addressed to node-a
    a2 = client("node-a", incarnation=2)
    a2.request(1.0)  # seq 1 outstanding in the new incarnation too
    assert a2.receive(reply, 1.0) is None  # echoes incarnation 1
    assert a.counters["stale"] == 1 and a2.counters["stale"] == 1
    with pytest.raises(RemoteProtocolError):
        a.receive(b"\x00" * 40, 1.0)


def test_client_rejects_a_grant_naming_someone_else() -> None:
    a = client("node-a")
    a.request(1.0)
    bad = encode(KEY, LeaseReply(1, "node-a", 1, 1, "node-b", True, 30))
    with pytest.raises(RemoteProtocolError):
        a.receive(bad, 1.0)


def test_two_clients_racing_get_exactly_one_grant() -> None:
    w, a, b = core(), client("node-a"), client("node-b")
    ra, rb = a.request(2.0), b.request(2.0)
    (_, reply_b), = w.receive(rb, ADDR_B, 2.0005)  # fmt: skip
    (_, reply_a), = w.receive(ra, ADDR_A, 2.0006)  # fmt: skip
    got = [a.receive(reply_a, 2.001), b.receive(reply_b, 2.001)]
    assert denied(got[0]) == "node-b"
    assert isinstance(got[1], LeaseGranted)


def test_wire_round_trip() -> None:
    for msg in (
        LeaseRequest(1, "node-a", 7, 9, True, 30),
        LeaseRequest(1, "node-a", 7, 9, False, 30, served=False),
        LeaseReply(65535, "node-b", 2**40, 2**63 - 1, "", False, 0),
    ):
        assert decode(KEY, encode(KEY, msg)) == msg


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_witness(data: bytes) -> None:
    w = core()
    assert w.receive(data, ADDR_A, 1.0) == []
    if data[:4] != MAGIC:
        assert w.receive(seal(KEY, data), ADDR_A, 1.0) == []
    with pytest.raises(RemoteProtocolError):
        decode(KEY, data)  # unauthenticated: always refused


@settings(max_examples=500)
@given(st.binary(max_size=120))
def test_authenticated_garbage_parses_or_raises_remote_error(body: bytes) -> None:
    data = seal(KEY, MAGIC + body)
    try:
        msg = decode(KEY, data)
    except RemoteProtocolError:
        return
    assert isinstance(msg, LeaseRequest | LeaseReply)
    w = core()
    w.receive(data, ADDR_A, 1.0)  # must not raise
    a = client("node-a")
    a.request(1.0)
    with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
        a.receive(data, 1.0)
