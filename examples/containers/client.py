"""Send one command line to the kv service and print the answer: client.py HOST PORT SET k v"""

import socket
import sys

host, port, *words = sys.argv[1:]
with socket.create_connection((host, int(port)), timeout=2) as s:
    s.sendall(" ".join(words).encode() + b"\n")
    print(s.makefile().readline().strip())
