"""``python -m nonstop.store.arpwatch``: from the peer, who answers ARP for each VIP, all the time.

Sends an ARP who-has for every VIP every ``--every-ms`` (a *round*). Each round's requests carry
their own sender IP (a tag: the peer's /24 with last octet 192 + round mod 32), and a reply goes
back to the sender IP of the request it answers, so every reply is counted in the round it
answers, however late it arrives (a loaded box delays replies by tens of ms; counting a late
reply of the old holder in the next round made false duals). Two different MACs answering the
same request is a *dual master*: both held the VIP when the request reached them. Runs until
SIGTERM/SIGINT, then prints one JSON document: ``rounds``, ``duals`` ([t, vip, [macs]], t = when
the round was sent), ``changes`` ([t, vip, mac]: the first reply from a MAC other than the
previous one), ``answers`` (vip -> mac -> count), ``late`` (replies more than 32 rounds late,
not counted). Times are ``time.monotonic()`` (shared by every namespace of a host). The lab
gives the tag addresses to nobody; the nodes learn them as neighbours (harmless).
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import time

from nonstop.bench.probes import ETH_P_ARP, arp_request, iface_mac_ip

TAGS, TAG_BASE = 32, 192


def watch(ifname: str, vips: list[str], every: float, stop: list[bool]) -> dict[str, object]:
    src_mac, src_ip = iface_mac_ip(ifname)
    targets = {socket.inet_aton(v): v for v in vips}
    tag_ips = [src_ip[:3] + bytes([TAG_BASE + k]) for k in range(TAGS)]
    frames = [[arp_request(src_mac, ip, t) for t in targets] for ip in tag_ips]
    tag_of = {ip: k for k, ip in enumerate(tag_ips)}
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    s.bind((ifname, ETH_P_ARP))
    rounds, late = 0, 0
    sent_at: list[float] = [0.0] * TAGS  # tag -> when its current round was sent
    open_rounds: dict[int, dict[str, set[str]]] = {}  # round -> vip -> macs
    last: dict[str, str] = {}
    duals: list[list[object]] = []
    changes: list[list[object]] = []
    answers: dict[str, dict[str, int]] = {v: {} for v in vips}
    next_send = 0.0

    def close(r: int) -> None:
        for vip, macs in open_rounds.pop(r, {}).items():
            if len(macs) > 1:
                duals.append([round(sent_at[r % TAGS], 6), vip, sorted(macs)])

    def receive(frame: bytes) -> None:
        nonlocal late
        if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[20:22] != b"\x00\x02":
            return
        vip, k = targets.get(frame[28:32]), tag_of.get(frame[38:42])
        if vip is None or k is None:
            return
        r = rounds - 1 - ((rounds - 1 - k) % TAGS)  # the latest round sent with tag k
        if r not in open_rounds:
            late += 1
            return
        mac = frame[22:28].hex(":")
        open_rounds[r].setdefault(vip, set()).add(mac)
        answers[vip][mac] = answers[vip].get(mac, 0) + 1
        if last.get(vip) != mac:
            changes.append([round(time.monotonic(), 6), vip, mac])
            last[vip] = mac

    try:
        while not stop[0]:
            now = time.monotonic()
            if now >= next_send:
                close(rounds - TAGS)  # its tag is about to be reused
                sent_at[rounds % TAGS] = now
                open_rounds[rounds] = {}
                for f in frames[rounds % TAGS]:
                    s.send(f)
                rounds += 1
                next_send = now + every
            r, _, _ = select.select([s], [], [], max(0.0, next_send - time.monotonic()))
            if r:
                receive(s.recv(128))
        end = time.monotonic() + 0.05  # the last rounds' replies
        while select.select([s], [], [], max(0.0, end - time.monotonic()))[0]:
            receive(s.recv(128))
        for r in sorted(open_rounds):
            close(r)
    finally:
        s.close()
    return {"rounds": rounds, "duals": duals, "changes": changes, "answers": answers,
            "late": late}  # fmt: skip


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
