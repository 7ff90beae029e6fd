"""Real BGP peers in a lab host (BIRD 2, FRR bgpd without zebra) and our speaker as a process;
used by the netns tests and by ``nonstop bench bgp``.

Every process is started through ``LabHost.run`` so the lab kills it on teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nonstop.lab import LabHost, LabProcess


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class BirdPeer:
    """BIRD 2 in ``host``: one BGP protocol per neighbour, static routes from a generated file."""

    def __init__(self, host: LabHost, *, asn: int, router_id: str, name: str = "bird") -> None:
        self.host = host
        self.asn = asn
        self.router_id = router_id
        self.dir = host.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "bird.ctl"
        self.proc: LabProcess | None = None
        self.name = name

    def write_config(self, neighbours: list[dict[str, Any]], static4: list[str] = (),  # type: ignore[assignment]
                     static6: list[str] = (), static_file: Path | None = None,  # type: ignore[assignment]
                     extra: str = "") -> Path:
        """neighbours: dicts with name, address, asn, [password], [next_hop6], [local]."""
        lines = ["log stderr all;", f"router id {self.router_id};", "protocol device {}"]
        if static_file is not None:
            lines.append(f'protocol static s4 {{\n  ipv4;\ninclude "{static_file}";\n}}')
        elif static4:
            lines.append("protocol static s4 { ipv4; " + " ".join(
                f"route {p} blackhole;" for p in static4) + " }")
        if static6:
            lines.append("protocol static s6 { ipv6; " + " ".join(
                f"route {p} blackhole;" for p in static6) + " }")
        for n in neighbours:
            pw = f'password "{n["password"]}";' if n.get("password") else ""
            nh6 = f'next hop address {n["next_hop6"]};' if n.get("next_hop6") else ""
            lines.append(
                f"protocol bgp {n['name']} {{ local {n['local']} as {self.asn}; "
                f"neighbor {n['address']} as {n['asn']}; {pw} hold time {n.get('hold', 90)}; "
                f"connect retry time 1; error wait time 1, 2; {n.get('extra', '')}"
                f"ipv4 {{ import all; export all; }}; "
                f"ipv6 {{ import all; export all; {nh6} }}; }}")
        lines.append(extra)
        path = self.dir / "bird.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> LabProcess:
        self.proc = self.host.run(["bird", "-c", self.dir / "bird.conf", "-s", self.sock, "-P",
                                   self.dir / "bird.pid", "-f"], name=self.name)
        wait_for(self.sock.exists, 10, "bird control socket")
        return self.proc

    def cli(self, *args: str, timeout: float = 60) -> str:
        r = subprocess.run(["birdc", "-s", str(self.sock), *args], capture_output=True,
                           text=True, timeout=timeout)
        return r.stdout

    def protocol(self, name: str) -> dict[str, str]:
        """state and since (from ``show protocols``) and the Info column."""
        for line in self.cli("show", "protocols", name).splitlines():
            parts = line.split()
            if parts and parts[0] == name:
                return {"state": parts[3], "since": parts[4], "info": " ".join(parts[5:])}
        return {}

    @staticmethod
    def same_since(a: str, b: str, slack_ms: float = 50.0) -> bool:
        """Whether two ``since`` columns (``HH:MM:SS.mmm``) are the same state change. BIRD keeps
        the time on its monotonic clock and prints it through the current wall-clock offset, so
        the same instant reads a millisecond off once the clock has been slewed (seen in CI);
        a session that went down and came back is later by its whole reconnect."""
        def ms(t: str) -> float:
            h, m, rest = t.split(":")
            return (int(h) * 60 + int(m)) * 60_000 + float(rest) * 1000

        return abs(ms(a) - ms(b)) <= slack_ms

    def established(self, name: str) -> bool:
        return self.protocol(name).get("info", "").startswith("Established")

    def routes(self, table: str = "master4", protocol: str | None = None) -> dict[str, str]:
        """prefix -> first line of ``show route`` for it."""
        args = ["show", "route", "table", table, "all"]
        if protocol:
            args += ["protocol", protocol]
        out: dict[str, str] = {}
        cur = None
        for line in self.cli(*args).splitlines():
            if line and not line[0].isspace() and "/" in line.split()[0]:
                cur = line.split()[0]
                out[cur] = line
            elif cur is not None and line.strip():
                out[cur] += "\n" + line.strip()
        return out

    def count(self, table: str = "master4", protocol: str | None = None) -> int:
        args = ["show", "route", "table", table, "count"]
        if protocol:
            args += ["protocol", protocol]
        for line in self.cli(*args).splitlines():
            if "of" in line and "routes" in line:
                return int(line.split()[0])
        return 0

    def stats(self, name: str) -> dict[str, dict[str, int]]:
        """Route change stats per channel: {'ipv4': {'import_updates': n, 'import_withdraws':
        n, 'export_updates': n, 'export_withdraws': n}}."""
        out: dict[str, dict[str, int]] = {}
        chan = None
        for line in self.cli("show", "protocols", "all", name).splitlines():
            s = line.strip()
            if s.startswith("Channel "):
                chan = s.split()[1]
                out[chan] = {}
            for kind in ("Import updates", "Import withdraws", "Export updates",
                         "Export withdraws"):
                if chan and s.startswith(kind + ":"):
                    nums = s.split(":", 1)[1].split()
                    out[chan][kind.lower().replace(" ", "_")] = int(nums[0])
        return out


class FrrPeer:
    """FRR bgpd without zebra (``-Z -n -S``), its own pid file, vty socket dir and config."""

    def __init__(self, host: LabHost, *, asn: int, router_id: str, listen: str,
                 name: str = "frr") -> None:
        self.host = host
        self.asn = asn
        self.router_id = router_id
        self.listen = listen
        self.dir = host.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)
        self.proc: LabProcess | None = None
        self.name = name

    def write_config(self, neighbours: list[dict[str, Any]], networks4: list[str] = (),  # type: ignore[assignment]
                     networks6: list[str] = ()) -> Path:  # type: ignore[assignment]
        lines = ["hostname frr", "log stdout informational", f"router bgp {self.asn}",
                 f" bgp router-id {self.router_id}", " no bgp ebgp-requires-policy",
                 " no bgp network import-check"]
        for n in neighbours:
            lines.append(f" neighbor {n['address']} remote-as {n['asn']}")
            if n.get("password"):
                lines.append(f" neighbor {n['address']} password {n['password']}")
            lines.append(f" neighbor {n['address']} timers {n.get('keepalive', 3)} "
                         f"{n.get('hold', 9)}")
            lines.append(f" neighbor {n['address']} timers connect 1")
            if n.get("update_source"):
                lines.append(f" neighbor {n['address']} update-source {n['update_source']}")
        for fam, nets in (("ipv4", networks4), ("ipv6", networks6)):
            lines.append(f" address-family {fam} unicast")
            lines += [f"  network {p}" for p in nets]
            lines += [f"  neighbor {n['address']} activate" for n in neighbours]
            lines.append(" exit-address-family")
        path = self.dir / "bgpd.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> LabProcess:
        self.proc = self.host.run(
            ["/usr/lib/frr/bgpd", "-Z", "-n", "-S", "-u", "root", "-g", "root", "-i",
             self.dir / "bgpd.pid", "--vty_socket", self.dir, "-f", self.dir / "bgpd.conf",
             "-l", self.listen], name=self.name)
        wait_for(lambda: (self.dir / "bgpd.vty").exists(), 10, "bgpd vty socket")
        return self.proc

    def vtysh(self, cmd: str, timeout: float = 60) -> str:
        r = subprocess.run(["vtysh", "--vty_socket", str(self.dir), "-c", cmd],
                           capture_output=True, text=True, timeout=timeout)
        return r.stdout

    def configure(self, *lines: str, timeout: float = 60) -> str:
        """``configure terminal`` then ``lines`` in one vtysh call (e.g. ``router bgp N``,
        ``address-family ipv4 unicast``, ``network P``); returns what vtysh printed."""
        argv = ["vtysh", "--vty_socket", str(self.dir), "-c", "configure terminal"]
        for line in lines:
            argv += ["-c", line]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return r.stdout + r.stderr

    def json(self, cmd: str) -> Any:
        out = self.vtysh(cmd + " json")
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return {}

    def neighbour(self, address: str) -> dict[str, Any]:
        return self.json(f"show bgp neighbors {address}").get(address, {})

    def established(self, address: str) -> bool:
        return self.neighbour(address).get("bgpState") == "Established"

    def routes(self, fam: str = "ipv4") -> dict[str, Any]:
        return self.json(f"show bgp {fam} unicast").get("routes", {})


class OurSpeaker:
    """``nonstop bgp speaker`` in a lab host, its config written from ``toml``."""

    def __init__(self, host: LabHost, toml: str, name: str = "speaker") -> None:
        self.host = host
        self.dir = host.workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = self.dir / "bgp.sock"
        self.config = self.dir / "bgp.toml"
        self.config.write_text(toml.replace("@API@", str(self.socket)))
        self.proc: LabProcess | None = None
        self.name = name

    def start(self) -> LabProcess:
        self.proc = self.host.run([sys.executable, "-m", "nonstop", "-v", "bgp", "speaker",
                                   "--config", self.config], name=self.name)
        wait_for(self.socket.exists, 15, "speaker API socket")
        return self.proc

    def get(self, path: str) -> dict[str, Any]:
        from nonstop.bgp.cli import fetch

        return fetch(str(self.socket), path)

    def peer(self, name: str) -> dict[str, Any]:
        for r in self.get("/summary")["peers"]:
            if r["peer"] == name:
                return r
        raise KeyError(name)

    def routes(self, prefix: str | None = None, limit: int = 100000) -> dict[str, Any]:
        q = f"/routes?limit={limit}" + (f"&prefix={prefix}" if prefix else "")
        return {r["prefix"]: r for r in self.get(q)["routes"]}


# -- the benchmark ---------------------------------------------------------------------------------


def table_prefixes(n: int) -> list[str]:
    """n distinct /28s inside 10.0.0.0/8 (2**20 of them). They are BGP data only: the benchmark
    never installs them and no packet is sent to them."""
    if n > 1 << 20:
        raise ValueError("at most 1048576 routes")
    return [f"10.{i >> 12 & 0xFF}.{i >> 4 & 0xFF}.{(i & 0xF) << 4}/28" for i in range(n)]


def write_static(path: Path, n: int) -> None:
    with path.open("w") as f:
        for p in table_prefixes(n):
            f.write(f"route {p} blackhole;\n")


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def standby_resume_ms(n: int) -> dict[str, float]:
    """In-process: a master speaker (journaling) loads n routes from a synthetic peer
    (``synthetic_load_s``), a Standby applies its journal (``journal_apply_s``), then resume()
    is timed (``resume_ms``: the non-stop part of a takeover, without moving the socket)."""
    from nonstop.bgp.attrs import Attrs
    from nonstop.bgp.config import loads
    from nonstop.bgp.journal import Journal, Standby
    from nonstop.bgp.speaker import Speaker
    from nonstop.bgp.update import encode_update
    from nonstop.bgp.wire import Capabilities, Open, encode_keepalive, encode_open

    cfg = loads('asn=65001\nrouter_id="10.77.0.11"\n[[peers]]\nname="p"\naddress="10.77.0.12"'
                '\nasn=65002\nfamilies=["ipv4"]\n')
    sp = Speaker(cfg)
    j = Journal(sp)
    sp.start(1.0)
    sp.connection_made("p", 1.0, "10.77.0.11")
    sp.data_to_send("p")
    caps = Capabilities(frozenset({(1, 1)}), 65002, True, None)
    sp.receive_data("p", encode_open(Open(65002, 90, "10.77.0.12", caps)) + encode_keepalive(),
                    1.0)
    sp.data_to_send("p")
    msgs = []
    for g in range(0, n, 1000):
        a = Attrs(as_path=((2, (65002, 100 + g // 1000 % 500)),), next_hop=b"\x0a\x4d\x00\x0c")
        keys = [((0x0A000000 + (i << 4)) << 8) | 28 for i in range(g, min(n, g + 1000))]
        msgs += encode_update((1, 1), announced=keys, attrs=a)
    stream = b"".join(msgs)
    t = time.perf_counter()
    for off in range(0, len(stream), 65536):  # as a socket would deliver it
        sp.receive_data("p", stream[off : off + 65536], 2.0)
    load_s = time.perf_counter() - t
    sb = Standby(cfg)
    t = time.perf_counter()
    for r in j.take():
        sb.apply(r)
    apply_s = time.perf_counter() - t
    t = time.perf_counter()
    sb.resume(3.0)
    out = sb.speaker.data_to_send("p")
    resume = (time.perf_counter() - t) * 1000
    assert len(sb.speaker.loc[(1, 1)]) == n and out == encode_keepalive()
    return {"resume_ms": round(resume, 3), "journal_apply_s": round(apply_s, 2),
            "synthetic_load_s": round(load_s, 2)}
