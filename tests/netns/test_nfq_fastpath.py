"""The clamp without capture copies only headers: a data segment that needs its ACK lowered
cannot be rewritten from a header copy, so it is dropped (TCP sends it again) and the queue
switches to full copies; nothing beyond the limit ever leaves and the data arrives intact."""

from __future__ import annotations

import hashlib
import random
import socket
import threading

import pytest
from tcpwatch import connected
from tests.netns.test_nfq import PORT, QUEUE, A, Reader, tcp_info, wait_stable

from nonstop.lab import Lab
from nonstop.session.nfq import HEADER_COPY, MAX_PAYLOAD, AckClamp
from nonstop.session.repair import dump
from nonstop.session.segment import seq_add

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def test_header_copy_clamp_of_data_segments(lab: Lab) -> None:
    a, b = lab.host("a"), lab.host("b")
    n_held = 50_000
    upload = random.Random(1).randbytes(300_000)
    download = random.Random(2).randbytes(2 << 20)
    limit: dict[str, int | None] = {"ack": None}
    clamp = AckClamp(QUEUE, vip=A, port=PORT, limit=lambda t: limit["ack"], netns=a.ns)
    assert clamp.copy_range == HEADER_COPY
    with clamp, connected(a, b, A, PORT) as (cli, conn):
        base = dump(cli).snd_seq
        acked0 = tcp_info(cli)[1]
        limit["ack"] = seq_add(base, n_held)
        up = Reader(conn)
        up.start()
        down = Reader(cli)
        down.start()
        writer = threading.Thread(target=cli.sendall, args=(upload,), daemon=True)
        writer.start()
        wait_stable(lambda: up.count, period=0.3)
        assert up.count > n_held  # the server's kernel has more than the peer was told
        conn.sendall(download)  # data segments carrying an ACK beyond the limit
        wait_stable(lambda: down.count, period=0.3, timeout=30)
        assert down.count == len(download)
        assert tcp_info(cli)[1] - acked0 == n_held  # never an ACK beyond the limit
        st = clamp.stats
        assert st.truncated >= 1 and clamp.copy_range == MAX_PAYLOAD
        assert st.clamped > 0 and st.dropped == 0 and clamp.error is None
        limit["ack"] = None
        conn.sendall(b"x")
        writer.join(timeout=30)
        cli.shutdown(socket.SHUT_WR)
        up.join(timeout=30)
        assert up.count == len(upload)
        assert up.sha.digest() == hashlib.sha256(upload).digest()
        assert wait_stable(lambda: tcp_info(cli))[1] - acked0 >= len(upload)  # + FIN
        conn.shutdown(socket.SHUT_WR)
        down.join(timeout=30)
        assert down.sha.digest() == hashlib.sha256(download + b"x").digest()
