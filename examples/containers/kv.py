"""A small key-value service for seed 000's setting: an active and a standby instance on one
node share a state volume; the standby takes over from the shared checkpoint when the active dies.

Both instances run the same program. Each first answers on its own health port (HEALTH_PORT)
with "active" or "standby", then blocks on an exclusive flock of ``$NONSTOP_STATE_DIR/lock``.
The one holding the lock is active: it loads ``checkpoint.json``, listens on HOST:PORT and serves
lines ``SET key value`` (answered ``OK`` once the checkpoint holding it is on disk), ``GET key``,
``WHO``. When the active dies the kernel drops its lock, the standby gets it, reloads the
checkpoint and listens on the same address: no VIP moves. The supervisor restarts the dead one,
which becomes the new standby.

Standard library only (it runs in the minimal python image of `nonstop service image build`).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time

STATE = os.environ.get("NONSTOP_STATE_DIR", "/state")
NAME = os.environ.get("INSTANCE", socket.gethostname())
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "7100"))
HEALTH_PORT = int(os.environ.get("HEALTH_PORT", "7101"))

role = "standby"
data: dict[str, str] = {}
lock = threading.Lock()


def log(msg: str) -> None:
    print(f"{time.monotonic():.6f} {NAME}: {msg}", flush=True)


def checkpoint() -> None:
    """Write the whole table atomically: tmp file, fsync, rename (the standby never sees half)."""
    path = os.path.join(STATE, "checkpoint.json")
    tmp = f"{path}.{NAME}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load() -> None:
    try:
        with open(os.path.join(STATE, "checkpoint.json")) as f:
            data.update(json.load(f))
    except FileNotFoundError:
        pass


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for raw in self.rfile:
            parts = raw.decode(errors="replace").split(None, 2)
            if not parts:
                continue
            cmd = parts[0].upper()
            if cmd == "SET" and len(parts) == 3:
                with lock:
                    data[parts[1]] = parts[2].rstrip("\n")
                    checkpoint()
                reply = "OK"
            elif cmd == "GET" and len(parts) >= 2:
                with lock:
                    reply = data.get(parts[1], "")
            elif cmd == "WHO":
                reply = NAME
            else:
                reply = "ERR"
            self.wfile.write(reply.encode() + b"\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def health() -> None:
    srv = socket.create_server(("127.0.0.1", HEALTH_PORT))
    while True:
        c, _ = srv.accept()
        c.sendall(role.encode() + b"\n")
        c.close()


def main() -> None:
    global role
    # As a container's pid 1 the program has no default SIGTERM action: exit on it ourselves.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.makedirs(STATE, exist_ok=True)
    threading.Thread(target=health, daemon=True).start()
    fd = os.open(os.path.join(STATE, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    log("standby: waiting for the lock")
    fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the holder dies
    load()
    server = Server((HOST, PORT), Handler)
    role = "active"
    with open(os.path.join(STATE, "active"), "w") as f:
        f.write(NAME + "\n")
    log(f"active: {len(data)} keys from the checkpoint, serving {HOST}:{PORT}")
    server.serve_forever()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
