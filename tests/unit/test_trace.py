"""`overlayctl trace`: decoding captured frames (pure, no capture)."""

from __future__ import annotations

from ipaddress import IPv4Address

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from overlay.ctl.trace import describe, summary

A, B = IPv4Address("10.244.1.2"), IPv4Address("10.244.2.2")


def vxlan(inner: IP, port: int = 8472, vni: int = 1) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:11", dst="02:00:00:00:00:12")
                 / IP(src="172.30.1.11", dst="172.30.1.12", ttl=64)
                 / UDP(sport=40000, dport=port) / VXLAN(vni=vni)
                 / Ether(src="02:00:00:00:01:01", dst="02:00:00:00:02:02") / inner)


def test_vxlan_echo_request_outer_and_inner():
    s = describe(vxlan(IP(src=str(A), dst=str(B), ttl=63) / ICMP(type=8, id=7, seq=3)), A, B)
    assert s is not None and s.direction == "a>b" and s.vni == 1
    assert s.outer is not None
    assert (s.outer.ip_src, s.outer.ip_dst, s.outer.detail) == ("172.30.1.11", "172.30.1.12",
                                                                "40000 > 8472")
    assert (s.inner.eth_src, s.inner.eth_dst) == ("02:00:00:00:01:01", "02:00:00:00:02:02")
    assert (s.inner.ip_src, s.inner.ttl, s.inner.proto, s.inner.detail) == (
        str(A), 63, "icmp", "echo-request id 7 seq 3")
    text = s.text(1, 0.0)
    assert text.splitlines()[0] == f"#1 +0.000s {A} > {B} VXLAN vni 1"
    assert "outer  eth 02:00:00:00:00:11 > 02:00:00:00:00:12  ip 172.30.1.11 > 172.30.1.12" \
        in text
    assert "inner  eth 02:00:00:00:01:01 > 02:00:00:00:02:02  ip 10.244.1.2 > 10.244.2.2 " \
        "ttl 63 len 28  icmp echo-request id 7 seq 3" in text


def test_reply_direction_tcp_and_other_ports():
    s = describe(vxlan(IP(src=str(B), dst=str(A)) / TCP(sport=80, dport=5000, flags="SA",
                                                        seq=9), port=4789, vni=42), A, B,
                 port=4789)
    assert s is not None and s.direction == "b>a" and s.vni == 42
    assert (s.inner.proto, s.inner.detail) == ("tcp", "80 > 5000 [SA] seq 9")


def test_unrelated_packets_are_ignored():
    other = IPv4Address("10.244.3.3")
    assert describe(vxlan(IP(src=str(A), dst=str(other)) / ICMP()), A, B) is None
    assert describe(vxlan(IP(src=str(A), dst=str(B)) / ICMP(), port=4789), A, B) is None
    assert describe(bytes(Ether() / IP(src="172.30.1.11", dst="172.30.0.11") / UDP(dport=2379)),
                    A, B) is None


def test_plain_packets_between_the_pods_on_a_bridge():
    s = describe(bytes(Ether() / IP(src=str(A), dst=str(B)) / UDP(sport=1, dport=2)), A, B)
    assert s is not None and s.outer is None and s.vni is None
    assert s.text(2, 0.0).splitlines()[0].endswith("(not encapsulated)")


def test_summary_says_where_it_stops():
    s = describe(vxlan(IP(src=str(A), dst=str(B)) / ICMP(type=8)), A, B)
    assert s is not None
    lines = summary([s, s], A, B)
    assert lines[0] == f"2 packets: {A} > {B}: 2, {B} > {A}: 0"
    assert lines[1].startswith(f"nothing came back from {B}")
    assert summary([], A, B) == [f"0 packets: {A} > {B}: 0, {B} > {A}: 0"]


def test_ipv6_pods_over_ipv4_and_over_ipv6_underlays():
    from ipaddress import IPv6Address

    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    a6, b6 = IPv6Address("fd00:0:0:1::2"), IPv6Address("fd00:0:0:2::2")
    inner = (Ether(src="02:00:00:00:01:01", dst="02:00:00:00:02:02")
             / IPv6(src=str(a6), dst=str(b6), hlim=63) / ICMPv6EchoRequest(id=5, seq=2))
    for outer in (IP(src="172.30.1.11", dst="172.30.1.12"),
                  IPv6(src="fd30::1:11", dst="fd30::1:12")):
        frame = bytes(Ether() / outer / UDP(sport=4000, dport=8472) / VXLAN(vni=1) / inner)
        s = describe(frame, a6, b6)
        assert s is not None and s.outer is not None and s.direction == "a>b"
        assert s.outer.ip_src == outer.src
        assert (s.inner.proto, s.inner.detail, s.inner.ttl, s.inner.length) == (
            "icmp6", "echo-request id 5 seq 2", 63, 48)
    plain = describe(bytes(inner), a6, b6)  # on cni0, or direct-routed on the underlay
    assert plain is not None and plain.outer is None
