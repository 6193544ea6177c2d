"""Dual-stack pods over an IPv4 underlay (issue 14), from flannel's own net-conf.json.

One 3-node x 2-pod sandbox whose network config is flannel's documented
dual-stack example, unchanged (its commit c7a7aa88, "Add dual stack
support"): every pod gets an IPv4 and an IPv6 address, and IPv6 pod traffic
rides the same VXLAN device over the IPv4 underlay. The tests of this module
share it and leave it as they found it.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_interface,
)
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_logs, sandbox_up, wait_until
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.vxlan import VXLAN
from scapy.utils import rdpcap

from overlay.sandbox.runtime import NetworkList, exec_plugin
from overlay.sandbox.sandbox import Sandbox, sh, tool

FLANNEL_DUAL_STACK = """{
  "EnableIPv4": true,
  "EnableIPv6": true,
  "Network": "172.16.0.0/16",
  "IPv6Network": "fc00::/48",
  "Backend": {
    "Type": "vxlan"
  }
}"""


@pytest.fixture(scope="module")
def dual() -> Iterator[Sandbox]:
    with sandbox_up(3, 2, net_conf=FLANNEL_DUAL_STACK) as sb:
        yield sb


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False) and "dual" in request.fixturenames:
        dump_logs(request.getfixturevalue("dual"))


def entries6(sb: Sandbox, node: str) -> dict[str, set[tuple[str, str]]]:
    """The IPv6 routes and neighbours on the node's VXLAN device, and its FDB."""
    ns = sb.node(node).netns

    def j(*cmd: str) -> list[dict[str, Any]]:
        out = sb.run_in(ns, *cmd, check=False).stdout
        return json.loads(out) if out.strip() else []

    return {
        "route": {(r["dst"], r.get("gateway", "")) for r in j("ip", "-6", "-j", "route", "show",
                                                              "dev", "overlay.1", "proto", "159")},
        "neigh": {(n["dst"], n.get("lladdr", "")) for n in j("ip", "-6", "-j", "neigh", "show",
                                                             "dev", "overlay.1")
                  if "PERMANENT" in (n.get("state") or [])},
        "fdb": {(f["mac"], f.get("dst", "")) for f in j("bridge", "-j", "fdb", "show", "dev",
                                                        "overlay.1") if f.get("dst")},
    }


