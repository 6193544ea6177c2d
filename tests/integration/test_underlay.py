"""Underlay choice (--iface, --iface-regex, --public-ip) and the MTU derived from it.

The sandbox's underlay here has jumbo frames (MTU 9000), so the overlay MTU
is 8950 (the 50-byte VXLAN overhead of an IPv4 underlay) and an 8922-byte
ping with Don't Fragment crosses the tunnel intact.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sandbox_up, wait_until

from overlay.sandbox.sandbox import Sandbox, tool


@pytest.fixture(scope="module")
def jumbo() -> Iterator[Sandbox]:
    with sandbox_up(2, 1, underlay_mtu=9000) as sb:
        yield sb


def mtu(sb: Sandbox, netns: str, dev: str) -> int:
    out = sb.run_in(netns, "ip", "-j", "link", "show", dev).stdout
    return int(json.loads(out)[0]["mtu"])


def restart(sb: Sandbox, node: str, args: list[str]) -> None:
    sb.stop_agent(node)
    sb.start_agent(node, args)
    sb.wait_ready(node, 30)


def test_mtu_is_the_underlay_mtu_minus_50_and_jumbo_pings_cross(jumbo):
    sb = jumbo
    a = next(p for p in sb.st.pods if p.node == "n1")
    b = next(p for p in sb.st.pods if p.node == "n2")
    for node in ("n1", "n2"):
        ns = sb.node(node).netns
        assert mtu(sb, ns, "eth0") == 9000
        assert mtu(sb, ns, "overlay.1") == 8950 and mtu(sb, ns, "cni0") == 8950
        assert sb.status(node).mtu == 8950
    assert mtu(sb, a.netns, "eth0") == 8950
    # 8922 + 8 (ICMP) + 20 (IP) = 8950: the largest packet, unfragmented, both ways.
    assert sb.ping(a.netns, b.ip, size=8922, dont_fragment=True)
    assert sb.ping(b.netns, a.ip, size=8922, dont_fragment=True)
    assert not sb.ping(a.netns, b.ip, size=8923, dont_fragment=True)


def test_mtu_flag_overrides_the_derived_mtu(jumbo):
    sb = jumbo
    ns = sb.node("n1").netns
    restart(sb, "n1", ["--mtu", "1400"])
    try:
        wait_until(lambda: mtu(sb, ns, "overlay.1") == 1400 and mtu(sb, ns, "cni0") == 1400,
                   timeout=30)
        assert sb.status("n1").mtu == 1400
    finally:
        restart(sb, "n1", [])
    wait_until(lambda: mtu(sb, ns, "overlay.1") == 8950, timeout=30)


@pytest.mark.parametrize("flag, value, says", [
    ("--iface", "nope0", "no interface named 'nope0' here (have: cni0, eth0, lo, "),
    ("--iface-regex", "^wlan", "no interface with an IP address matches '^wlan'"),
    ("--public-ip", "192.0.2.1", "192.0.2.1 is not an address of this host"),
])
def test_a_wrong_underlay_is_a_one_line_error_and_exit_2(jumbo, tmp_path, flag, value, says):
    """Even with etcd unreachable: the underlay is checked first."""
    sb = jumbo
    cmd = [tool("overlayd"), "--node-name", "probe", "--etcd-endpoints", "http://127.0.0.1:9",
           "--run-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state"),
           flag, value]
    p = subprocess.run([*sb.exec_prefix(sb.node("n1").netns), *cmd], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, p.stderr
    assert f" ERROR   overlayd: invalid configuration: {flag}: {says}" in errors[0], errors[0]
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_iface_regex_and_public_ip_choose_the_underlay(jumbo):
    """n2 gets a second interface that holds the default route: without flags the
    agent takes it; --iface-regex or --public-ip bring it back to eth0."""
    sb = jumbo
    ns = sb.node("n2").netns
    for cmd in (["link", "add", "mgmt0", "type", "veth", "peer", "name", "mgmt0p"],
                ["addr", "add", "192.168.77.2/24", "dev", "mgmt0"],
                ["link", "set", "mgmt0", "up"], ["link", "set", "mgmt0p", "up"],
                ["route", "add", "default", "via", "192.168.77.1", "dev", "mgmt0"]):
        sb.run_in(ns, "ip", *cmd)
    try:
        restart(sb, "n2", ["--iface-regex", ".*"])  # first interface with an address: eth0
        assert sb.status("n2").self.underlay_ip == sb.node("n2").underlay_ip

        # No flag at all: the default route's interface.
        sb.stop_agent("n2")
        cmd = [a for a in sb.agent_cmd("n2") if a not in ("--iface", "eth0")]
        assert "--iface" not in cmd
        h = sb.node("n2")
        h.pid = sb._spawn(h.netns, cmd, Path(h.log))
        sb.save()
        sb.wait_ready("n2", 30)
        st = sb.status("n2")
        assert (st.self.underlay_ip, st.mtu) == ("192.168.77.2", 1450)
        assert "underlay mgmt0, address 192.168.77.2, MTU 1500: overlay MTU 1450" in \
            Path(h.log).read_text()

        restart(sb, "n2", ["--iface-regex", r"eth\d+"])
        st = sb.status("n2")
        assert (st.self.underlay_ip, st.mtu) == (sb.node("n2").underlay_ip, 8950)

        restart(sb, "n2", ["--public-ip", sb.node("n2").underlay_ip])
        st = sb.status("n2")
        assert (st.self.underlay_ip, st.mtu) == (sb.node("n2").underlay_ip, 8950)
    finally:
        sb.run_in(ns, "ip", "link", "del", "mgmt0", check=False)
        restart(sb, "n2", [])
    a = next(p for p in sb.st.pods if p.node == "n1")
    b = next(p for p in sb.st.pods if p.node == "n2")
    wait_until(lambda: sb.ping(a.netns, b.ip), timeout=30)
