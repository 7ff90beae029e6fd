"""A timeline PNG: throughput and per-connection progress over time, failovers marked.

Seed 000's figures, for the demo and ``nonstop bench takeover``: the caller records, per
connection, ``(t, bytes)`` samples (seconds since the run started, bytes delivered so far on that
connection: cumulative, never decreasing) and a few markers (``t``, label: "master killed",
"VIP moved"...), and ``write_timeline`` draws two panels sharing the time axis:

- top: the aggregate throughput (Mbit/s) of all connections, in fixed time bins;
- bottom: each connection's progress (MB delivered), one thin line per connection;

with every marker as a dashed vertical line across both. The figure is ``WIDTH`` x ``HEIGHT``
pixels, drawn with matplotlib's Agg canvas directly (no pyplot: no global state, any thread).
The data shape is ``Sample`` / ``Marker`` (msgspec structs, so the caller's JSON can carry them:
``Timeline`` bundles both with the title); input is validated first and a bad one raises
``ValueError`` naming the problem, before any file is touched. The PNG is written to a temporary
file and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import msgspec

__all__ = ["HEIGHT", "WIDTH", "Marker", "Sample", "Timeline", "write_stream_timeline",
           "write_timeline"]

WIDTH, HEIGHT, DPI = 1200, 700, 100
BINS = 100  # throughput bins over the sampled span


class Sample(msgspec.Struct, frozen=True):
    """Connection ``conn`` had delivered ``bytes`` bytes (cumulative) at ``t`` seconds."""

    conn: str
    t: float
    bytes: int


class Marker(msgspec.Struct, frozen=True):
    """An event to mark at ``t`` seconds (a failover, the kill, the VIP move)."""

    t: float
    label: str


class Timeline(msgspec.Struct, frozen=True):
    """Everything one picture shows, as the caller may keep it in its JSON."""

    title: str
    samples: list[Sample]
    markers: list[Marker] = []


def _validate(
    samples: Sequence[Sample], markers: Sequence[Marker], title: str
) -> dict[str, list[Sample]]:
    if not isinstance(title, str):
        raise ValueError(f"title must be a str, not {type(title).__name__}")
    if not samples:
        raise ValueError("no samples: nothing to draw")
    per: dict[str, list[Sample]] = defaultdict(list)
    for i, s in enumerate(samples):
        if not isinstance(s, Sample):
            raise ValueError(f"samples[{i}] is a {type(s).__name__}, not a Sample")
        if not isinstance(s.t, int | float) or not math.isfinite(s.t) or s.t < 0:
            raise ValueError(f"samples[{i}]: t={s.t!r} must be a finite number >= 0")
        if not isinstance(s.bytes, int) or isinstance(s.bytes, bool) or s.bytes < 0:
            raise ValueError(f"samples[{i}]: bytes={s.bytes!r} must be an int >= 0")
        per[s.conn].append(s)
    for conn, ss in per.items():
        ss.sort(key=lambda s: s.t)
        for a, b in pairwise(ss):
            if b.bytes < a.bytes:
                raise ValueError(
                    f"connection {conn!r}: bytes went back from {a.bytes} at t={a.t} to "
                    f"{b.bytes} at t={b.t} (samples are cumulative)"
                )
    for i, m in enumerate(markers):
        if not isinstance(m, Marker):
            raise ValueError(f"markers[{i}] is a {type(m).__name__}, not a Marker")
        if not isinstance(m.t, int | float) or not math.isfinite(m.t):
            raise ValueError(f"markers[{i}]: t={m.t!r} must be a finite number")
    return per


def _throughput(
    per: dict[str, list[Sample]], t0: float, t1: float
) -> tuple[list[float], list[float]]:
    """(bin centres, Mbit/s): the bytes between two samples are spread evenly over the time
    between them, so bins finer than the sampling do not alias into spikes."""
    width = (t1 - t0) / BINS if t1 > t0 else 1.0
    mbit = [0.0] * BINS
    for ss in per.values():
        for a, b in pairwise(ss):
            bits = (b.bytes - a.bytes) * 8 / 1e6
            if not bits:
                continue
            if b.t <= a.t:
                mbit[min(BINS - 1, int((b.t - t0) / width))] += bits
                continue
            first = min(BINS - 1, int((a.t - t0) / width))
            last = min(BINS - 1, int((b.t - t0) / width))
            for k in range(first, last + 1):
                lo, hi = max(a.t, t0 + k * width), min(b.t, t0 + (k + 1) * width)
                if hi > lo:
                    mbit[k] += bits * (hi - lo) / (b.t - a.t)
    return [t0 + (k + 0.5) * width for k in range(BINS)], [m / width for m in mbit]


def write_timeline(
    path_png: str | os.PathLike[str],
    samples: Sequence[Sample],
    markers: Sequence[Marker],
    title: str,
) -> None:
    """Draw ``samples`` and ``markers`` under ``title`` into the PNG ``path_png``."""
    per = _validate(samples, markers, title)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ts = [s.t for s in samples]
    t0, t1 = min(ts), max(ts)
    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.6))
    centres, rate = _throughput(per, t0, t1)
    top.plot(centres, rate, color="tab:blue", linewidth=1.2)
    top.fill_between(centres, rate, color="tab:blue", alpha=0.15)
    top.set_ylabel("throughput (Mbit/s)")
    top.set_ylim(bottom=0)
    many = len(per) > 12
    for conn, ss in sorted(per.items()):
        bottom.plot(
            [s.t for s in ss],
            [s.bytes / 1e6 for s in ss],
            linewidth=0.6 if many else 1.2,
            alpha=0.5 if many else 0.9,
            label=None if many else conn,
        )
    bottom.set_ylabel("delivered per connection (MB)")
    bottom.set_xlabel("time (s)")
    if not many:
        bottom.legend(loc="upper left", fontsize="small")
    else:
        bottom.text(0.01, 0.95, f"{len(per)} connections", transform=bottom.transAxes, va="top")
    for i, m in enumerate(sorted(markers, key=lambda m: m.t)):
        for ax in (top, bottom):
            ax.axvline(m.t, color="tab:red", linestyle="--", linewidth=1)
        top.annotate(
            m.label, (m.t, 1), xycoords=("data", "axes fraction"), xytext=(3, -3 - 12 * (i % 3)),
            textcoords="offset points", va="top", fontsize="small", color="tab:red",
        )  # fmt: skip
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path_png)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_stream_timeline(
    path_png: str | os.PathLike[str],
    samples_path: str | os.PathLike[str],
    marks: Sequence[tuple[float, str]],
    title: str,
) -> bool:
    """Draw the stream checker client's ``--samples`` file (``[[conn, t, bytes], ...]``, t on
    the monotonic clock) with ``marks`` (monotonic t, label); time starts at the first sample.
    False (nothing written) when the file is missing, unreadable or empty."""
    try:
        with open(samples_path) as f:
            rows = json.load(f)
    except (OSError, ValueError):
        return False
    if not rows:
        return False
    t0 = min(r[1] for r in rows)
    os.makedirs(os.path.dirname(os.fspath(path_png)) or ".", exist_ok=True)
    write_timeline(
        path_png,
        [Sample(conn=str(r[0]), t=r[1] - t0, bytes=r[2]) for r in rows],
        [Marker(t - t0, label) for t, label in marks if t >= t0],
        title,
    )
    return True
