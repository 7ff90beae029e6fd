from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nonstop.auth import TAG_LEN, ReplayWindow, seal, unseal
from nonstop.common import RemoteProtocolError

KEY = b"k" * 32


def test_seal_unseal_round_trip_and_tamper():
    data = seal(KEY, b"hello")
    assert len(data) == 5 + TAG_LEN
    assert unseal(KEY, data) == b"hello"
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 1
        with pytest.raises(RemoteProtocolError) as ei:
            unseal(KEY, bytes(bad))
        assert ei.value.counter == "bad_auth"
    with pytest.raises(RemoteProtocolError):
        unseal(b"x" * 32, data)


@given(st.binary(max_size=64))
def test_unseal_random_bytes_only_raises_remote_error(data):
    try:
        unseal(KEY, data)
    except RemoteProtocolError:
        pass
    else:  # a random 16-byte tag matching is a 2**-128 event
        pytest.fail("random bytes authenticated")


def test_replay_window():
    w = ReplayWindow(size=8)
    assert w.check_and_update(1, 10) == "new"
    assert w.check_and_update(1, 10) == "duplicate"
    assert w.check_and_update(1, 12) == "new"
    assert w.check_and_update(1, 11) == "new"  # late but inside the window
    assert w.check_and_update(1, 11) == "duplicate"
    assert w.check_and_update(1, 4) == "old"  # 12 - 4 >= 8
    assert w.check_and_update(0, 100) == "old"  # older incarnation
    assert w.check_and_update(2, 1) == "new"  # restart: window reset
    assert w.check_and_update(2, 1) == "duplicate"
    assert w.check_and_update(2, 1000) == "new"
    assert w.check_and_update(2, 999) == "new"


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=100))
def test_replay_window_accepts_each_seq_once(seqs):
    w = ReplayWindow(size=64)
    accepted = [s for s in seqs if w.check_and_update(7, s) == "new"]
    assert len(accepted) == len(set(accepted))
