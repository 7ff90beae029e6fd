"""Measuring probes of the failover benchmark. Each runs as its own process inside a lab host
(``python -m nonstop.bench.probes MODE ...``), so it sees that host's network namespace and no
probe competes for the benchmark driver's GIL. Every probe stamps events with
``time.monotonic()`` (CLOCK_MONOTONIC is one clock for every network namespace) and writes JSON.

Modes:
- ``addrmon``: netlink monitor (pyroute2 ``IPRoute.bind()``): one JSON line per IPv4 address added
  or removed and per link carrier change in its host, stamped when read.
- ``echo``: UDP responder on 0.0.0.0:PORT; replies ``<request>|<node name>``.
- ``probe``: in the peer; sends ``seq|t_send`` to VIP:PORT every ``--interval-ms`` and records each
  reply (seq, send time, receive time, responder). Stops by itself once a second responder has
  answered ``--switch-count`` times, or after ``--max-s``. Then asks ARP who-has VIP for
  ``--arp-ms`` from the peer's interface and records every MAC that answered. One JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ARP = 0x0806
SIOCGIFHWADDR = 0x8927
SIOCGIFADDR = 0x8915


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# -- addrmon -----------------------------------------------------------------------------------


def addrmon(args: argparse.Namespace) -> int:
    from pyroute2 import IPRoute

    ipr = IPRoute()
    ipr.bind()
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    carrier: dict[int, bool] = {}
    for link in ipr.get_links():
        carrier[link["index"]] = bool(link["flags"] & 0x10000)  # IFF_LOWER_UP
    observe_promptly()  # after importing pyroute2: ~0.3 s of CPU that would starve the agents
    _emit({"t": time.monotonic(), "ev": "ready"})
    deadline = time.monotonic() + args.max_s
    while time.monotonic() < deadline:
        for msg in ipr.get():
            t = time.monotonic()
            event = msg.get("event")
            if event in ("RTM_NEWADDR", "RTM_DELADDR") and msg.get("family") == socket.AF_INET:
                _emit(
                    {
                        "t": t,
                        "ev": "add" if event == "RTM_NEWADDR" else "del",
                        "addr": msg.get_attr("IFA_ADDRESS") or msg.get_attr("IFA_LOCAL"),
                        "if": names.get(msg["index"], str(msg["index"])),
                    }
                )
            elif event == "RTM_NEWLINK":
                idx = msg["index"]
                names[idx] = msg.get_attr("IFLA_IFNAME") or names.get(idx, str(idx))
                up = bool(msg["flags"] & 0x10000)
                if carrier.get(idx) != up:
                    carrier[idx] = up
                    _emit({"t": t, "ev": "link", "if": names[idx], "up": up})
    return 0


# -- echo --------------------------------------------------------------------------------------


def echo(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", args.port))
    tail = b"|" + args.name.encode()
    _emit({"t": time.monotonic(), "ev": "ready"})
    deadline = time.monotonic() + args.max_s
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], 1.0)
        if not r:
            continue
        try:
            data, addr = s.recvfrom(256)
            s.sendto(data[:64] + tail, addr)
        except OSError:
            continue  # link down, no route: the prober simply sees no reply
    return 0


# -- probe -------------------------------------------------------------------------------------


def _ifreq(sock: socket.socket, req: int, ifname: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), req, struct.pack("256s", ifname.encode()[:15]))


def iface_mac_ip(ifname: str) -> tuple[bytes, bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        mac = _ifreq(s, SIOCGIFHWADDR, ifname)[18:24]
        ip = _ifreq(s, SIOCGIFADDR, ifname)[20:24]
    return mac, ip


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    eth = b"\xff" * 6 + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + b"\x00" * 6 + target_ip
    return eth + arp


def parse_arp_reply(frame: bytes, target_ip: bytes) -> bytes | None:
    """Sender MAC of an ARP reply that claims ``target_ip``; None for any other frame."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, 2):
        return None
    if frame[28:32] != target_ip:
        return None
    return frame[22:28]


