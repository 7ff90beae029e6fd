"""The session FSM under arbitrary input: every (state, message) pair, random byte streams fed
whole or a byte at a time, timers at arbitrary times. Peer input never raises; the state is
always one of the six; a bad message ends the session with a NOTIFICATION."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nonstop.bgp.fsm import Session, SessionConfig, SessionEstablished, State
from nonstop.bgp.wire import (
    KEEPALIVE_BYTES,
    Capabilities,
    Framer,
    MsgType,
    Notification,
    Open,
    RouteRefresh,
    encode_notification,
    encode_open,
    encode_route_refresh,
    frame,
)

CFG = SessionConfig(local_as=65001, router_id="10.77.0.11", peer_as=65002, hold_time=9)
PEER_OPEN = encode_open(Open(65002, 9, "10.77.0.12",
                             Capabilities(frozenset({(1, 1), (2, 1)}), 65002, True)))
MESSAGES = {
    "open": PEER_OPEN,
    "keepalive": KEEPALIVE_BYTES,
    "update": frame(MsgType.UPDATE, b"\0\0\0\0"),
    "notification": encode_notification(Notification(6, 2)),
    "route_refresh": encode_route_refresh(RouteRefresh(1, 1)),
}


def session_in(state: State) -> Session:
    s = Session(CFG)
    s.start(0.0)
    if state == State.CONNECT:
        return s
    s.connection_made(0.0)
    if state == State.OPEN_SENT:
        return s
    s.receive_data(PEER_OPEN, 0.0)
    if state == State.OPEN_CONFIRM:
        return s
    ev = s.receive_data(KEEPALIVE_BYTES, 0.0)
    assert any(isinstance(e, SessionEstablished) for e in ev)
    return s


# (state, message) -> state after; anything else is an FSM error (NOTIFICATION 5/x, Idle)
TABLE = {
    (State.OPEN_SENT, "open"): State.OPEN_CONFIRM,
    (State.OPEN_CONFIRM, "keepalive"): State.ESTABLISHED,
    (State.ESTABLISHED, "keepalive"): State.ESTABLISHED,
    (State.ESTABLISHED, "update"): State.ESTABLISHED,
    (State.ESTABLISHED, "route_refresh"): State.ESTABLISHED,
}


@pytest.mark.parametrize("state", [State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED])
@pytest.mark.parametrize("msg", sorted(MESSAGES))
def test_state_message_table(state: State, msg: str) -> None:
    s = session_in(state)
    s.data_to_send()
    s.receive_data(MESSAGES[msg], 1.0)
    want = TABLE.get((state, msg), State.IDLE)
    assert s.state == want
    out = s.data_to_send()
    f = Framer()
    f.feed(out)
    kinds = [k for k, _, _ in f.messages()]
    if want == State.IDLE and msg != "notification":
        assert kinds == [MsgType.NOTIFICATION]
        assert out[19] == 5  # FSM error
    if msg == "notification":
        assert kinds == []  # never answer a NOTIFICATION with one


def test_hold_timer_and_keepalives() -> None:
    s = session_in(State.ESTABLISHED)
    s.data_to_send()
    assert s.next_deadline() == 3.0  # keepalive every hold/3
    s.timer(3.0)
    assert s.data_to_send() == KEEPALIVE_BYTES
    s.timer(9.5)  # nothing heard for 9 s
    assert s.state == State.IDLE
    assert s.data_to_send()[19:21] == b"\x04\x00"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([State.OPEN_SENT, State.OPEN_CONFIRM, State.ESTABLISHED]),
       st.binary(max_size=300), st.booleans())
def test_random_bytes_never_raise(state: State, data: bytes, bytewise: bool) -> None:
    s = session_in(state)
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for c in chunks:
        s.receive_data(c, 1.0)
    assert s.state in State


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(sorted(MESSAGES)),
                          st.floats(0, 30).map(lambda t: ("timer", t)),
                          st.just("lost"), st.just("connect")), max_size=25))
def test_random_input_sequences(ops: list) -> None:
    s = Session(CFG)
    s.start(0.0)
    now = 0.0
    for op in ops:
        if isinstance(op, tuple):
            now += op[1]
            s.timer(now)
        elif op == "lost":
            s.connection_lost(now)
        elif op == "connect":
            if s.state in (State.CONNECT, State.ACTIVE):
                s.connection_made(now)
        else:
            s.receive_data(MESSAGES[op], now)
        assert s.state in State
        d = s.next_deadline()
        assert d is None or d >= now - 30
