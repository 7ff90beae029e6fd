"""``nonstop bench vs``: our front, nginx and HAProxy over the same workers in one lab run.

Each proxy runs in the lab's ``front`` host with its own config, pid and log files (in that host's
work directory), the workers in w1..w3 (``nonstop vs worker``: HTTP + a TCP sink), the load from
``client`` (``python -m nonstop.bench.vs``). Per proxy: HTTP requests/s and p99 over keep-alive
connections, L4 throughput into the workers' sinks, and the idempotent GETs that failed while one
worker was SIGKILLed mid-run (every failure counted, nothing retried by the load generator).
nginx and HAProxy get their own retry features on (``proxy_next_upstream``; ``retry-on
all-retryable-errors`` + ``option redispatch``), so the comparison is with each at its best.

Then the front-master kill (``vs_frontkill``, a second lab: two fronts under an agent pair): our
front with the HTTP listener protected (``failed_on_front_kill``) and, for comparison, plain
(``front_kill_unprotected``). nginx and HAProxy have no HA of their own (``null``): with
keepalived moving the VIP, every connection open on the dead one is reset.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from typing import Any

from nonstop.bench.cli import emit, lacks_root, with_progress
from nonstop.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_format_option

TOOLS = ("nonstop", "nginx", "haproxy")
PORTS = {"nonstop": (8080, 9000), "nginx": (8081, 9011), "haproxy": (8082, 9012)}
WORKERS = ("w1", "w2", "w3")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vs",
        help="virtual server: our front vs nginx and HAProxy (HTTP rps, L4, worker kill)",
        description=__doc__,
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--conns", type=int, default=64, help="HTTP keep-alive connections")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--l4-conns", type=int, default=4)
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--uvloop", action="store_true", help="run our front on uvloop (if installed)")
    p.add_argument("--front-kill-conns", type=int, default=16,
                   help="keep-alive connections in the front-master kill (0: skip it)")  # fmt: skip
    p.add_argument("--out", help="also write the JSON to this file")
    add_format_option(p)
    p.set_defaults(func=cmd_vs, format="json")


def _nginx_conf(d: str, front: str, workers: list[str], port: int) -> str:
    ups = "\n".join(f"    server {w}:8080 max_fails=1 fail_timeout=2s;" for w in workers)
    return f"""worker_processes auto;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  upstream ws {{
{ups}
    keepalive 64;
  }}
  server {{
    listen {front}:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://ws;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_next_upstream error timeout http_502 http_503;
      proxy_connect_timeout 1s;
    }}
  }}
}}
"""


def _haproxy_conf(d: str, front: str, workers: list[str], port: int, l4: int) -> str:
    srv = "\n".join(
        f"  server w{i} {w}:8080 check inter 200 fall 2 rise 1" for i, w in enumerate(workers)
    )
    sink = "\n".join(f"  server w{i} {w}:9001 check inter 200" for i, w in enumerate(workers))
    return f"""global
  pidfile {d}/haproxy.pid
  maxconn 8000
defaults
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch 1
frontend web
  mode http
  bind {front}:{port}
  default_backend ws
