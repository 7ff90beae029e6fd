"""``nonstop bench takeover``: N protected connections through the master's death, end to end.

The real thing, as an operator runs it: the agent pair with a witness in the demo lab (10 ms
heartbeats by default, the issue's setting), a ``[[services]]`` entry for VIP:7400, the stream
checker's protected server on both nodes (a standby on the backup), and the peer streaming both
ways on ``sessions`` connections at ``rate`` messages per second each way. Once the master
protects every connection (the backup holds a whole, acknowledged copy), its agent and service
are SIGKILLed; the backup detects it from the heartbeats, restores every connection with
TCP_REPAIR, adds the VIP and hands them to its standby service.

Figures, all from the peer's side unless said:

- ``kept``/``resets``/``bytes_lost``/``bytes_duplicated``: the stream checker's report;
- ``interruption_ms``: per connection, the silence of the server's stream around the kill (last
  message before it to the first after it, the issue's definition); it includes up to one
  message interval (``1/rate``) of plain idleness before the kill. Timed by the peer's kernel
  (the client's receive timestamps, ``nonstop.streams.run``): the client shares the lab's CPUs
  with both nodes, and its reads lagged a takeover by 20-50 ms (``client_read_lag_ms``);
- ``kill_to_first_byte_ms``: from the kill to each connection's first message after it;
- ``restore_us_per_session``: the backup's TCP_REPAIR restore of all of them, per connection;
- ``sync_bytes_per_update``: what one sync record costs on the wire beyond the stream bytes and
  state blobs it carries (its fields plus its share of the batch's header and MAC), from the
  master's counters just before the kill; ``sync_tx_bytes_per_record`` is everything sent
  (payload and retransmissions included) per record.

The timeline PNG (``png``): bytes delivered per connection and the aggregate throughput over
time, with the kill and the promotion marked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from nonstop.bench.hostload import HostLoad
from nonstop.cluster import Cluster, ClusterSpec
from nonstop.lab import Lab, demo_topology
from nonstop.report.timeline import write_stream_timeline

PORT = 7400
VIP = "10.77.0.100"


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, round(q * (len(s) - 1)))], 2)


def _service(st: dict[str, Any] | None) -> dict[str, Any]:
    """The (one) protected service's part of an agent status; {} when there is none."""
    return ((st or {}).get("sessions") or [{}])[0]


def _sync(st: dict[str, Any] | None) -> dict[str, Any]:
    return _service(st).get("sync") or {}


