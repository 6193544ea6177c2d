"""An IPv6-only cluster over an IPv6 underlay (issue 14).

Pods have IPv6 addresses only, the hosts' network is IPv6 only (fd30::/64,
no IPv4 address on eth0), etcd and the membership talk IPv6, and VXLAN
travels in IPv6 (70 bytes of overhead). One 3-node x 2-pod sandbox, with a
host outside the cluster on the underlay, serves the module.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest
from conftest import dump_logs, sandbox_up, wait_until
from probes import UDP_SEND, VXLAN_SPOOF6, python_in, start_listener
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from overlay.sandbox.sandbox import Sandbox, sh, tool

ECHO = str(Path(__file__).with_name("udp_echo.py"))
PORT = 5598


@pytest.fixture(scope="module")
def v6() -> Iterator[Sandbox]:
    with sandbox_up(3, 2, ip_family="ipv6", underlay_family=6) as sb:
        sb.add_outside_host("outside")
        yield sb


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False) and "v6" in request.fixturenames:
        dump_logs(request.getfixturevalue("v6"))


def test_ipv6_only_over_an_ipv6_underlay_30_of_30(v6):
    p = subprocess.run([tool("overlayctl"), "sandbox", "check", "--name", v6.name],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1] == "connectivity: 30/30 pod pairs reachable"
    eth0 = v6.run_in(v6.node("n1").netns, "ip", "-4", "addr", "show", "eth0").stdout.decode()
    assert "inet " not in eth0, "the underlay must be IPv6 only"
    st = v6.status("n1")
    assert st.self.underlay_ip.startswith("fd30::") and st.self.subnet == ""
    assert st.mtu == 1500 - 70
    assert all(":" in p.ip and p.ip == p.ip6 for p in v6.st.pods)
    assert v6.etcd_endpoints().startswith("http://[fd30::")


def test_status_and_watch_show_the_ipv6_subnet_of_each_node(v6):
    want = {n.name: v6.status(n.name).self.subnet6 for n in v6.st.nodes}
    assert all(ip_network(s).version == 6 for s in want.values()), want

    def rows(*args: str) -> list[list[str]]:
        p = subprocess.run([tool("overlayctl"), "sandbox", *args, "--name", v6.name],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return [re.split(r"\s{2,}", line) for line in p.stdout.splitlines()]

    status = [r[:4] for r in rows("status")]
    for name, subnet in want.items():
        assert [name, v6.node(name).netns, v6.node(name).underlay_ip, subnet] in status, status
    # One frame where every agent answered (it has 1 s to, which a busy machine may miss).
    want_rows = [[name, "running", "yes", subnet] for name, subnet in want.items()]
    frames: list[list[list[str]]] = []

    def a_full_frame() -> bool:
        frames.append([r[:4] for r in rows("watch", "--count", "1")])
        return all(r in frames[-1] for r in want_rows)

    with contextlib.suppress(AssertionError):
        wait_until(a_full_frame, 30, 0.5)
    assert all(r in frames[-1] for r in want_rows), frames[-1]


def test_nodes_and_pods_reach_each_other(v6):
    bad = []
    for node in v6.st.nodes:
        for pod in v6.st.pods:
            if not (v6.ping(node.netns, pod.ip6) or v6.ping(node.netns, pod.ip6)):
                bad.append(f"{node.name} -> {pod.name}")
            if not (v6.ping(pod.netns, node.underlay_ip) or v6.ping(pod.netns, node.underlay_ip)):
                bad.append(f"{pod.name} -> {node.name}")
    assert not bad, f"unreachable: {bad}"


def test_ipv6_in_ipv6_on_the_wire_with_70_bytes_of_overhead(v6, tmp_path):
    p1 = next(p for p in v6.st.pods if p.node == "n1")
    p2 = next(p for p in v6.st.pods if p.node == "n2")
    mtu = v6.status("n1").mtu
    pcap = tmp_path / "underlay6.pcap"
    cap = subprocess.Popen(
        [*v6.exec_prefix(v6.st.underlay), "timeout", "30", "tcpdump", "-i", "br0", "-n", "-U",
         "--immediate-mode", "-w", str(pcap), "ip6 and udp port 8472"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stderr is not None and "listening on" in cap.stderr.readline()
        assert v6.ping(p1.netns, p2.ip6, count=3)
        assert v6.ping(p1.netns, p2.ip6, count=3, size=mtu - 48, dont_fragment=True)
        assert not v6.ping(p1.netns, p2.ip6, count=1, size=mtu - 47, dont_fragment=True)
        time.sleep(0.5)
    finally:
        cap.send_signal(2)
        cap.communicate(timeout=10)
    members = {v6.node(n).underlay_ip for n in ("n1", "n2", "n3")}
    vxlan = [p for p in rdpcap(str(pcap)) if p.haslayer(VXLAN)]
    echoes = [p for p in vxlan if p[VXLAN].payload.haslayer(ICMPv6EchoRequest)
              or p[VXLAN].payload.haslayer(ICMPv6EchoReply)]
    assert len(echoes) >= 12, f"only {len(echoes)} echoes in VXLAN over IPv6"
    full = 0
    for p in echoes:
        outer = p[IPv6]
        assert outer.src in members and outer.dst in members and p[UDP].dport == 8472
        assert outer.nh == 17, "the outer packet must not carry a fragment header"
        inner = p[VXLAN].payload[IPv6]
        assert {inner.src, inner.dst} == {p1.ip6, p2.ip6}
        if inner.plen + 40 == mtu:
            full += 1
            assert outer.plen + 40 == 1500, "a full pod packet fills the underlay MTU exactly"
    assert full >= 6
    print(f"\nSCENARIO | packet checks | IPv6 pods over an IPv6 underlay | {len(echoes)} "
          f"echoes in VXLAN over IPv6; pod MTU {mtu} = 1500 - 70; {full} full-size packets "
          "unfragmented")


def test_a_strangers_ipv6_vxlan_is_dropped_and_members_pass(v6):
    stranger = v6.st.others[0]
    target = next(p for p in v6.st.pods if p.node == "n1")
    src = next(p for p in v6.st.pods if p.node == "n2")
    node = v6.node("n1")
    mac = v6.status("n1").self.vtep_mac
    listener = start_listener(v6.exec_prefix(target.netns), 9997, 30, family=6,
                              until="member")
    try:
        spoof = python_in(v6.exec_prefix(stranger.netns), VXLAN_SPOOF6, node.underlay_ip, "8472",
                          "1", mac, src.ip6, target.ip6, "9997", "spoofed", "5")
        assert spoof.returncode == 0, spoof.stderr
        member = python_in(v6.exec_prefix(src.netns), UDP_SEND, target.ip6, "9997", "member")
        assert member.returncode == 0, member.stderr
        out, _ = listener.communicate(timeout=40)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.communicate()
    got = [line.split(" ", 1) for line in out.splitlines() if line.strip()]
    assert [src.ip6, "member"] in got, got
    assert not any(payload == "spoofed" for _, payload in got), got
    rules = v6.run_in(node.netns, "nft", "list", "table", "ip6", "overlay_vxlan").stdout.decode()
    assert int(rules.split("counter packets", 1)[1].split()[0]) >= 5, rules
    assert v6.node("n2").underlay_ip in rules and stranger.underlay_ip not in rules


def test_an_ipv6_fdb_entry_deleted_by_hand_comes_back(v6):
    ns = v6.node("n1").netns
    peer = v6.status("n2").self

    def fdb() -> set[tuple[str, str]]:
        rows = json.loads(v6.run_in(ns, "bridge", "-j", "fdb", "show", "dev", "overlay.1")
                          .stdout or b"[]")
        return {(r["mac"], r.get("dst", "")) for r in rows if r.get("dst")}

    assert (peer.vtep_mac, peer.underlay_ip) in fdb()
    sh("ip", "netns", "exec", ns, "bridge", "fdb", "del", peer.vtep_mac, "dev", "overlay.1",
       "dst", peer.underlay_ip)
    took = wait_until(lambda: (peer.vtep_mac, peer.underlay_ip) in fdb(), 10)
    assert v6.check(family=6)[1:] == (30, 30)
    print(f"\nSCENARIO | IPv6 drift | FDB entry with an IPv6 remote deleted by hand | back "
          f"after {took:.2f}s")


@contextlib.contextmanager
def echo_server6(sb: Sandbox, netns: str) -> Iterator[None]:
    p = subprocess.Popen([*sb.exec_prefix(netns), sys.executable, ECHO, "serve", str(PORT), "60",
                          "6"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        yield
    finally:
        p.terminate()
        p.communicate(timeout=10)


def seen_as(sb: Sandbox, netns: str, host: str) -> str:
    p = sb.run_in(netns, sys.executable, ECHO, "ask", host, str(PORT), check=False, timeout=30)
    assert p.returncode == 0, f"no answer from {host}: {p.stderr.decode()}"
    return p.stdout.decode().strip()


def test_ipv6_egress_is_masqueraded_to_the_node_and_pods_are_not(v6):
    outside = v6.st.others[0]
    pod = next(p for p in v6.st.pods if p.node == "n1")
    other = next(p for p in v6.st.pods if p.node == "n2")
    v6.stop_agent("n1")
    v6.start_agent("n1", ["--ip-masq"])
    v6.wait_ready("n1", 30)
    try:
        table = v6.run_in(v6.node("n1").netns, "nft", "list", "table", "ip6", "overlay")
        subnet = v6.status("n1").self.subnet6
        assert f"ip6 saddr {subnet} ip6 daddr != fd00:10:244::/56 masquerade" in \
            table.stdout.decode()
        with echo_server6(v6, outside.netns):
            assert seen_as(v6, pod.netns, outside.underlay_ip) == v6.node("n1").underlay_ip
        with echo_server6(v6, other.netns):
            assert seen_as(v6, pod.netns, other.ip6) == pod.ip6
    finally:
        v6.stop_agent("n1")
        v6.start_agent("n1")
        v6.wait_ready("n1", 30)
    gone = v6.run_in(v6.node("n1").netns, "nft", "list", "table", "ip6", "overlay", check=False)
    assert gone.returncode != 0, "the ip6 overlay table outlived --ip-masq"
