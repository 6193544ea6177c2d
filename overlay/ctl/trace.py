"""`overlayctl trace <pod-ip> <pod-ip>`: watch the packets between two pods.

Captures with scapy on an interface (the sandbox's underlay bridge, a node's
underlay interface, a bridge or a veth), keeps the VXLAN packets whose inner
IPv4 or IPv6 header is between the two pods (either direction, over an IPv4
or an IPv6 underlay) and the plain packets between them (on cni0, a pod's
veth, or the underlay with DirectRouting), and prints the outer and the
inner headers of each. Comparing the captures at two points shows where a packet
is lost: a request on the underlay with no reply means the far node dropped
or misrouted it. Bounded by a packet count and a time limit.

The decoding (`describe`) is pure: it takes the bytes of one frame.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, TextIO

from overlay import cli
from overlay.ctl import flags
from overlay.errors import ConfigError, OverlayError

ICMP_TYPES = {0: "echo-reply", 3: "dest-unreachable", 8: "echo-request", 11: "time-exceeded"}
ICMP6_TYPES = {1: "dest-unreachable", 2: "packet-too-big", 3: "time-exceeded",
               128: "echo-request", 129: "echo-reply", 135: "neighbor-solicit",
               136: "neighbor-advert"}
TCP_FLAGS = "FSRPAUEC"
_INSIDE = "OVERLAYCTL_TRACE_NETNS"  # set once re-executed inside the namespace


@dataclass(frozen=True)
class Headers:
    """One layer's Ethernet + IPv4/IPv6 (+ UDP/TCP/ICMP) headers, as text fields
    (`ttl`: the hop limit for IPv6, `length`: the whole packet's)."""

    eth_src: str
    eth_dst: str
    ip_src: str
    ip_dst: str
    ttl: int
    length: int
    proto: str
    detail: str = ""

    def line(self) -> str:
        d = f" {self.detail}" if self.detail else ""
        return (f"eth {self.eth_src} > {self.eth_dst}  ip {self.ip_src} > {self.ip_dst} "
                f"ttl {self.ttl} len {self.length}  {self.proto}{d}")


@dataclass(frozen=True)
class Seen:
    """One captured packet between the two pods."""

    time: float
    direction: str  # "a>b" or "b>a"
    inner: Headers
    outer: Headers | None = None  # None: not encapsulated (captured on cni0 or a veth)
    vni: int | None = None

    def text(self, n: int, t0: float) -> str:
        head = f"#{n} +{self.time - t0:.3f}s {self.inner.ip_src} > {self.inner.ip_dst}"
        if self.outer is None:
            return f"{head} (not encapsulated)\n   inner  {self.inner.line()}"
        return (f"{head} VXLAN vni {self.vni}\n   outer  {self.outer.line()}\n"
                f"   inner  {self.inner.line()}")


def _l4(ip: Any) -> tuple[str, str]:
    from scapy.layers.inet import ICMP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    if isinstance(ip, IPv6) and int(ip.nh) == 58:
        raw = bytes(ip.payload)
        kind = raw[0] if raw else -1
        name = ICMP6_TYPES.get(kind, f"type {kind}")
        if kind in (128, 129) and len(raw) >= 8:
            return "icmp6", (f"{name} id {int.from_bytes(raw[4:6], 'big')} seq "
                             f"{int.from_bytes(raw[6:8], 'big')}")
        return "icmp6", name
    if ip.haslayer(ICMP) and ip[ICMP].underlayer is ip:
        ic = ip[ICMP]
        name = ICMP_TYPES.get(int(ic.type), f"type {ic.type}")
        if int(ic.type) in (0, 8):
            return "icmp", f"{name} id {ic.id} seq {ic.seq}"
        return "icmp", f"{name} code {ic.code}"
    if ip.haslayer(TCP) and ip[TCP].underlayer is ip:
        t = ip[TCP]
        flags = "".join(f for i, f in enumerate(TCP_FLAGS) if int(t.flags) & (1 << i))
        return "tcp", f"{t.sport} > {t.dport} [{flags}] seq {t.seq}"
    if ip.haslayer(UDP) and ip[UDP].underlayer is ip:
        u = ip[UDP]
        return "udp", f"{u.sport} > {u.dport}"
    return f"proto {ip.nh if isinstance(ip, IPv6) else ip.proto}", ""


def _headers(eth: Any, ip: Any, detail_override: str | None = None) -> Headers:
    from scapy.layers.inet6 import IPv6

    proto, detail = _l4(ip)
    if detail_override is not None:
        proto, detail = "udp", detail_override
    v6 = isinstance(ip, IPv6)
    return Headers(eth_src=eth.src if eth is not None else "-",
                   eth_dst=eth.dst if eth is not None else "-",
                   ip_src=ip.src, ip_dst=ip.dst, ttl=int(ip.hlim if v6 else ip.ttl),
                   length=int(ip.plen) + 40 if v6 else int(ip.len),
                   proto=proto, detail=detail)


def _ip(eth: Any) -> Any:
    """The IPv4 or IPv6 header an Ethernet frame carries, or None."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    return eth.payload if isinstance(eth.payload, IP | IPv6) else None


def describe(frame: bytes, a: IPv4Address | IPv6Address, b: IPv4Address | IPv6Address,
             port: int = 8472, when: float = 0.0) -> Seen | None:
    """The headers of `frame` if it carries a packet between pods `a` and `b`."""
    from scapy.layers.inet import UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    eth = Ether(frame)
    outer_ip = _ip(eth)
    if outer_ip is None:
        return None
    pair = {str(a), str(b)}

    def direction(ip: Any) -> str | None:
        if {ip.src, ip.dst} != pair:
            return None
        return "a>b" if ip.src == str(a) else "b>a"

    if outer_ip.haslayer(UDP) and outer_ip[UDP].underlayer is outer_ip \
            and int(outer_ip[UDP].dport) == port:
        udp = outer_ip[UDP]
        vx = VXLAN(bytes(udp.payload))
        inner_eth = vx.payload
        inner_ip = _ip(inner_eth) if isinstance(inner_eth, Ether) else None
        if inner_ip is None:
            return None
        d = direction(inner_ip)
        if d is None:
            return None
        outer = _headers(eth, outer_ip, f"{udp.sport} > {udp.dport}")
        return Seen(when, d, _headers(inner_eth, inner_ip), outer, int(vx.vni))
    d = direction(outer_ip)
    if d is None:
        return None
    return Seen(when, d, _headers(eth, outer_ip))


def summary(seen: list[Seen], a: IPv4Address | IPv6Address,
            b: IPv4Address | IPv6Address) -> list[str]:
    ab = sum(1 for s in seen if s.direction == "a>b")
    ba = len(seen) - ab
    lines = [f"{len(seen)} packets: {a} > {b}: {ab}, {b} > {a}: {ba}"]
    if ab and not ba:
        lines.append(f"nothing came back from {b}: the packets to it are lost after this "
                     f"point, or its replies take another path")
    elif ba and not ab:
        lines.append(f"nothing went from {a} to {b} here: check the path from {a}")
    return lines


# --- the capturing shell ----------------------------------------------------


def enter_netns(name: str) -> int | None:
    """Run this command again inside network namespace `name`, through `ip netns exec`
    (which also mounts that namespace's /sys, where scapy reads interface types), and
    return its exit status; None when already inside."""
    if os.environ.get(_INSIDE) == name:
        return None
    if not name or "/" in name or name in (".", "..") or name.startswith("-") \
            or not os.path.exists(f"/run/netns/{name}"):
        raise ConfigError("--netns", f"no network namespace {name!r} (see `ip netns list`)")
    argv = ["ip", "netns", "exec", name, sys.executable, "-c",
            "import sys; from overlay.ctl.main import main; sys.exit(main(sys.argv[1:]))",
            *sys.argv[1:]]
    # Ctrl-C reaches both processes: the one inside reports it, this one waits for it.
    # (A handler, not SIG_IGN, which the child would inherit.)
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = subprocess.call(argv, env={**os.environ, _INSIDE: name})
    except OSError as exc:
        raise OverlayError(f"cannot run `ip netns exec {name}`: {exc}") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if code == 255:  # ip's own failure; it said why on stderr
        raise OverlayError(f"cannot enter network namespace {name!r}")
    return 128 - code if code < 0 else code


def where(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(netns, iface) to capture on."""
    if args.name:
        from overlay.sandbox.sandbox import Sandbox

        sb = Sandbox(args.name)
        if sb.state is None:
            raise ConfigError("--name", f"no sandbox named {args.name!r} is up")
        return args.netns or sb.st.underlay, args.iface or "br0"
    return args.netns, args.iface


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        a, b = ip_address(args.a), ip_address(args.b)
    except ValueError as exc:
        raise ConfigError("POD_IP", str(exc)) from None
    if a.version != b.version:
        raise ConfigError("POD_IP", f"{a} and {b} are of different families")
    netns, iface = where(args)
    if netns:
        code = enter_netns(netns)
        if code is not None:
            return code
    import scapy.layers.l2  # noqa: F401  (registers Ethernet, for the capture socket's type)
    from scapy.config import conf
    from scapy.error import Scapy_Exception
    from scapy.sendrecv import sniff

    iface = iface or str(conf.iface)
    bpf = f"(udp dst port {args.port}) or (host {a} and host {b})"
    seen: list[Seen] = []
    t0 = time.time()

    def on_packet(pkt: Any) -> None:
        s = describe(bytes(pkt), a, b, args.port, float(pkt.time))
        if s is None or len(seen) >= args.count:
            return
        seen.append(s)
        if args.json:
            print(json.dumps(asdict(s)), file=out, flush=True)
        else:
            print(s.text(len(seen), t0), file=out, flush=True)

    def started() -> None:
        print(f"capturing on {iface}{f' in {netns}' if netns else ''}: packets between {a} "
              f"and {b} (VXLAN port {args.port}), up to {args.count} or {args.timeout:g}s",
              file=sys.stderr, flush=True)

    interrupted = False
    try:
        sniff(iface=iface, filter=bpf, prn=on_packet, store=False, timeout=args.timeout,
              started_callback=started, stop_filter=lambda _: len(seen) >= args.count,
              chainCC=True)
    except KeyboardInterrupt:  # Ctrl-C ends the capture; what was seen is still worth saying
        interrupted = True
    except (OSError, ValueError, Scapy_Exception) as exc:  # no such interface, no tcpdump
        raise OverlayError(f"cannot capture on {iface}: {exc}") from None
    if not args.json:
        for line in summary(seen, a, b):
            print(line, file=out)
    if interrupted:
        raise KeyboardInterrupt
    if not seen:
        print(f"overlayctl: no packet between {a} and {b} seen on {iface} in "
              f"{args.timeout:g}s", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    t = sub.add_parser(
        "trace", help="show the packets between two pods (outer and inner headers)",
        description="Capture the packets between two pod addresses and print each one's "
        "outer (underlay, VXLAN) and inner (pod) headers, to see where traffic is lost. "
        "Captures on the sandbox's underlay with --name, else on --iface (default: the "
        "interface of the default route), optionally inside network namespace --netns. "
        "Needs root. Stops after --count packets or --timeout seconds; exits 1 if none "
        "was seen.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("a", metavar="POD_IP", help="one pod's address")
    t.add_argument("b", metavar="POD_IP", help="the other pod's address")
    flags.add_sandbox_name(t, default=None, help="capture on the underlay bridge of this "
                           "sandbox")
    t.add_argument("--iface", help="interface to capture on (e.g. eth0, cni0, overlay.1)")
    t.add_argument("--netns", help="network namespace to capture in (a name that "
                   "`ip netns list` shows)")
    t.add_argument("--port", type=cli.port, default=8472,
                   help="VXLAN UDP port (default: %(default)s)")
    t.add_argument("--count", type=cli.int_range(1), default=20,
                   help="stop after this many packets (default: %(default)s)")
    t.add_argument("--timeout", type=cli.seconds, default=10.0,
                   help="stop after this many seconds (default: %(default)s)")
    t.add_argument("--json", action="store_true", help="one JSON object per packet")
