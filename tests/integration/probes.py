"""Small programs run inside sandbox namespaces (via `ip netns exec <ns> python -c`)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

# Listen on UDP `port` for up to `seconds` (argv[3] "6": over IPv6); print "<source ip>
# <payload>" per datagram. With argv[4], stop 0.5 s after a datagram with that payload
# arrived (the last one a test sends), so a busy machine gets all the time it needs and an
# idle one no wait.
UDP_LISTENER = """
import socket, sys, time
v6 = sys.argv[3] == "6"
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if v6 else "0.0.0.0", int(sys.argv[1])))
s.settimeout(0.1)
end = time.monotonic() + float(sys.argv[2])
until = sys.argv[4] if len(sys.argv) > 4 else None
print("ready", flush=True)
while time.monotonic() < end:
    try:
        data, addr = s.recvfrom(2048)
    except TimeoutError:
        continue
    text = data.decode(errors="replace")
    print(addr[0], text, flush=True)
    if text == until:
        end = min(end, time.monotonic() + 0.5)
"""

# Send one UDP datagram: argv = dst ip (IPv4 or IPv6), port, payload.
UDP_SEND = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"""

# Craft a VXLAN packet with scapy: argv = outer dst, port, vni, inner dst MAC,
# inner src ip, inner dst ip, inner udp port, payload, count.
VXLAN_SPOOF = """
import sys
from scapy.all import IP, UDP, Ether, Raw, conf, send
from scapy.layers.vxlan import VXLAN
conf.verb = 0
odst, port, vni, dmac, isrc, idst, iport, payload, count = sys.argv[1:10]
pkt = (IP(dst=odst) / UDP(sport=40000, dport=int(port)) / VXLAN(vni=int(vni), flags=0x08)
       / Ether(dst=dmac, src="02:de:ad:be:ef:01") / IP(src=isrc, dst=idst)
       / UDP(sport=5555, dport=int(iport)) / Raw(payload.encode()))
send(pkt, count=int(count), inter=0.05)
"""


# The same over IPv6, outer and inner: argv as VXLAN_SPOOF.
VXLAN_SPOOF6 = """
import sys
from scapy.all import IPv6, UDP, Ether, Raw, conf, send
from scapy.layers.vxlan import VXLAN
conf.verb = 0
odst, port, vni, dmac, isrc, idst, iport, payload, count = sys.argv[1:10]
pkt = (IPv6(dst=odst) / UDP(sport=40000, dport=int(port)) / VXLAN(vni=int(vni), flags=0x08)
       / Ether(dst=dmac, src="02:de:ad:be:ef:01") / IPv6(src=isrc, dst=idst)
       / UDP(sport=5555, dport=int(iport)) / Raw(payload.encode()))
send(pkt, count=int(count), inter=0.05)
"""


def python_in(prefix: Sequence[str], code: str, *args: str, timeout: float = 30
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_listener(prefix: Sequence[str], port: int, seconds: float, family: int = 4,
                   until: str | None = None) -> subprocess.Popen[str]:
    """A UDP listener in a namespace, ready when this returns (see UDP_LISTENER)."""
    extra = [until] if until is not None else []
    p = subprocess.Popen([*prefix, sys.executable, "-c", UDP_LISTENER, str(port), str(seconds),
                          str(family), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", line + (p.stderr.read() if p.stderr else "")
    return p

# Relay raw gRPC requests: one JSON line per request on stdin
# {"method": "/overlay.v1.Membership/Probe", "hex": "..."}; prints one JSON line
# per answer {"code": "OK" | status name}. argv = target host:port.
GRPC_RELAY = """
import json, sys
import grpc
ch = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    call = ch.unary_unary(req["method"], request_serializer=lambda b: b,
                          response_deserializer=lambda b: b)
    try:
        call(bytes.fromhex(req["hex"]), timeout=5)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    print(json.dumps({"code": code}), flush=True)
"""

# Count TCP connections accepted on port argv[1] for argv[2] seconds; print the count.
TCP_COUNTER = """
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
s.settimeout(0.2)
print("ready", flush=True)
n = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        c, _ = s.accept()
        n += 1
        c.close()
    except TimeoutError:
        pass
print(n, flush=True)
"""
