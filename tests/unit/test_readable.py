"""nonstop.common.readable: poll(), so fds past 1024 work (a 10,000-connection worker has them)."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from nonstop.common import readable


def test_readable_takes_sockets_and_fds_past_1024() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    a, b = socket.socketpair()
    high = os.dup2(b.fileno(), 2048)
    try:
        assert readable([a, high], 0) == []
        a.send(b"x")
        assert readable([a, high], 1.0) == [high]
        assert readable([high], None) == [high]
    finally:
        os.close(high)
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
