"""BirdPeer.same_since: BIRD's ``since`` of one state change reads a millisecond apart once the
wall clock was slewed (two CI failures); a session that went down and up is later by seconds."""

from nonstop.bench.bgp import BirdPeer


def test_a_millisecond_apart_is_the_same_state_change() -> None:
    assert BirdPeer.same_since("16:41:56.054", "16:41:56.053")
    assert BirdPeer.same_since("16:43:02.257", "16:43:02.258")


def test_a_reconnect_is_not() -> None:
    assert not BirdPeer.same_since("16:41:56.054", "16:41:57.054")
    assert not BirdPeer.same_since("16:41:56.054", "17:41:56.054")
