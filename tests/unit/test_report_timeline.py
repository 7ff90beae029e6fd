"""nonstop.report.timeline: a real PNG of the expected size; bad input refused before any file."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import msgspec
import pytest

from nonstop.report.timeline import HEIGHT, WIDTH, Marker, Sample, Timeline, write_timeline


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, checking the signature and the chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert crc == zlib.crc32(kind + body)
    assert data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def failover_run(conns: int) -> tuple[list[Sample], list[Marker]]:
    """``conns`` connections at 1 MB/s each, a 0.3 s pause at t=2."""
    samples = []
    for c in range(conns):
        n = 0
        for k in range(51):
            t = k * 0.1
            if not 2.0 <= t < 2.3:
                n += 100_000
            samples.append(Sample(f"c{c}", t, n))
    return samples, [Marker(2.0, "master killed"), Marker(2.3, "backup took over")]


@pytest.mark.parametrize("conns", [3, 64])
def test_writes_a_png_of_the_expected_size(tmp_path: Path, conns: int) -> None:
    samples, markers = failover_run(conns)
    out = tmp_path / "timeline.png"
    write_timeline(out, samples, markers, f"{conns} connections through a failover")
    data = out.read_bytes()
    assert png_size(data) == (WIDTH, HEIGHT)
    assert len(data) > 10_000  # something was drawn
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]  # no temporary left


def test_the_data_shape_round_trips_as_json(tmp_path: Path) -> None:
    samples, markers = failover_run(2)
    tl = Timeline("run", samples, markers)
    back = msgspec.json.decode(msgspec.json.encode(tl), type=Timeline)
    assert back == tl
    write_timeline(tmp_path / "t.png", back.samples, back.markers, back.title)
    assert png_size((tmp_path / "t.png").read_bytes()) == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("samples", "markers", "title", "match"),
    [
        ([], [], "t", "no samples"),
        ([Sample("a", -1.0, 0)], [], "t", "t=-1.0"),
        ([Sample("a", math.nan, 0)], [], "t", "finite"),
        ([Sample("a", 0.0, -5)], [], "t", "bytes=-5"),
        ([Sample("a", 0.0, 1.5)], [], "t", "bytes=1.5"),  # type: ignore[arg-type]
        ([Sample("a", 0.0, 10), Sample("a", 1.0, 5)], [], "t", "went back"),
        ([("a", 0.0, 1)], [], "t", "not a Sample"),
        ([Sample("a", 0.0, 1)], [Marker(math.inf, "x")], "t", "markers\\[0\\]"),
        ([Sample("a", 0.0, 1)], [{"t": 1.0}], "t", "not a Marker"),
        ([Sample("a", 0.0, 1)], [], None, "title"),
    ],
)
def test_bad_input_is_refused_and_nothing_written(
    tmp_path: Path, samples: list, markers: list, title: object, match: str
) -> None:
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=match):
        write_timeline(out, samples, markers, title)  # type: ignore[arg-type]
    assert not out.exists()


def test_cumulative_order_is_by_time_not_by_list_order(tmp_path: Path) -> None:
    """Samples may come in any order: each connection's are sorted by t before checking."""
    samples = [Sample("a", 1.0, 10), Sample("a", 0.0, 0), Sample("b", 0.5, 3)]
    write_timeline(tmp_path / "o.png", samples, [], "unordered")
    assert png_size((tmp_path / "o.png").read_bytes()) == (WIDTH, HEIGHT)


def test_throughput_panel_sums_the_connections_without_aliasing() -> None:
    """5 connections at 1 MB/s: 40 Mbit/s in every bin outside the pause, ~0 inside it, even
    though the bins (0.05 s) are finer than the sampling (0.1 s)."""
    from nonstop.report.timeline import _throughput, _validate

    samples, markers = failover_run(5)
    per = _validate(samples, markers, "x")
    centres, mbit = _throughput(per, 0.0, 5.0)
    steady = [m for c, m in zip(centres, mbit, strict=True) if c < 1.9 or c > 2.4]
    paused = [m for c, m in zip(centres, mbit, strict=True) if 2.0 < c < 2.2]
    assert steady and all(m == pytest.approx(40.0) for m in steady)
    assert paused and all(m == pytest.approx(0.0) for m in paused)
