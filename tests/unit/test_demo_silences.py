"""The demo places each long silence of its streams after the timeline mark before it."""

from nonstop.demo import place_silences


def test_each_silence_is_placed_after_the_mark_before_it_longest_first() -> None:
    marks = [(10.0, "1. fault"), (10.05, "node-b master"), (20.0, "2. node-a back")]
    gaps = {"0": [[10.1, 10.25], [20.5, 20.62]], "3": [[5.0, 5.2]]}
    got = place_silences(gaps, marks)
    assert got == [
        {"conn": 3, "ms": 200.0, "mark": "start", "began_after_s": 0.0},
        {"conn": 0, "ms": 150.0, "mark": "node-b master", "began_after_s": 0.05},
        {"conn": 0, "ms": 120.0, "mark": "2. node-a back", "began_after_s": 0.5},
    ]


def test_no_silence_no_entry() -> None:
    assert place_silences({}, [(1.0, "x")]) == []
