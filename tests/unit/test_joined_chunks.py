"""nonstop.common.joined_chunks: parts kept in order, no chunk over the bound unless one part is."""

from __future__ import annotations

from nonstop.common import joined_chunks


def test_parts_fill_chunks_in_order() -> None:
    parts = [b"aa", b"bbb", b"c", b"dddd", b"e"]
    assert joined_chunks(parts, 5) == [b"aabbb", b"cdddd", b"e"]
    assert b"".join(joined_chunks(parts, 5)) == b"".join(parts)


def test_a_part_bigger_than_the_bound_goes_alone() -> None:
    assert joined_chunks([b"x", b"yyyyyyy", b"z"], 3) == [b"x", b"yyyyyyy", b"z"]
    assert joined_chunks([], 3) == []
