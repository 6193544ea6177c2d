"""Egress masquerading (overlayd --ip-masq, CNI ipMasq) seen from the far end.

A host "outside" the cluster sits on the underlay (it has no route to the pod
network). A pod reaches it only through masquerading, and then the outside
host sees the node's underlay address; pods talking to each other still see
each other's pod addresses. The nftables table goes away when overlayd stops.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sandbox_up

from overlay.sandbox.runtime import NetworkList
from overlay.sandbox.sandbox import Sandbox

ECHO = str(Path(__file__).with_name("udp_echo.py"))
PORT = 5599


@pytest.fixture(scope="module")
def masq_sb() -> Iterator[Sandbox]:
    """2 nodes x 2 pods with --ip-masq, plus an outside host on the underlay."""
    with sandbox_up(2, 2) as sb:
        for node in ("n1", "n2"):
            sb.stop_agent(node)
            sb.start_agent(node, ["--ip-masq"])
            sb.wait_ready(node, 30)
        sb.add_outside_host()
        yield sb


@contextlib.contextmanager
def echo_server(sb: Sandbox, netns: str, seconds: float = 60) -> Iterator[None]:
    p = subprocess.Popen([*sb.exec_prefix(netns), sys.executable, ECHO, "serve", str(PORT),
                          str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line == "listening", line + (p.stdout.read() if p.poll() is not None else "")
        yield
    finally:
        p.terminate()
        p.communicate(timeout=10)


def seen_as(sb: Sandbox, netns: str, host: str) -> str:
    """The source address `host`'s echo server saw for a datagram from `netns`."""
    p = sb.run_in(netns, sys.executable, ECHO, "ask", host, str(PORT), check=False, timeout=30)
    assert p.returncode == 0, f"no answer from {host}: {p.stderr.decode()}"
    return p.stdout.decode().strip()


def test_pods_reach_the_outside_host_as_their_node(masq_sb):
    sb = masq_sb
    outside = sb.st.others[0]
    with echo_server(sb, outside.netns):
        for pod in sb.st.pods:
            node = sb.node(pod.node)
            assert seen_as(sb, pod.netns, outside.underlay_ip) == node.underlay_ip, pod.name


def test_pod_to_pod_is_never_masqueraded(masq_sb):
    sb = masq_sb
    a = next(p for p in sb.st.pods if p.node == "n1")
    same = next(p for p in sb.st.pods if p.node == "n1" and p is not a)
    other = next(p for p in sb.st.pods if p.node == "n2")
    with echo_server(sb, other.netns):
        assert seen_as(sb, a.netns, other.ip) == a.ip  # across the tunnel
    with echo_server(sb, same.netns):
        assert seen_as(sb, a.netns, same.ip) == a.ip  # on the same bridge


def nft_table(sb: Sandbox, node: str) -> str | None:
    p = sb.run_in(sb.node(node).netns, "nft", "list", "table", "ip", "overlay", check=False)
    return p.stdout.decode() if p.returncode == 0 else None


def test_table_removed_on_stop_and_ipmasq_per_pod(masq_sb):
    """Without --ip-masq nothing leaves (no route back: the control); a pod whose
    CNI config sets ipMasq is masqueraded alone, until it is deleted."""
    sb = masq_sb
    outside = sb.st.others[0]
    sb.stop_agent("n2")
    try:
        assert nft_table(sb, "n2") is None, "the nftables table outlived overlayd"
        sb.start_agent("n2")  # without --ip-masq
        sb.wait_ready("n2", 30)
        assert nft_table(sb, "n2") is None
        plain = next(p for p in sb.st.pods if p.node == "n2")
        conf = json.loads(sb.conflist_path("n2").read_text())
        conf["plugins"][0]["ipMasq"] = True
        net = NetworkList(conf, sb.cni_path(), prefix=sb.exec_prefix(sb.node("n2").netns))
        ns = sb.ns("n2-masq")
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        res = net.add("masq-pod", f"/run/netns/{ns}")
        ip = res["ips"][0]["address"].split("/")[0]
        try:
            table = nft_table(sb, "n2")
            assert table is not None and ip in table
            with echo_server(sb, outside.netns):
                assert seen_as(sb, ns, outside.underlay_ip) == sb.node("n2").underlay_ip
                q = sb.run_in(plain.netns, sys.executable, ECHO, "ask", outside.underlay_ip,
                              str(PORT), check=False, timeout=30)
                assert q.returncode != 0, f"answered without masquerading: {q.stdout!r}"
        finally:
            net.delete("masq-pod", f"/run/netns/{ns}", result=res)
            subprocess.run(["ip", "netns", "del", ns], check=False)
        table = nft_table(sb, "n2")
        assert table is not None and ip not in table
    finally:
        sb.stop_agent("n2")
        sb.start_agent("n2", ["--ip-masq"])
        sb.wait_ready("n2", 30)
    table = nft_table(sb, "n2")
    subnet = sb.status("n2").self.subnet
    assert table is not None and f"ip saddr {subnet} ip daddr != 10.244.0.0/16 masquerade" \
        in table


def test_nodes_reach_every_pod_and_pods_reach_every_node(masq_sb):
    """The Kubernetes model: host <-> pod in both directions, across nodes too."""
    sb = masq_sb
    bad = []
    for node in sb.st.nodes:
        for pod in sb.st.pods:
            if not (sb.ping(node.netns, pod.ip) or sb.ping(node.netns, pod.ip)):
                bad.append(f"{node.name} -> {pod.name}")
            if not (sb.ping(pod.netns, node.underlay_ip) or sb.ping(pod.netns, node.underlay_ip)):
                bad.append(f"{pod.name} -> {node.name}")
    assert not bad, f"unreachable: {bad}"