def arp_who_has(ifname: str, ip: str, duration_s: float, every_s: float = 0.01) -> dict[str, int]:
    """Ask who-has ``ip`` every ``every_s`` for ``duration_s``; MAC -> number of replies."""
    src_mac, src_ip = iface_mac_ip(ifname)
    target = socket.inet_aton(ip)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    try:
        s.bind((ifname, ETH_P_ARP))
        frame = arp_request(src_mac, src_ip, target)
        seen: dict[str, int] = {}
        end = time.monotonic() + duration_s
        next_send = 0.0
        while (now := time.monotonic()) < end:
            if now >= next_send:
                s.send(frame)
                next_send = now + every_s
            r, _, _ = select.select([s], [], [], max(0.0, min(next_send, end) - now))
            if r:
                mac = parse_arp_reply(s.recv(128), target)
                if mac is not None:
                    key = mac.hex(":")
                    seen[key] = seen.get(key, 0) + 1
        return seen
    finally:
        s.close()


def probe(args: argparse.Namespace) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    dst = (args.vip, args.port)
    interval = args.interval_ms / 1000.0
    sent: dict[int, float] = {}
    replies: list[list[Any]] = []
    counts: dict[str, int] = {}
    first: str | None = None
    ready = False
    start = time.monotonic()
    end = start + args.max_s
    seq = 0
    next_send = start
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_send:
            seq += 1
            sent[seq] = now
            with contextlib.suppress(OSError):  # unreachable during the move: a lost probe
                s.sendto(f"{seq}".encode(), dst)
            next_send += interval
            if next_send < now:
                next_send = now + interval
        r, _, _ = select.select([s], [], [], max(0.0, min(next_send, end) - time.monotonic()))
        if not r:
            continue
        while True:
            try:
                data = s.recv(256)
            except BlockingIOError:
                break
            except OSError:
                break  # ICMP errors surface here
            t = time.monotonic()
            try:
                seq_text, name = data.decode().split("|", 1)
                rseq = int(seq_text)
            except ValueError:
                continue
            replies.append([rseq, sent.get(rseq), t, name])
            counts[name] = counts.get(name, 0) + 1
            if first is None:
                first = name
            if not ready and counts[name] >= args.ready_count:
                ready = True
                sys.stderr.write(f"ready {t}\n")
                sys.stderr.flush()
        others = [n for n, c in counts.items() if n != first and c >= args.switch_count]
        if others:
            break
    s.close()
    arp = arp_who_has(args.ifname, args.vip, args.arp_ms / 1000.0) if args.arp_ms > 0 else {}
    _emit({"start": start, "sent": seq, "replies": replies, "arp": arp, "end": time.monotonic()})
    return 0


def arp_cmd(args: argparse.Namespace) -> int:
    _emit({"arp": arp_who_has(args.ifname, args.vip, args.arp_ms / 1000.0)})
    return 0


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nonstop.bench.probes")
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("addrmon")
    a.add_argument("--max-s", type=float, default=3600.0)
    a.set_defaults(func=addrmon)
    e = sub.add_parser("echo")
    e.add_argument("--name", required=True)
    e.add_argument("--port", type=int, default=7709)
    e.add_argument("--max-s", type=float, default=3600.0)
    e.set_defaults(func=echo)
    pr = sub.add_parser("probe")
    pr.add_argument("--vip", required=True)
    pr.add_argument("--port", type=int, default=7709)
    pr.add_argument("--ifname", required=True)
    pr.add_argument("--interval-ms", type=float, default=1.0)
    pr.add_argument("--max-s", type=float, default=4.0)
    pr.add_argument("--ready-count", type=int, default=5)
    pr.add_argument("--switch-count", type=int, default=20)
    pr.add_argument("--arp-ms", type=float, default=100.0)
    pr.set_defaults(func=probe)
    ar = sub.add_parser("arp")
    ar.add_argument("--vip", required=True)
    ar.add_argument("--ifname", required=True)
    ar.add_argument("--arp-ms", type=float, default=100.0)
    ar.set_defaults(func=arp_cmd)
    return p


OBSERVER_PRIORITY = 80  # above the agents' and keepalived's real-time priority (50)


def observe_promptly() -> None:
    """Observers (address monitor, prober) run SCHED_FIFO above the tools under test, so a tool
    that keeps the CPUs busy at real-time priority cannot delay the time stamps. Best effort.
    Call it once set up: what a process does at this priority, every task below waits for."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(OBSERVER_PRIORITY))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "probe":  # (addrmon raises its priority once set up)
        observe_promptly()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
