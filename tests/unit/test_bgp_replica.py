"""The local hot standby's plumbing (bgp/replica.py): a follower gets each descriptor with the
frame it belongs to however the stream is cut into reads. (The kernel's counts it reconciles
with are read as of one instant: tests/unit/test_app.py, kernel_positions.)"""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from nonstop.bgp.config import loads
from nonstop.bgp.replica import StandbyFollower, _frame

CONFIG = """
asn = 65001
router_id = "10.77.0.11"

[[peers]]
name = "p0"
address = "10.77.0.12"
asn = 65002

[[peers]]
name = "p1"
address = "10.77.0.13"
asn = 65003
"""


def _serve(path: str, frames: list[tuple[bytes, list[int]]]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        c, _ = srv.accept()
        with c:
            for data, fds in frames:
                if fds:
                    socket.send_fds(c, [data], fds)
                else:
                    c.sendall(data)
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
def test_follower_keeps_a_descriptor_for_the_rest_of_its_frame(tmp_path: Path, chunk: int) -> None:
    """A read can end inside an F frame: its descriptor came with the frame's first byte."""
    s0, s1 = socket.socket(), socket.socket(socket.AF_INET6)
    path = str(tmp_path / "replica.sock")
    t = _serve(path, [(_frame(b"F", struct.pack("!HB", 0, 1)), [s0.fileno()]),
                      (_frame(b"F", struct.pack("!HB", 1, 0)), [s1.fileno()])])
    f = StandbyFollower(loads(CONFIG), path)
    f.follow(connect_timeout=5, chunk=chunk)
    t.join()
    assert sorted(f.socks) == ["p0", "p1"]
    assert f.socks["p0"][1] is True and f.socks["p1"][1] is False
    assert f.socks["p1"][0].family == socket.AF_INET6
    for sock, _ in f.socks.values():
        sock.close()
    s0.close()
    s1.close()
