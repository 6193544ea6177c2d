"""DirectRouting on a routed underlay of two segments (issue 14).

Two underlay bridges joined by a router namespace: n1 and n3 on segment 1
(172.30.0.0/16), n2 on segment 2 (172.31.0.0/16). With flannel's
`Backend.DirectRouting`, n1 and n3 route each other's pods over the
underlay without encapsulation, and reach n2 through VXLAN. A capture on
segment 1 shows both. Then n3 moves to segment 2 and both paths switch, its
pods keeping their addresses.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import dump_logs, sandbox_up, wait_until
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from overlay.sandbox.sandbox import Sandbox, sh, tool


@pytest.fixture(scope="module")
def routed() -> Iterator[Sandbox]:
    with sandbox_up(3, 2, segments=2, direct_routing=True) as sb:
        yield sb


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False) and "routed" in request.fixturenames:
        dump_logs(request.getfixturevalue("routed"))


def pod_of(sb: Sandbox, node: str):  # type: ignore[no-untyped-def]
    return next(p for p in sb.st.pods if p.node == node)


def routes(sb: Sandbox, node: str) -> dict[str, tuple[str, str]]:
    """Our routes on a node: destination -> (device, gateway)."""
    out = sb.run_in(sb.node(node).netns, "ip", "-j", "route", "show", "proto", "159").stdout
    return {r["dst"]: (r["dev"], r.get("gateway", "")) for r in json.loads(out or b"[]")}


def peers(sb: Sandbox, node: str) -> dict[str, bool]:
    """Peer name -> reached directly, from the agent's status."""
    return {p.record.name: p.direct for p in sb.status(node).peers}


def capture(sb: Sandbox, bridge: str, pcap, pings) -> list:  # type: ignore[no-untyped-def]
    cap = subprocess.Popen(
        [*sb.exec_prefix(sb.st.underlay), "timeout", "30", "tcpdump", "-i", bridge, "-n", "-U",
         "--immediate-mode", "-w", str(pcap), "icmp or udp port 8472"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stderr is not None and "listening on" in cap.stderr.readline()
        for src, dst in pings:
            assert sb.ping(src.netns, dst.ip, count=4), f"{src.name} -> {dst.name}"
        time.sleep(0.5)
    finally:
        cap.send_signal(2)
        cap.communicate(timeout=10)
    return list(rdpcap(str(pcap)))


def test_two_segments_with_direct_routing_30_of_30(routed):
    assert [(h.name, h.segment) for h in routed.st.nodes] == [("n1", 1), ("n2", 2), ("n3", 1)]
    p = subprocess.run([tool("overlayctl"), "sandbox", "check", "--name", routed.name],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == "connectivity: 30/30 pod pairs reachable"
    assert peers(routed, "n1") == {"n2": False, "n3": True}
    assert peers(routed, "n2") == {"n1": False, "n3": False}
    n3 = routed.status("n3").self
    assert routes(routed, "n1")[n3.subnet] == ("eth0", routed.node("n3").underlay_ip)
    n2 = routed.status("n2").self
    assert routes(routed, "n1")[n2.subnet] == ("overlay.1", n2.subnet.split("/")[0])


def test_same_segment_is_unencapsulated_and_the_other_segment_is_vxlan(routed, tmp_path):
    a, b, c = pod_of(routed, "n1"), pod_of(routed, "n2"), pod_of(routed, "n3")
    packets = capture(routed, "br0", tmp_path / "seg1.pcap", [(a, c), (a, b)])
    plain = [p for p in packets if IP in p and ICMP in p and not p.haslayer(VXLAN)
             and {p[IP].src, p[IP].dst} == {a.ip, c.ip}]
    tunnelled = [p for p in packets if p.haslayer(VXLAN)]
    inner = [p[VXLAN].payload[IP] for p in tunnelled if IP in p[VXLAN].payload
             and ICMP in p[VXLAN].payload]
    assert len(plain) >= 8, f"n1 <-> n3 pod traffic not seen bare on segment 1: {len(plain)}"
    assert not [p for p in tunnelled if {p[IP].src, p[IP].dst} == {
        routed.node("n1").underlay_ip, routed.node("n3").underlay_ip}], "same segment encapsulated"
    assert sum(1 for i in inner if {i.src, i.dst} == {a.ip, b.ip}) >= 8, [
        (p[IP].src, p[IP].dst, p[VXLAN].payload[IP].src, p[VXLAN].payload[IP].dst)
        for p in tunnelled if ICMP in p[VXLAN].payload]
    seg2 = routed.node("n2").underlay_ip
    for p in tunnelled:  # pods' and the membership's: always to or from the other segment
        assert p[UDP].dport == 8472 and seg2 in (p[IP].src, p[IP].dst)
    print(f"\nSCENARIO | DirectRouting | capture on segment 1 | {len(plain)} n1<->n3 pod packets "
          f"bare (same segment), {len(inner)} n1<->n2 pod packets in VXLAN (other segment)")


def test_a_direct_route_deleted_by_hand_comes_back(routed):
    n3 = routed.status("n3").self
    ns = routed.node("n1").netns
    sh("ip", "-n", ns, "route", "del", n3.subnet, "dev", "eth0")
    took = wait_until(lambda: n3.subnet in routes(routed, "n1"), 10)
    assert routes(routed, "n1")[n3.subnet][0] == "eth0"
    print(f"\nSCENARIO | DirectRouting drift | direct route deleted by hand | back after "
          f"{took:.2f}s")


def test_a_node_moving_to_the_other_segment_switches_both_paths_and_keeps_its_pods(routed):
    before = {p.name: (p.ip, p.netns) for p in routed.st.pods}
    n3 = routed.status("n3").self
    routed.move_node("n3", 2)
    moved = routed.node("n3")
    assert moved.underlay_ip == "172.31.1.13"
    wait_until(lambda: routes(routed, "n1").get(n3.subnet, ("",))[0] == "overlay.1"
               and routes(routed, "n2").get(n3.subnet, ("",))[0] == "eth0", 20, 0.2)
    wait_until(lambda: peers(routed, "n2").get("n3") is True
               and peers(routed, "n1").get("n3") is False, 20, 0.2)
    assert routed.status("n3").self.subnet == n3.subnet  # same lease: its pods keep working
    assert {p.name: (p.ip, p.netns) for p in routed.st.pods} == before
    _, ok, total = routed.check()
    assert (ok, total) == (30, 30)
    log = (routed.dir / "logs" / "n1.log").read_text()
    assert "left this node's underlay subnet: through VXLAN" in log
    log2 = (routed.dir / "logs" / "n2.log").read_text()
    assert "now on this node's underlay subnet: direct route" in log2
