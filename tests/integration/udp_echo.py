"""A tiny UDP echo that tells each client the source address it saw.

  server: python udp_echo.py serve PORT SECONDS [6]  (prints "listening", exits after SECONDS;
                                                     6: over IPv6)
  client: python udp_echo.py ask HOST PORT            (prints the address the server saw)

Run inside namespaces with `ip netns exec`: the tests learn whether a packet
was masqueraded from what the far end reports, not from the rules.
"""

from __future__ import annotations

import socket
import sys
import time


def serve(port: int, seconds: float, family: int = 4) -> None:
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("::" if family == 6 else "0.0.0.0", port))
    s.settimeout(0.2)
    print("listening", flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            _data, peer = s.recvfrom(2048)
        except TimeoutError:
            continue
        s.sendto(peer[0].encode(), peer)
    s.close()


def ask(host: str, port: int, tries: int = 5) -> int:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        for _ in range(tries):
            s.sendto(b"who am i", (host, port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            print(data.decode())
            return 0
    finally:
        s.close()
    print("no answer", file=sys.stderr)
    return 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    else:
        sys.exit(ask(sys.argv[2], int(sys.argv[3])))
