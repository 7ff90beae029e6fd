"""The kernel queue's own figures (``/proc/net/netfilter/nfnetlink_queue``) and what the session
status makes of them: a packet path too slow for its load loses segments in the kernel's queue,
and nothing else shows it (the connections just stall on their peers' retransmission timers)."""

from __future__ import annotations

import logging
import types

import pytest

from nonstop.session.nfnl import kernel_queue
from nonstop.session.service import _OVERLOAD_LOG_S, ProtectedService

# queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
PROC = """\
    3  31605 16384 2 65531 140678     0  1452743  1
  100   3548    12 2 65531     0     7      905  1
"""


def test_kernel_queue_reads_its_own_line() -> None:
    assert kernel_queue(3, PROC) == {"waiting": 16384, "dropped_full": 140678, "dropped_user": 0}
    assert kernel_queue(100, PROC) == {"waiting": 12, "dropped_full": 0, "dropped_user": 7}
    assert kernel_queue(10, PROC) is None  # "10" is not "100": whole fields only
    assert kernel_queue(3, "") is None


def _service() -> types.SimpleNamespace:
    svc = types.SimpleNamespace(spec=types.SimpleNamespace(name="web"), counters={},
                                _queue_dropped=None, _overload_said=-_OVERLOAD_LOG_S,
                                _overload_unsaid=0)  # fmt: skip
    svc._note_overload = lambda kq, now: ProtectedService._note_overload(svc, kq, now)
    return svc


def test_drops_are_counted_and_said_once_per_period(caplog: pytest.LogCaptureFixture) -> None:
    svc = _service()
    q = {"waiting": 10, "dropped_full": 500, "dropped_user": 0}
    with caplog.at_level(logging.WARNING, logger="nonstop.session"):
        svc._note_overload(q, 100.0)  # the first look is the baseline: nothing new yet
        assert "queue_dropped" not in svc.counters and not caplog.records
        svc._note_overload({**q, "dropped_full": 520}, 100.05)
        svc._note_overload({**q, "dropped_full": 530, "dropped_user": 5}, 100.1)
        svc._note_overload({**q, "dropped_full": 530, "dropped_user": 5}, 100.15)
        assert svc.counters["queue_dropped"] == 35
        assert len(caplog.records) == 1 and "dropped 20 segments" in caplog.text
        svc._note_overload({**q, "dropped_full": 600, "dropped_user": 5}, 100.05 + _OVERLOAD_LOG_S)
        assert len(caplog.records) == 2
        assert "dropped 85 segments" in caplog.records[1].getMessage()  # all since the last line
        # a new binding counts from 0: a new baseline, no negative count
        svc._note_overload({"waiting": 0, "dropped_full": 0, "dropped_user": 0}, 200.0)
        svc._note_overload({"waiting": 0, "dropped_full": 4, "dropped_user": 0}, 200.05)
        assert svc.counters["queue_dropped"] == 109