backend ws
  mode http
  balance roundrobin
  http-reuse always
  retry-on all-retryable-errors
{srv}
listen l4
  mode tcp
  bind {front}:{l4}
  balance roundrobin
{sink}
"""


def _start(vs: Any, tool: str, uvloop: bool) -> Any:
    lab = vs.lab
    h = lab.host("front")
    d = str(h.workdir)
    front = h.addr("lan")
    workers = [lab.host(w).addr("lan") for w in WORKERS]
    port, l4 = PORTS[tool]
    if tool == "nonstop":
        return vs.start_front("front", uvloop=uvloop)
    if tool == "nginx":
        for sub in ("nginx-body", "nginx-proxy", "nginx-fcgi", "nginx-uwsgi", "nginx-scgi"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(_nginx_conf(d, front, workers, port))
        p = h.run(["nginx", "-p", d, "-c", path, "-e", f"{d}/nginx-error.log"], name="nginx")
    else:
        path = os.path.join(d, "haproxy.cfg")
        with open(path, "w") as f:
            f.write(_haproxy_conf(d, front, workers, port, l4))
        p = h.run(["haproxy", "-db", "-f", path], name="haproxy")
    vs.wait(lambda: _port_open(vs, front, port), 10, f"{tool} listening")
    return p


def _port_open(vs: Any, addr: str, port: int) -> bool:
    try:
        with vs.lab.host("client").socket() as s:
            s.settimeout(0.5)
            s.connect((addr, port))
        return True
    except OSError:
        return False


def _measure(vs: Any, tool: str, a: argparse.Namespace) -> dict[str, Any]:
    front = vs.lab.host("front").addr("lan")
    port, l4 = PORTS[tool]
    http = vs.result(
        vs.load("http", f"{front}:{port}", duration=a.duration, conns=a.conns, procs=a.procs),
        timeout=a.duration + 60,
    )
    l4r: dict[str, Any] | None = None
    if tool != "nginx":  # nginx-light has no stream module (libnginx-mod-stream)
        l4r = vs.result(
            vs.load("l4", f"{front}:{l4}", duration=a.duration, conns=a.l4_conns),
            timeout=a.duration + 60,
        )
    stop = os.path.join(vs.lab.workdir, f"stop-{tool}")
    kill_run = vs.load(
        "http", f"{front}:{port}", duration=60, conns=a.conns, procs=a.procs, until_file=stop
    )
    time.sleep(1.0)
    vs.procs["w1"].kill(signal.SIGKILL)
    time.sleep(2.0)
    open(stop, "w").close()
    kill = vs.result(kill_run, timeout=30)
    vs.procs["w1"].reap()
    vs.start_worker("w1")
    if "front-front" in vs.procs and vs.procs["front-front"].alive:
        vs.wait_states("front", {"w1": "up"}, timeout=10)
    else:
        vs.wait(lambda: _port_open_worker(vs), 10, "w1 back")
        time.sleep(1.0)  # let the proxy's health check see it again
    return {
        "http_rps": http["rps"],
        "http_p99_ms": http["p99_ms"],
        "http_failed": http["failed"],
        "l4_gbps": None if l4r is None else l4r["gbps"],
        "l4_note": "nginx-light lacks the stream module" if l4r is None else None,
        "failed_requests": kill["failed"],
        "kill_run": {k: kill[k] for k in ("ok", "failed", "errors", "workers")},
    }


def _port_open_worker(vs: Any) -> bool:
    return _port_open(vs, vs.lab.host("w1").addr("lan"), 8080)


def run_bench(a: argparse.Namespace, tick: Any) -> dict[str, Any]:
    from nonstop.lab import Lab
    from nonstop.vs.labkit import VsLab, vs_topology

    out: dict[str, Any] = {
        "bench": "vs",
        "duration_s": a.duration,
        "conns": a.conns,
        "load_procs": a.procs,
        "uvloop": a.uvloop,
        "cpus": os.cpu_count(),
        "note": "one 2-CPU machine shared by proxy, workers and load generator: noisy figures",
    }
    with Lab(vs_topology(workers=3)) as lab:
        vs = VsLab(lab)
        vs.fronts = ["front"]
        vs.front_config("front", rpc=False)
        for w in WORKERS:
            vs.start_worker(w)
        for tool in a.tools:
            proc = None
            try:
                proc = _start(vs, tool, a.uvloop)
                if tool == "nonstop":
                    vs.wait_states("front", {w: "up" for w in WORKERS})
                out[tool] = _measure(vs, tool, a)
            except (OSError, TimeoutError, RuntimeError) as e:
                log = proc.output()[-400:] if proc is not None else ""
                out[tool] = {"error": f"{type(e).__name__}: {e}", "log_tail": log}
            finally:
                if proc is not None:
                    proc.terminate()
            tick()
    if a.front_kill_conns > 0:
        _front_kills(a, out, tick)
    base = out.get("haproxy")
    ours = out.get("nonstop")
    if base and ours and "error" not in base and "error" not in ours:
        out["ratios"] = {
            "http_rps_vs_haproxy": round(ours["http_rps"] / max(base["http_rps"], 1e-9), 3),
            "l4_vs_haproxy": round((ours["l4_gbps"] or 0) / max(base["l4_gbps"] or 1e-9, 1e-9), 3),
        }
    return out


NO_HA = "no HA of its own: a killed instance takes its connections with it (keepalived moves the VIP; every connection on it is reset)"  # noqa: E501


def _front_kills(a: argparse.Namespace, out: dict[str, Any], tick: Any) -> None:
    from nonstop.bench.vs_frontkill import front_kill

    runs: dict[str, Any] = {}
    for name, protected in (("protected", True), ("unprotected", False)):
        try:
            runs[name] = front_kill(protected=protected, conns=a.front_kill_conns, procs=1)
        except (OSError, TimeoutError, RuntimeError) as e:
            runs[name] = {"error": f"{type(e).__name__}: {e}", "failed": None}
        tick()
    if "nonstop" in out and "error" not in out["nonstop"]:
        out["nonstop"]["failed_on_front_kill"] = runs["protected"].get("failed")
        out["nonstop"]["front_kill"] = runs["protected"]
        out["nonstop"]["front_kill_unprotected"] = runs["unprotected"]
    for t in ("nginx", "haproxy"):
        if t in out and "error" not in out[t]:
            out[t]["failed_on_front_kill"] = None
            out[t]["front_kill_note"] = NO_HA


def cmd_vs(args: argparse.Namespace) -> int:
    if lacks_root("nonstop bench vs"):
        return EXIT_USAGE
    total = len(args.tools) + (2 if args.front_kill_conns > 0 else 0)
    result = with_progress(total, lambda tick: run_bench(args, tick), label="bench vs")
    if emit(result, args):
        for t in args.tools:
            r = result[t]
            if "error" in r:
                print(f"{t:8} error: {r['error']}")
                continue
            print(
                f"{t:8} http {r['http_rps']} rps p99 {r['http_p99_ms']} ms, "
                f"l4 {r['l4_gbps']} Gbit/s, failed on worker kill {r['failed_requests']}, "
                f"on front-master kill {r.get('failed_on_front_kill', 'n/a')}"
            )
    ours = result.get("nonstop", {})
    bad = ours.get("failed_requests") or ours.get("failed_on_front_kill")
    return EXIT_FAIL if bad or "error" in ours else EXIT_OK
