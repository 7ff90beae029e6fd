"""``python -m nonstop.store.arpwatch``: from the peer, who answers ARP for each VIP, all the time.

Sends an ARP who-has for every VIP every ``--every-ms`` and attributes each reply to the round
it answers (the last one sent). Two different MACs answering the same VIP in one round is a
*dual master*: the peer could reach two holders at that moment. Runs until SIGTERM/SIGINT, then
prints one JSON document: ``rounds``, ``duals`` ([t, vip, [macs]]), ``changes`` ([t, vip, mac]:
the first reply from a MAC other than the previous one), ``answers`` (vip -> mac -> count).
Times are ``time.monotonic()`` (shared by every namespace of a host).
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import time

from nonstop.bench.probes import ETH_P_ARP, arp_request, iface_mac_ip


def watch(ifname: str, vips: list[str], every: float, stop: list[bool]) -> dict[str, object]:
    src_mac, src_ip = iface_mac_ip(ifname)
    targets = {socket.inet_aton(v): v for v in vips}
    frames = [arp_request(src_mac, src_ip, t) for t in targets]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((ifname, ETH_P_ARP))
    rounds = 0
    this_round: dict[str, set[str]] = {}
    last: dict[str, str] = {}
    duals: list[list[object]] = []
    changes: list[list[object]] = []
    answers: dict[str, dict[str, int]] = {v: {} for v in vips}
    next_send = 0.0
    try:
        while not stop[0]:
            now = time.monotonic()
            if now >= next_send:
                for vip, macs in this_round.items():
                    if len(macs) > 1:
                        duals.append([round(now, 6), vip, sorted(macs)])
                this_round = {}
                for f in frames:
                    s.send(f)
                rounds += 1
                next_send = now + every
            r, _, _ = select.select([s], [], [], max(0.0, next_send - time.monotonic()))
            if not r:
                continue
            frame = s.recv(128)
            if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
                continue
            vip = targets.get(frame[28:32])
            if vip is None:
                continue
            mac = frame[22:28].hex(":")
            t = time.monotonic()
            this_round.setdefault(vip, set()).add(mac)
            answers[vip][mac] = answers[vip].get(mac, 0) + 1
            if last.get(vip) != mac:
                changes.append([round(t, 6), vip, mac])
                last[vip] = mac
    finally:
        s.close()
    return {"rounds": rounds, "duals": duals, "changes": changes, "answers": answers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nonstop.store.arpwatch")
    p.add_argument("--ifname", required=True)
    p.add_argument("--vip", action="append", required=True)
    p.add_argument("--every-ms", type=float, default=10.0)
    args = p.parse_args(argv)
    stop = [False]

    def on_signal(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out = watch(args.ifname, args.vip, args.every_ms / 1000, stop)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
