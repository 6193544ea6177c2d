"""A VNI of eight digits, end to end: `overlay.<VNI>` does not fit in IFNAMSIZ, so the
VXLAN device is `ovl.<VNI>`, and everything that looks for our devices must find it.

The sandbox passes its VNI to `overlayctl network init --vni`, as an operator would."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import sandbox_up, wait_until

from overlay.devnames import vxlan_name
from overlay.sandbox.sandbox import Sandbox, tool

VNI = 12_345_678
DEVICE = "ovl.12345678"


@pytest.fixture(scope="module")
def big() -> Iterator[Sandbox]:
    with sandbox_up(2, 1, vni=VNI) as sb:
        yield sb


def link(sb: Sandbox, node: str, name: str) -> dict[str, object] | None:
    p = sb.run_in(sb.node(node).netns, "ip", "-d", "-j", "link", "show", "dev", name, check=False)
    return json.loads(p.stdout)[0] if p.returncode == 0 else None


def test_the_device_is_ovl_vni_on_every_node_and_pods_reach_each_other(big):
    assert vxlan_name(VNI) == DEVICE == big.vxlan_device
    for node in ("n1", "n2"):
        dev = link(big, node, DEVICE)
        assert dev is not None, f"{DEVICE} missing on {node}"
        assert dev["linkinfo"]["info_kind"] == "vxlan"  # type: ignore[index]
        assert dev["linkinfo"]["info_data"]["id"] == VNI  # type: ignore[index]
        assert link(big, node, f"overlay.{VNI}") is None
    peer = big.status("n2").self
    assert (peer.vtep_mac, peer.underlay_ip) in big.kernel_entries("n1")["fdb"]
    _, ok, total = big.check()
    assert ok == total == 2


def test_drift_on_the_ovl_device_is_repaired(big):
    ns = big.node("n1").netns
    peer = big.status("n2").self
    want = big.kernel_entries("n1")
    assert (peer.vtep_mac, peer.underlay_ip) in want["fdb"]
    big.run_in(ns, "bridge", "fdb", "del", peer.vtep_mac, "dev", DEVICE, "dst", peer.underlay_ip)
    wait_until(lambda: big.kernel_entries("n1") == want, 10, 0.1)
    index = link(big, "n1", DEVICE)["ifindex"]  # type: ignore[index]
    big.run_in(ns, "ip", "link", "del", DEVICE)
    wait_until(lambda: (link(big, "n1", DEVICE) or {}).get("ifindex", index) != index, 10, 0.1)
    wait_until(lambda: big.kernel_entries("n1") == want, 10, 0.1)
    _, ok, total = big.check()
    assert ok == total


def test_status_names_the_vni_and_the_device(big):
    p = subprocess.run([tool("overlayctl"), "status", "--json", "--socket",
                        str(big.agent_socket("n1"))], capture_output=True, text=True,
                       timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["vni"] == VNI and doc["ready"]
    assert doc["conditions"]["device"] == {"ok": True, "message": f"{DEVICE} up"}
    assert [q["programmed"] for q in doc["peers"]] == [True]


def trace(big: Sandbox, *where: str) -> list[dict[str, object]]:
    """`overlayctl trace` between the two pods while one pings the other."""
    a, b = big.st.pods
    cmd = [tool("overlayctl"), "trace", a.ip, b.ip, *where, "--count", "2", "--timeout", "30",
           "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        started = proc.stderr.readline()
        assert started.startswith("capturing on"), started + proc.stderr.read()
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            big.ping(a.netns, b.ip, count=1, timeout=2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_trace_on_the_underlay_shows_the_vni(big):
    seen = trace(big, "--name", big.name)
    assert len(seen) == 2 and all(s["vni"] == VNI for s in seen)
    assert {s["direction"] for s in seen} <= {"a>b", "b>a"}


def test_trace_on_the_ovl_device_itself(big):
    seen = trace(big, "--netns", big.node("n1").netns, "--iface", DEVICE)
    assert len(seen) == 2 and all(s["outer"] is None for s in seen)  # decapsulated there