def test_flannels_dual_stack_example_gives_30_of_30_in_each_family(dual):
    p = subprocess.run([tool("overlayctl"), "sandbox", "check", "--name", dual.name],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "IPv4 connectivity: 30/30 pod pairs reachable" in p.stdout, p.stdout
    assert "IPv6 connectivity: 30/30 pod pairs reachable" in p.stdout, p.stdout
    stored = json.loads(dual.etcdctl("get", "--print-value-only",
                                     "/overlay/network/config").stdout)
    assert (stored["Network"], stored["IPv6Network"], stored["IPv6SubnetLen"]) == (
        "172.16.0.0/16", "fc00::/48", 64)
    for pod in dual.st.pods:
        assert IPv4Address(pod.ip) in IPv4Network("172.16.0.0/16")
        assert IPv6Address(pod.ip6) in IPv6Network("fc00::/48")


def test_leases_are_one_record_and_one_ipv6_claim_per_node(dual):
    keys = dual.etcdctl("get", "--prefix", "--keys-only", "/overlay/subnets/").stdout.decode()
    keys = [k for k in keys.split() if k]
    v4 = [k for k in keys if ":" not in k]
    v6 = [k for k in keys if ":" in k]
    assert len(v4) == 3 and len(v6) == 3, keys
    for key in v6:
        rec = json.loads(dual.etcdctl("get", "--print-value-only", key).stdout)
        own = f"/overlay/subnets/{rec['subnet'].replace('/', '-')}"
        assert own in v4 and key.endswith(rec["ipv6Subnet"].replace("/", "-"))
        lease_of = {k: dual.etcdctl("get", "-w", "json", k).stdout for k in (own, key)}
        leases = {json.loads(v)["kvs"][0]["lease"] for v in lease_of.values()}
        assert len(leases) == 1, "both keys of a lease are bound to one etcd lease"
    rows = json.loads(dual.etcdctl_overlay("leases", "--json").stdout)
    assert len(rows) == 3 and all(r["ipv6Subnet"] for r in rows)


def test_nodes_and_pods_reach_each_other_in_both_families(dual):
    bad = []
    vtep6 = {n.name: dual.status(n.name).self.subnet6.split("/")[0] for n in dual.st.nodes}
    for node in dual.st.nodes:
        for pod in dual.st.pods:
            for dst in (pod.ip, pod.ip6):
                if not (dual.ping(node.netns, dst) or dual.ping(node.netns, dst)):
                    bad.append(f"{node.name} -> {pod.name} {dst}")
            for dst in (node.underlay_ip, vtep6[node.name]):
                if not (dual.ping(pod.netns, dst) or dual.ping(pod.netns, dst)):
                    bad.append(f"{pod.name} -> {node.name} {dst}")
    assert not bad, f"unreachable: {bad}"


def test_status_and_watch_show_both_subnets_of_each_node(dual):
    """A dual-stack user reads both subnets of each node, not the IPv4 one alone."""
    want = {}
    for n in dual.st.nodes:
        me = dual.status(n.name).self
        assert IPv4Network(me.subnet).subnet_of(IPv4Network("172.16.0.0/16"))
        assert IPv6Network(me.subnet6).subnet_of(IPv6Network("fc00::/48"))
        want[n.name] = f"{me.subnet}, {me.subnet6}"

    def run(*args: str) -> str:
        p = subprocess.run([tool("overlayctl"), "sandbox", *args, "--name", dual.name],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    def rows(text: str) -> list[list[str]]:
        return [re.split(r"\s{2,}", line) for line in text.splitlines()]

    status = rows(run("status"))
    for name, cell in want.items():
        assert [name, dual.node(name).netns, dual.node(name).underlay_ip, cell] in [
            r[:4] for r in status], status
        seen_as = [r for r in status if r[0] in want and r[1:2] == [name]]  # peer rows
        assert len(seen_as) == 2 and all(r[2] == cell for r in seen_as), status
    # One frame where every agent answered (it has 1 s to, which a busy machine may miss).
    want_rows = [[name, "running", "yes", cell] for name, cell in want.items()]
    frames: list[list[list[str]]] = []

    def a_full_frame() -> bool:
        frames.append([r[:4] for r in rows(run("watch", "--count", "1"))])
        return all(r in frames[-1] for r in want_rows)

    with contextlib.suppress(AssertionError):
        wait_until(a_full_frame, 30, 0.5)
    assert all(r in frames[-1] for r in want_rows), frames[-1]
    doc = json.loads(run("status", "--json"))  # the JSON keeps "subnet" the IPv4 one
    assert {n["name"]: f"{n['subnet']}, {n['ipv6Subnet']}" for n in doc["nodes"]} == want


def test_ipv6_entries_and_addresses_deleted_by_hand_come_back(dual):
    before = entries6(dual, "n1")
    assert len(before["route"]) == 2 and len(before["neigh"]) == 2 and len(before["fdb"]) == 2
    route, gw = sorted(before["route"])[0]
    neigh, mac = sorted(before["neigh"])[0]
    ns = dual.node("n1").netns
    t0 = time.monotonic()
    sh("ip", "-n", ns, "-6", "route", "del", route, "dev", "overlay.1")
    sh("ip", "-n", ns, "-6", "neigh", "del", neigh, "dev", "overlay.1")
    took = wait_until(lambda: entries6(dual, "n1") == before, 10)
    gateway = dual.status("n1").self.subnet6.replace("::/64", "::1/64")
    sh("ip", "-n", ns, "-6", "addr", "del", gateway, "dev", "cni0")
    wait_until(lambda: gateway in dual.run_in(ns, "ip", "-6", "addr", "show", "cni0")
               .stdout.decode(), 10)
    log = Path(dual.node("n1").log).read_text()
    assert f"add route {route} via {gw} onlink (repair" in log
    assert f"add neigh {neigh} lladdr {mac} (repair" in log
    print(f"\nSCENARIO | IPv6 drift | IPv6 route and neighbour deleted by hand on n1 | back "
          f"after {took:.2f}s (kernel notifications; {time.monotonic() - t0:.1f}s with the "
          "bridge's IPv6 gateway)")


def test_ipv6_inner_over_ipv4_outer_on_the_wire(dual, tmp_path):
    p1 = next(p for p in dual.st.pods if p.node == "n1")
    p2 = next(p for p in dual.st.pods if p.node == "n2")
    mtu = dual.status("n1").mtu
    assert mtu == 1450  # IPv4 underlay: 50 bytes of VXLAN, whatever the pods' family
    pcap = tmp_path / "underlay.pcap"
    cap = subprocess.Popen(
        [*dual.exec_prefix(dual.st.underlay), "timeout", "30", "tcpdump", "-i", "br0", "-n",
         "--immediate-mode", "-U", "-w", str(pcap), "udp port 8472"], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        assert cap.stderr is not None and "listening on" in cap.stderr.readline()
        assert dual.ping(p1.netns, p2.ip6, count=3)
        # The largest ICMPv6 echo that fits the pod MTU (40 + 8 bytes of headers) crosses...
        assert dual.ping(p1.netns, p2.ip6, count=3, size=mtu - 48, dont_fragment=True)
        # ...one byte more does not (IPv6 routers never fragment; the pod learns the MTU).
        assert not dual.ping(p1.netns, p2.ip6, count=1, size=mtu - 47, dont_fragment=True)
        time.sleep(0.5)
    finally:
        cap.send_signal(2)
        cap.communicate(timeout=10)
    members = {dual.node(n).underlay_ip for n in ("n1", "n2", "n3")}
    inner6 = [p for p in rdpcap(str(pcap)) if p.haslayer(VXLAN)
              and IPv6 in p[VXLAN].payload]
    echoes = [p for p in inner6 if p[VXLAN].payload.haslayer(ICMPv6EchoRequest)
              or p[VXLAN].payload.haslayer(ICMPv6EchoReply)]
    assert len(echoes) >= 12, f"only {len(echoes)} IPv6 echoes in VXLAN"
    full = 0
    for p in echoes:
        assert p[IP].src in members and p[IP].dst in members and p[UDP].dport == 8472
        assert p[IP].flags.MF == 0 and p[IP].frag == 0, "outer packet fragmented"
        inner = p[VXLAN].payload[IPv6]
        assert {inner.src, inner.dst} == {p1.ip6, p2.ip6}, (inner.src, inner.dst)
        if inner.plen + 40 == mtu:
            full += 1
    assert full >= 6, "the full-MTU IPv6 pings (and replies) did not cross"
    print(f"\nSCENARIO | packet checks | IPv6 pods over an IPv4 underlay | {len(echoes)} "
          f"ICMPv6 echoes in VXLAN over IPv4, inner = pod addresses, {full} of {mtu} bytes "
          "unfragmented")


# --- the CNI plugin, dual-stack --------------------------------------------------------


class Pods:
    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.made: list[str] = []
        self.n = 0

    def ns(self) -> str:
        self.n += 1
        name = self.sb.ns(f"d{self.n}")
        sh("ip", "netns", "add", name)
        self.made.append(name)
        return name


@pytest.fixture
def pod_ns(dual: Sandbox) -> Iterator[Callable[[], str]]:
    pods = Pods(dual)
    yield pods.ns
    for name in pods.made:
        sh("ip", "netns", "del", name, check=False)


def cni(sb: Sandbox, command: str, conf: dict[str, Any], cid: str, netns: str = "",
        node: str = "n1") -> Any:
    return exec_plugin(str(sb.dir / "cni" / "bin" / "overlay"), command, conf,
                       container_id=cid, netns=f"/run/netns/{netns}" if netns else "",
                       ifname="eth0", cni_path=sb.cni_path(),
                       prefix=sb.exec_prefix(sb.node(node).netns), timeout=60)


def conf(sb: Sandbox, version: str = "1.0.0", **kw: Any) -> dict[str, Any]:
    return {"cniVersion": version, "name": "overlay", "type": "overlay",
            "agentSocket": str(sb.cni_socket("n1")), **kw}


def allocated(sb: Sandbox, cid: str) -> dict[str, list[str]]:
    run = sb.node_dir("n1") / "run"
    return {d: [p.name for p in (run / d / "ip").iterdir()
                if p.read_text().split("\n")[0] == cid]
            for d in ("ipam", "ipam6")}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_cni_result_has_both_families_and_says_what_is_there(dual, pod_ns, version):
    ns = pod_ns()
    cid = f"dual-{version}"
    c = cni(dual, "ADD", conf(dual, version), cid, ns)
    assert c.rc == 0, c.stdout
    res = json.loads(c.stdout)
    st = dual.status("n1").self
    v4, v6 = res["ips"]
    assert ip_interface(v4["address"]).network == ip_interface(st.subnet).network
    assert ip_interface(v6["address"]).network == ip_interface(st.subnet6).network
    assert [ip["interface"] for ip in res["ips"]] == [2, 2]
    assert res["interfaces"][2]["name"] == "eth0"
    if version < "1.0.0":
        assert (v4["version"], v6["version"]) == ("4", "6")
    else:
        assert "version" not in v4 and "version" not in v6
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": v4["gateway"]},
                             {"dst": "::/0", "gw": v6["gateway"]}]
    addrs = json.loads(sh("ip", "-n", ns, "-j", "addr", "show", "eth0").stdout)[0]["addr_info"]
    have = {f"{a['local']}/{a['prefixlen']}" for a in addrs if a["scope"] == "global"}
    assert have == {v4["address"], v6["address"]}
    assert not [a for a in addrs if "tentative" in a and a["scope"] == "global"], \
        "IPv6 address not usable at once (DAD)"
    route6 = json.loads(sh("ip", "-n", ns, "-6", "-j", "route", "show", "default").stdout)
    assert [r["gateway"] for r in route6] == [v6["gateway"]]
    assert sh("ip", "netns", "exec", ns, "ping", "-c1", "-W2", v6["gateway"],
              check=False).returncode == 0
    assert sorted(map(len, allocated(dual, cid).values())) == [1, 1]
    if version >= "0.4.0":
        assert cni(dual, "CHECK", conf(dual, version, prevResult=res), cid, ns).rc == 0
    assert cni(dual, "DEL", conf(dual, version, prevResult=res), cid, ns).rc == 0
    assert cni(dual, "DEL", conf(dual, version), cid, ns).rc == 0  # twice is fine
    assert allocated(dual, cid) == {"ipam": [], "ipam6": []}


def _break_v6_address(ns: str, res: dict[str, Any]) -> None:
    sh("ip", "-n", ns, "addr", "del", res["ips"][1]["address"], "dev", "eth0")


def _break_v6_route(ns: str, res: dict[str, Any]) -> None:
    sh("ip", "-n", ns, "-6", "route", "del", "default")


def _break_v6_route_wrong(ns: str, res: dict[str, Any]) -> None:
    other = str(IPv6Interface(res["ips"][1]["address"]).network[99])
    sh("ip", "-n", ns, "-6", "route", "replace", "default", "via", other, "dev", "eth0")


@pytest.mark.parametrize(("breakage", "words"), [
    (_break_v6_address, "lacks address fc00"), (_break_v6_route, "IPv6 default route"),
    (_break_v6_route_wrong, "IPv6 default route is via fc00")])
def test_check_fails_when_the_ipv6_side_is_broken(dual, pod_ns, breakage, words):
    ns = pod_ns()
    cid = f"brk-{breakage.__name__}"
    res = json.loads(cni(dual, "ADD", conf(dual), cid, ns).stdout)
    try:
        breakage(ns, res)
        c = cni(dual, "CHECK", conf(dual, prevResult=res), cid, ns)
        assert c.rc != 0
        doc = json.loads(c.stdout)
        assert doc["code"] == 110 and words in doc["details"], doc
    finally:
        cni(dual, "DEL", conf(dual, prevResult=res), cid, ns)
    assert allocated(dual, cid) == {"ipam": [], "ipam6": []}


def test_gc_and_a_del_without_the_agent_release_both_families(dual, pod_ns):
    nss = [pod_ns() for _ in range(3)]
    results = {}
    for i, ns in enumerate(nss):
        results[f"gc{i}"] = json.loads(cni(dual, "ADD", conf(dual), f"gc{i}", ns).stdout)
    # (the sandbox's own pods on n1 are attachments too: GC must keep them)
    keep = [{"containerID": c, "ifname": "eth0"} for c in
            ["gc0", *(p.container_id for p in dual.st.pods if p.node == "n1")]]
    c = cni(dual, "GC", conf(dual, "1.1.0", **{"cni.dev/valid-attachments": keep}), "")
    assert c.rc == 0, c.stdout
    assert allocated(dual, "gc1") == allocated(dual, "gc2") == {"ipam": [], "ipam6": []}
    assert sorted(map(len, allocated(dual, "gc0").values())) == [1, 1]
    # Without the agent, DEL succeeds (recorded); the agent releases both addresses
    # before it serves anything else.
    dual.stop_agent("n1")
    try:
        assert cni(dual, "DEL", conf(dual), "gc0", nss[0]).rc == 0
    finally:
        dual.start_agent("n1")
        dual.wait_ready("n1", 30)
    assert allocated(dual, "gc0") == {"ipam": [], "ipam6": []}


def test_ipmasq_puts_the_ipv6_address_in_the_ip6_table(dual, pod_ns):
    ns = pod_ns()
    res = json.loads(cni(dual, "ADD", conf(dual, ipMasq=True), "masq6", ns).stdout)
    v6 = res["ips"][1]["address"].split("/")[0]
    node = dual.node("n1").netns
    try:
        table = dual.run_in(node, "nft", "list", "table", "ip6", "overlay").stdout.decode()
        assert v6 in table and "ip6 daddr != fc00::/48 masquerade" in table
    finally:
        cni(dual, "DEL", conf(dual, prevResult=res), "masq6", ns)
    table = dual.run_in(node, "nft", "list", "table", "ip6", "overlay").stdout.decode()
    assert v6 not in table


def test_a_crash_and_restart_loses_no_ipv6_packet(dual):
    a = next(p for p in dual.st.pods if p.node == "n1")
    b = next(p for p in dual.st.pods if p.node == "n2")
    before = entries6(dual, "n1")
    ping = subprocess.Popen([*dual.exec_prefix(a.netns), "ping", "-n", "-q", "-i", "0.05",
                             "-c", "80", b.ip6], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    dual.stop_agent("n1", signal.SIGKILL)
    dual.stop_agent("n2", signal.SIGKILL)
    time.sleep(0.5)
    dual.start_agent("n1")
    dual.start_agent("n2")
    out, _ = ping.communicate(timeout=60)
    dual.wait_ready("n1", 30)
    dual.wait_ready("n2", 30)
    assert " 0% packet loss" in out, out
    assert entries6(dual, "n1") == before


def test_an_ipv6_claim_deleted_by_hand_is_taken_again(dual):
    st = dual.status("n3").self
    claim = f"/overlay/subnets/{st.subnet6.replace('/', '-')}"
    dual.etcdctl("del", claim)
    wait_until(lambda: dual.etcdctl("get", "--print-value-only", claim).stdout.strip() != b"", 15,
               0.2)
    again = dual.status("n3").self
    assert (again.subnet, again.subnet6) == (st.subnet, st.subnet6)
    assert "IPv6 claim" in Path(dual.node("n3").log).read_text()
    _, ok, total = dual.check(family=6)
    assert (ok, total) == (30, 30)


def test_chained_after_tuning_and_with_portmap_the_ipv6_result_passes_through(dual, pod_ns):
    ns = pod_ns()
    conflist = json.loads(dual.conflist_path("n1").read_text())
    conflist["plugins"].append({"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}})
    net = NetworkList(conflist, dual.cni_path(), prefix=dual.exec_prefix(dual.node("n1").netns))
    res = net.add("chain6", f"/run/netns/{ns}", runtime_config={
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]})
    try:
        assert [ip["address"].count(":") > 0 for ip in res["ips"]] == [False, True]
        net.check("chain6", f"/run/netns/{ns}", "eth0", res)
    finally:
        net.delete("chain6", f"/run/netns/{ns}", result=res)
    assert allocated(dual, "chain6") == {"ipam": [], "ipam6": []}