def run(
    sessions: int,
    *,
    rate: float = 20.0,
    size: int = 100,
    interval_ms: int = 10,
    settle: float = 1.5,
    png: str | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """One takeover with ``sessions`` connections; returns the figures (see the module doc)."""
    spec = ClusterSpec(services={"stream": PORT}, preempt=False, interval_ms=interval_ms)
    load = HostLoad().start()
    with Lab(demo_topology()) as lab:
        c = Cluster(lab, spec)
        c.start()
        c.wait_ready(timeout=20)
        svc = {n: c.start_stream_service(n, "stream", rate=rate, size=size) for n in spec.nodes}
        master = c.master()
        if master is None:
            raise RuntimeError("no single master after start")
        other = next(n for n in spec.nodes if n != master)
        c.wait_serving(svc[master])
        samples_path = os.path.join(lab.workdir, "samples.json")
        argv = [sys.executable, "-m", "nonstop.streams", "client", "--host", VIP, "--port",
                str(PORT), "--conns", str(sessions), "--duration", "3600", "--rate", str(rate),
                "--size", str(size), "--long-gap", str(1.2 / rate),
                "--samples", samples_path]  # fmt: skip
        client = lab.host("peer").run(argv, stdout=subprocess.PIPE, name="client")
        say(f"{sessions} connections: waiting for the backup to hold them all")
        _wait_protecting(c, master, other, sessions, timeout=30 + sessions / 100)
        time.sleep(settle)
        st_master = c.status(master)
        before = _sync(st_master)
        # segments the master's kernel queue dropped before the kill: its packet path was too
        # slow for the load (the streams stall on retransmission timers, backed off)
        queue_dropped = (_service(st_master).get("counters") or {}).get("queue_dropped", 0)
        held_at_kill = _sync(c.status(other)).get("held_connections")
        t_kill = time.monotonic()
        c.procs[master].kill()
        svc[master].kill()
        c.wait_role(other, "master", timeout=15)
        t_master = time.monotonic()
        say(f"{other} is master after {round((t_master - t_kill) * 1000)} ms (seen by polling)")
        time.sleep(settle + sessions / 2000)
        st = c.status(other) or {}
        client.send_signal(signal.SIGTERM)
        out, _ = client.popen.communicate(timeout=60 + sessions / 50)
        rep = json.loads(out.decode().strip().splitlines()[-1])
        ss = _service(st)
        promo = ss.get("last_promotion") or {}
        result = _figures(rep, sessions, rate, size, t_kill, promo, before)
        counters = ss.get("counters") or {}
        result["restore_failures"] = counters.get("restore_failures")
        if rep.get("unclean"):  # the first connections that did not end cleanly, as the client saw
            result["unclean"] = rep["unclean"][:8]
        # connections kicked once the VIP answered here (nonstop.session.kick), packets sent
        result["kicked"] = counters.get("kicked")
        result["kick_packets"] = counters.get("kick_packets")
        result["held_by_backup_at_kill"] = held_at_kill
        result["master_queue_dropped_before_kill"] = queue_dropped
        result["new_master_seen_ms"] = round((t_master - t_kill) * 1000, 1)
        result["heartbeat_interval_ms"] = interval_ms
        result["host"] = load.stop()  # this box's speed that hour (figures move with it)
        # the new master's role changes after the kill: one (backup -> master) is the takeover;
        # more (a fence on a saturated box, then a promotion from what it parked) and the
        # figures above describe the last promotion, the stream a second interruption
        changes = [h for h in st.get("history", []) if h.get("at_monotonic", 0) >= t_kill]
        result["role_changes_after_kill"] = [
            f"{h['old']} -> {h['new']}: {h['reason']}" for h in changes]
        # where the silence went: each step of the (last) takeover, ms after the kill
        steps = {"master": changes[-1]["at_monotonic"]} if changes else {}
        steps.update((st.get("session_worker") or {}).get("last_takeover_at") or {})
        result["takeover_steps_ms"] = {k: round((t - t_kill) * 1000, 1)
                                       for k, t in sorted(steps.items(), key=lambda kv: kv[1])}
        marks = [(t_kill, "master killed"), (t_master, "backup is master")]
        title = f"TCP session takeover: {sessions} connections, {rate:g} msg/s each way"
        if png and write_stream_timeline(png, samples_path, marks, title):
            result["timeline_png"] = png
        return result


def _wait_protecting(c: Cluster, master: str, other: str, n: int, timeout: float) -> None:
    def ok() -> bool:
        m, b = _service(c.status(master)), _service(c.status(other))
        return (
            m.get("connections", 0) >= n
            and bool(m.get("sync", {}).get("protecting"))
            and b.get("sync", {}).get("held_connections", 0) >= n
        )

    try:
        c.wait(ok, timeout, f"{master} to protect {n} connections", poll=0.1)
    except TimeoutError:
        m, b = _service(c.status(master)), _service(c.status(other))
        raise TimeoutError(
            f"after {timeout:.0f} s the master tracks {m.get('connections')} of {n} connections "
            f"(protecting: {m.get('sync', {}).get('protecting')}), the backup holds "
            f"{b.get('sync', {}).get('held_connections')}"
        ) from None


def _figures(rep: dict[str, Any], n: int, rate: float, size: int, t_kill: float,
             promo: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    gaps: list[float] = []
    firsts: list[float] = []
    natural = 1000.0 / rate
    for spans in rep.get("long_gaps", {}).values():
        around = [(a, b) for a, b in spans if a <= t_kill <= b]
        if around:
            a, b = around[0]
            gaps.append((b - a) * 1000)
            firsts.append((b - t_kill) * 1000)
    # connections whose stream never paused longer than 1.2 intervals around the kill
    quiet = max(0, n - len(gaps))
    gaps += [natural * 1.2] * quiet  # an upper bound for those: counted, not dropped
    records = before.get("records", 0)
    restored = promo.get("restored")
    return {
        "sessions": n,
        "rate_per_conn": rate,
        "message_bytes": size,
        "kept": rep.get("kept", 0),
        "resets": rep.get("resets", 0),
        "bytes_lost": rep.get("lost", 0) * size,
        "bytes_duplicated": rep.get("duplicated", 0) * size,
        "corrupted": rep.get("corrupted", 0),
        "errors": rep.get("errors", {}),
        "restored": restored,
        "restore_ms": promo.get("restore_ms"),
        "restore_us_per_session": promo.get("restore_us_per_session"),
        "promotion_total_ms": promo.get("total_ms"),
        "promotion_phases_ms": promo.get("phases_ms"),
        "restore_engine": promo.get("restore_engine"),
        "handed_to_service": promo.get("handed_to_service"),
        "interruption_ms": {"p50": _pct(gaps, 0.5), "p99": _pct(gaps, 0.99),
                            "max": _pct(gaps, 1.0), "n": len(gaps),
                            "within_one_interval": quiet},
        "kill_to_first_byte_ms": {"p50": _pct(firsts, 0.5), "p99": _pct(firsts, 0.99)},
        # both timed by the peer's kernel (receive timestamps); its reads lagged behind by this
        "client_read_lag_ms": rep.get("read_lag_ms"),
        "message_interval_ms": round(natural, 1),
        "sync_records": records,
        "sync_tx_bytes": before.get("tx_bytes", 0),
        "sync_payload_bytes": before.get("payload_bytes", 0),
        # what a record costs beyond the bytes it carries: its fields and its share of the
        # frame's header and MAC (sealed, before retransmissions)
        "sync_bytes_per_update": round(
            (before.get("sealed_bytes", 0) - before.get("payload_bytes", 0)) / records, 2)
        if records else None,
        "sync_tx_bytes_per_record": round(before.get("tx_bytes", 0) / records, 2)
        if records else None,
    }

