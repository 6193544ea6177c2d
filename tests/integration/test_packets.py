"""What crosses the underlay, decoded with scapy (issue 5, scenario 10).

A capture on the sandbox's underlay bridge while pods ping each other:
the outer UDP port and VNI are the configured ones (not the defaults, to
prove it), inner addresses are pod addresses (no NAT between pods), a
full-MTU ping with DF set crosses unfragmented, and no VXLAN packet goes to
a host that is not a member.
"""

from __future__ import annotations

import subprocess
import time

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

VNI, PORT = 42, 4789


def test_vxlan_packets_on_the_underlay(make_sandbox, tmp_path):
    sb = make_sandbox(2, 1, vni=VNI, port=PORT)
    stranger = sb.add_outside_host("stranger")
    p1 = next(p for p in sb.st.pods if p.node == "n1")
    p2 = next(p for p in sb.st.pods if p.node == "n2")
    mtu = sb.status("n1").mtu
    pcap = tmp_path / "underlay.pcap"
    cap = subprocess.Popen(
        [*sb.exec_prefix(sb.st.underlay), "timeout", "30", "tcpdump", "-i", "br0", "-n", "-U",
         "-w", str(pcap), "udp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stderr is not None
        assert "listening on" in cap.stderr.readline()
        assert sb.ping(p1.netns, p2.ip, count=5)
        assert sb.ping(p2.netns, p1.ip, count=3)
        # Largest ICMP payload that fits the pod MTU: 20 (IP) + 8 (ICMP) less.
        assert sb.ping(p1.netns, p2.ip, count=3, size=mtu - 28, dont_fragment=True)
        # One byte more must not fit, and must not be fragmented either.
        assert not sb.ping(p1.netns, p2.ip, count=1, size=mtu - 27, dont_fragment=True)
        time.sleep(0.5)
    finally:
        cap.send_signal(2)
        cap.communicate(timeout=10)
    packets = rdpcap(str(pcap))
    members = {sb.node("n1").underlay_ip, sb.node("n2").underlay_ip}
    pods = {p1.ip, p2.ip}
    vteps = {sb.status(n).self.subnet.split("/")[0] for n in ("n1", "n2")}
    probes = 0
    vxlan = [p for p in packets if p.haslayer(VXLAN)]
    assert len(vxlan) >= 22, f"only {len(vxlan)} VXLAN packets captured"
    assert not [p for p in packets if UDP in p and p[UDP].dport == 8472], "default port used"
    full_size = 0
    for p in vxlan:
        outer = p[IP]
        assert outer[UDP].dport == PORT
        assert p[VXLAN].vni == VNI
        assert outer.dst in members and outer.src in members
        assert outer.dst != stranger.underlay_ip
        assert outer.flags.MF == 0 and outer.frag == 0, "outer packet fragmented"
        inner = p[VXLAN].payload[IP]
        if TCP in inner and 7946 in (inner[TCP].sport, inner[TCP].dport):
            # the membership's tunnel round-trip probe: VTEP to VTEP, gRPC port
            assert inner.src in vteps and inner.dst in vteps, (inner.src, inner.dst)
            probes += 1
            continue
        assert inner.src in pods and inner.dst in pods, (inner.src, inner.dst)
        assert ICMP in inner
        if inner.len == mtu:
            full_size += 1
            if inner[ICMP].type == 8:  # the requests were sent with DF (-M do)
                assert inner.flags.DF
    assert full_size >= 6, "the full-MTU pings (and replies) did not cross"
    print(f"\nSCENARIO | packet checks | capture on the underlay bridge, VNI {VNI} port {PORT} "
          f"| {len(vxlan)} VXLAN packets: port/VNI as configured, inner = pod addresses, "
          f"{full_size} full-MTU ({mtu}) packets unfragmented, none to the non-member host; "
          f"{probes} membership tunnel probes VTEP to VTEP")
