"""The `overlay` CNI plugin against the CNI specification (issue 3).

Everything here drives the installed executable the way a container runtime
does: a subprocess with CNI_* variables and the config on stdin, run inside
the node's namespace, against a real overlayd, real etcd and real pod
namespaces. Behaviour that depends on the spec version is checked for each
version the plugin supports (0.3.0, 0.3.1, 0.4.0, 1.0.0, and 1.1.0 for GC
and STATUS). One sandbox serves the whole module; every test removes what it
made, and tests that stop the agent start it again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network, ip_interface
from pathlib import Path
from typing import Any

import pytest
from conftest import sandbox_up, wait_until

from overlay.sandbox.runtime import Call, CniCallError, NetworkList, exec_plugin
from overlay.sandbox.sandbox import Sandbox, sh

LEGACY = ("0.3.0", "0.3.1", "0.4.0")
VERSIONS = (*LEGACY, "1.0.0")  # what runtimes send (libcni 1.1.2 rejects 1.1.0 results)
ALL_VERSIONS = (*VERSIONS, "1.1.0")
WITH_CHECK = ("0.4.0", "1.0.0", "1.1.0")
REFERENCE = Path("/usr/lib/cni")
CHAINED_EXAMPLE = Path(__file__).resolve().parents[2] / "cni" / "examples" / "chained.conflist"
_ids = itertools.count(1)


# --- the harness -------------------------------------------------------------


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    missing = [p for p in ("portmap", "bandwidth", "tuning", "loopback")
               if not (REFERENCE / p).exists()]
    if missing:
        pytest.fail(f"reference CNI plugins missing from {REFERENCE}: {missing} "
                    "(apt-get install containernetworking-plugins)", pytrace=False)
    with sandbox_up(1, 0) as s:
        yield s


@pytest.fixture(autouse=True)
def _agent_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False) and "sb" in request.fixturenames:
        s: Sandbox = request.getfixturevalue("sb")
        if s.state is not None:
            for h in s.st.nodes:
                with contextlib.suppress(OSError):
                    lines = Path(h.log).read_text().splitlines()[-25:]
                    print(f"---- {h.name} agent log ----\n" + "\n".join(lines))


class Node:
    """One node's CNI endpoint, called like a runtime calls it."""

    def __init__(self, sb: Sandbox, name: str = "n1") -> None:
        self.sb, self.name = sb, name
        self.ns = sb.node(name).netns
        self.plugin = str(sb.dir / "cni" / "bin" / "overlay")
        self.socket = str(sb.cni_socket(name))
        self.ipam_dir = sb.node_dir(name) / "run" / "ipam" / "ip"

    def conf(self, version: str = "1.0.0", **kw: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": "overlay", "type": "overlay",
                "agentSocket": self.socket, **kw}

    def call(self, command: str, conf: dict[str, Any] | bytes, *, cid: str = "",
             netns: str = "", ifname: str = "eth0", args: str = "",
             env: dict[str, str] | None = None) -> Call:
        return exec_plugin(self.plugin, command, conf, container_id=cid, netns=netns,
                           ifname=ifname, cni_args=args, cni_path=self.sb.cni_path(),
                           prefix=self.sb.exec_prefix(self.ns), extra_env=env, timeout=60)

    def add(self, netns: str, version: str = "1.0.0", cid: str | None = None,
            ifname: str = "eth0", **kw: Any) -> tuple[str, dict[str, Any]]:
        cid = cid or f"ctr{next(_ids)}"
        c = self.call("ADD", self.conf(version, **kw), cid=cid, netns=path(netns), ifname=ifname)
        assert c.rc == 0, (c.stdout, c.stderr)
        assert b"Traceback" not in c.stderr
        return cid, json.loads(c.stdout)

    def delete(self, cid: str, netns: str | None, version: str = "1.0.0",
               ifname: str = "eth0", **kw: Any) -> Call:
        c = self.call("DEL", self.conf(version, **kw), cid=cid,
                      netns=path(netns) if netns else "", ifname=ifname)
        assert c.rc == 0, (c.stdout, c.stderr)
        assert c.stdout.strip() == b""
        return c

    def check(self, cid: str, netns: str, prev: dict[str, Any], version: str = "1.0.0",
              ifname: str = "eth0") -> Call:
        return self.call("CHECK", self.conf(version, prevResult=prev), cid=cid,
                         netns=path(netns), ifname=ifname)

    def run(self, *cmd: str, check: bool = True) -> str:
        return self.sb.run_in(self.ns, *cmd, check=check).stdout.decode()

    def allocations(self) -> dict[str, tuple[str, str]]:
        out = {}
        for p in self.ipam_dir.iterdir():
            cid, ifname = p.read_text().split("\n")[:2]
            out[p.name] = (cid, ifname)
        return out

    def pending(self) -> list[Path]:
        """DELs and GCs the plugin recorded for the agent (see overlay.agent.cniserver)."""
        return sorted((Path(self.socket).parent / "cni-pending").glob("*.req"))

    def allocated_to(self, cid: str) -> list[str]:
        return [ip for ip, (c, _) in self.allocations().items() if c == cid]

    def links(self) -> dict[str, dict[str, Any]]:
        return {link["ifname"]: link for link in json.loads(self.run("ip", "-j", "-d", "link"))}

    def subnet(self) -> IPv4Network:
        return IPv4Network(self.sb.status(self.name).self.subnet)

    def mtu(self) -> int:
        return int(self.links()["overlay.1"]["mtu"])

    def masq_set(self) -> set[str]:
        out = self.run("nft", "-j", "list", "set", "ip", "overlay", "masq_pods", check=False)
        if not out.strip():
            return set()
        for item in json.loads(out)["nftables"]:
            if "set" in item:
                return {str(e) for e in item["set"].get("elem", [])}
        return set()


def path(netns: str) -> str:
    return f"/run/netns/{netns}"


def host_veth(result: dict[str, Any]) -> str:
    return next(i["name"] for i in result["interfaces"]
                if i["name"].startswith("veth") and not i.get("sandbox"))


def pod_ip(result: dict[str, Any], ifname: str = "eth0") -> IPv4Interface:
    for ip in result["ips"]:
        if result["interfaces"][ip["interface"]]["name"] == ifname:
            addr = ip_interface(ip["address"])
            assert isinstance(addr, IPv4Interface)
            return addr
    raise AssertionError(f"no address for {ifname} in {result}")


def ns_json(netns: str, *cmd: str) -> Any:
    out = sh("ip", "-n", netns, "-j", *cmd, check=False).stdout
    return json.loads(out) if out.strip() else []


def ns_links(netns: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in ns_json(netns, "-d", "link")}


def default_routes(netns: str) -> list[dict[str, Any]]:
    return [r for r in ns_json(netns, "-4", "route") if r["dst"] == "default"]


def assert_error(c: Call, code: int, *words: str) -> dict[str, Any]:
    """A CNI error: non-zero exit, the error document on stdout, no traceback anywhere."""
    assert c.rc != 0, c.stdout
    assert b"Traceback" not in c.stdout and b"Traceback" not in c.stderr, c.stderr
    doc = json.loads(c.stdout)
    assert {"cniVersion", "code", "msg"} <= set(doc), doc
    assert doc["code"] == code, doc
    text = f"{doc['msg']} {doc.get('details', '')}"
    for w in words:
        assert w in text, doc
    return dict(doc)


@pytest.fixture(scope="module")
def n1(sb: Sandbox) -> Node:
    return Node(sb, "n1")


@pytest.fixture
def pods(sb: Sandbox) -> Iterator[Callable[[], str]]:
    """pods() -> the name of a fresh, empty network namespace (removed after the test)."""
    made: list[str] = []

    def make() -> str:
        name = sb.ns(f"k{next(_ids)}")
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def agent_stopped(sb: Sandbox, node: str = "n1", sig: int = signal.SIGTERM) -> Iterator[None]:
    sb.stop_agent(node, sig)
    try:
        yield
    finally:
        sb.start_agent(node)
        sb.wait_ready(node, 30)


# --- VERSION and result shapes -------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_version_echoes_the_request_and_lists_supported_versions(n1, version):
    c = n1.call("VERSION", {"cniVersion": version})
    assert c.rc == 0, c.stdout
    doc = json.loads(c.stdout)
    assert doc["cniVersion"] == version
    assert set(ALL_VERSIONS) <= set(doc["supportedVersions"])


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_add_result_has_the_shape_of_the_requested_version(n1, pods, version):
    pod = pods()
    dns = {"nameservers": ["10.96.0.10"], "domain": "cluster.local",
           "search": ["default.svc.cluster.local"], "options": ["ndots:5"]}
    cid, res = n1.add(pod, version, dns=dns)
    subnet, gw = n1.subnet(), str(n1.subnet().network_address + 1)

    assert res["cniVersion"] == version
    bridge, host, cont = res["interfaces"]
    assert bridge["name"] == "cni0" and not bridge.get("sandbox")
    assert host["name"].startswith("veth") and not host.get("sandbox")
    assert cont == {"name": "eth0", "mac": cont["mac"], "sandbox": path(pod)}
    [ip] = res["ips"]
    assert ("version" in ip) == (version in LEGACY)
    if version in LEGACY:
        assert ip["version"] == "4"
    assert res["interfaces"][ip["interface"]]["name"] == "eth0"
    assert IPv4Interface(ip["address"]).network == subnet
    assert ip["gateway"] == gw
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": gw}]
    assert res["dns"] == dns

    # The result describes what is really there.
    links = ns_links(pod)
    assert links["eth0"]["address"] == cont["mac"]
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in ns_json(pod, "-4", "addr", "show", "eth0")
             [0]["addr_info"]}
    assert addrs == {ip["address"]}
    assert [r["gateway"] for r in default_routes(pod)] == [gw]
    hosts = n1.links()
    assert hosts[host["name"]]["address"] == host["mac"]
    assert hosts[host["name"]]["master"] == "cni0"
    assert hosts["cni0"]["address"] == bridge["mac"]
    assert sh("ip", "netns", "exec", pod, "ping", "-c1", "-W2", gw, check=False).returncode == 0

    if version in WITH_CHECK:
        c = n1.check(cid, pod, res, version)
        assert c.rc == 0, c.stdout
    n1.delete(cid, pod, version)
    assert not n1.allocated_to(cid)
    assert host["name"] not in n1.links()
    assert "eth0" not in ns_links(pod)


def test_mtu_follows_the_vxlan_device_and_the_config(n1, pods):
    overlay_mtu = n1.mtu()
    assert overlay_mtu == n1.links()["eth0"]["mtu"] - 50  # the underlay's, less VXLAN's 50
    pod = pods()
    cid, res = n1.add(pod)
    assert ns_links(pod)["eth0"]["mtu"] == overlay_mtu
    assert n1.links()[host_veth(res)]["mtu"] == overlay_mtu
    n1.delete(cid, pod)

    cid, res = n1.add(pod, mtu=overlay_mtu - 100)
    assert ns_links(pod)["eth0"]["mtu"] == overlay_mtu - 100
    n1.delete(cid, pod)

    c = n1.call("ADD", n1.conf(mtu=9000), cid="toobig", netns=path(pod))
    assert_error(c, 7, "mtu", str(overlay_mtu))
    assert not n1.allocated_to("toobig") and "eth0" not in ns_links(pod)


def test_add_works_after_the_bridge_was_recreated(n1, pods):
    """The agent repairs a deleted bridge, with the same explicit MAC; ADD finds the new one."""
    pod = pods()
    cid, res = n1.add(pod)
    mac = n1.links()["cni0"]["address"]
    assert mac not in ("00:00:00:00:00:00", "") and res["interfaces"][0]["mac"] == mac
    n1.delete(cid, pod)
    old = n1.links()["cni0"]["ifindex"]
    n1.run("ip", "link", "del", "cni0")
    wait_until(lambda: n1.links().get("cni0", {}).get("ifindex", old) != old, 10, 0.1)
    cid, res = n1.add(pod)
    links = n1.links()
    assert links["cni0"]["address"] == mac
    assert links[host_veth(res)]["master"] == "cni0"
    assert sh("ip", "netns", "exec", pod, "ping", "-c1", "-W2", str(n1.subnet()[1]),
              check=False).returncode == 0
    n1.delete(cid, pod)


@pytest.mark.parametrize("hairpin", [True, False])
def test_hairpin_mode_is_set_on_the_bridge_port(n1, pods, hairpin):
    pod = pods()
    cid, res = n1.add(pod, hairpinMode=hairpin)
    port = json.loads(n1.run("bridge", "-j", "-d", "link", "show", "dev", host_veth(res)))[0]
    assert port["hairpin"] is hairpin
    n1.delete(cid, pod)


def test_ip_masq_puts_the_pod_in_the_masquerade_set_until_del(n1, pods):
    plain, masq = pods(), pods()
    cid1, res1 = n1.add(plain)
    cid2, res2 = n1.add(masq, ipMasq=True)
    members = n1.masq_set()
    assert str(pod_ip(res2).ip) in members
    assert str(pod_ip(res1).ip) not in members
    rules = n1.run("nft", "list", "chain", "ip", "overlay", "postrouting")
    assert "@masq_pods" in rules and "masquerade" in rules
    n1.delete(cid2, masq, ipMasq=True)
    assert str(pod_ip(res2).ip) not in n1.masq_set()
    n1.delete(cid1, plain)


# --- failures leave nothing behind -----------------------------------------------


def test_add_fails_cleanly_when_the_interface_already_exists(n1, pods):
    pod = pods()
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    before_links, before_veths = ns_links(pod), set(n1.links())
    c = n1.call("ADD", n1.conf(), cid="dup", netns=path(pod))
    doc = assert_error(c, 101, "eth0", "already exists")
    assert doc["code"] >= 100
    assert not n1.allocated_to("dup")
    assert set(n1.links()) == before_veths
    assert ns_links(pod)["eth0"]["ifindex"] == before_links["eth0"]["ifindex"]
    # A runtime calls DEL after a failed ADD: it must succeed and not touch the pod's eth0.
    n1.delete("dup", pod)
    assert "eth0" in ns_links(pod)


def test_a_second_add_for_a_running_pod_fails_and_leaves_it_alone(n1, pods):
    pod = pods()
    cid, res = n1.add(pod)
    c = n1.call("ADD", n1.conf(), cid=cid, netns=path(pod))
    assert_error(c, 101, "already exists")
    assert n1.allocated_to(cid) == [str(pod_ip(res).ip)]
    assert n1.check(cid, pod, res).rc == 0
    n1.delete(cid, pod)


def test_add_failing_after_allocation_releases_the_address_and_the_veth(n1, pods):
    """A default route already in the pod makes the last ADD step fail."""
    pod = pods()
    sh("ip", "-n", pod, "link", "add", "br9", "type", "bridge")
    sh("ip", "-n", pod, "link", "set", "br9", "up")
    sh("ip", "-n", pod, "addr", "add", "192.0.2.1/24", "dev", "br9")
    sh("ip", "-n", pod, "route", "add", "default", "via", "192.0.2.254")
    veths = {n for n in n1.links() if n.startswith("veth")}
    c = n1.call("ADD", n1.conf(), cid="late", netns=path(pod))
    assert_error(c, 103, "default route", "exists")
    assert not n1.allocated_to("late")
    assert {n for n in n1.links() if n.startswith("veth")} == veths
    assert "eth0" not in ns_links(pod)
    assert [r["gateway"] for r in default_routes(pod)] == ["192.0.2.254"]
    n1.delete("late", pod)


# --- DEL ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_del_is_idempotent_and_always_releases_the_address(n1, pods, version):
    veths_before = {n for n in n1.links() if n.startswith("veth")}
    # The namespace is already gone.
    pod = pods()
    cid, res = n1.add(pod, version)
    sh("ip", "netns", "del", pod)
    n1.delete(cid, pod, version)
    assert not n1.allocated_to(cid)
    # No CNI_NETNS at all.
    pod = pods()
    cid, res = n1.add(pod, version)
    n1.delete(cid, None, version)
    assert not n1.allocated_to(cid) and "eth0" not in ns_links(pod)
    # Never added.
    n1.delete("never-added", pods(), version)
    # Twice, with the netns, then again with prevResult like a runtime retrying.
    pod = pods()
    cid, res = n1.add(pod, version)
    n1.delete(cid, pod, version)
    n1.call("DEL", n1.conf(version, prevResult=res), cid=cid, netns=path(pod))
    n1.delete(cid, pod, version, prevResult=res)
    assert not n1.allocated_to(cid) and "eth0" not in ns_links(pod)
    wait_until(lambda: {n for n in n1.links() if n.startswith("veth")} == veths_before, 5)


def test_del_with_a_config_broken_after_add_still_releases_everything(n1, pods):
    """An operator edits the conflist with a mistake while pods run: their DEL must not
    fail for ever (the address and the veth would never be released)."""
    veths_before = {n for n in n1.links() if n.startswith("veth")}
    pod = pods()
    cid, _ = n1.add(pod)
    assert n1.allocated_to(cid)
    n1.delete(cid, pod, mtu="a lot", hairpinMode="yes", dns=[])
    assert not n1.allocated_to(cid) and "eth0" not in ns_links(pod)
    wait_until(lambda: {n for n in n1.links() if n.startswith("veth")} == veths_before, 5)
    log = Path(n1.sb.node("n1").log).read_text()
    assert "the network config is invalid" in log and "removing the attachment anyway" in log
    # ADD with the same mistake is refused, naming the key.
    assert_error(n1.call("ADD", n1.conf(mtu="a lot"), cid="x", netns=path(pods())), 7, "mtu")


# --- CHECK --------------------------------------------------------------------------


def _break_address(n1, pod, res):
    sh("ip", "-n", pod, "addr", "del", str(pod_ip(res)), "dev", "eth0")


def _break_route_missing(n1, pod, res):
    sh("ip", "-n", pod, "route", "del", "default")


def _break_route_wrong(n1, pod, res):
    other = str(pod_ip(res).network.broadcast_address - 1)
    sh("ip", "-n", pod, "route", "replace", "default", "via", other)


def _break_host_veth(n1, pod, res):
    n1.run("ip", "link", "del", host_veth(res))


def _break_unbridged(n1, pod, res):
    n1.run("ip", "link", "set", host_veth(res), "nomaster")


def _break_other_bridge(n1, pod, res):
    n1.run("ip", "link", "add", "brx", "type", "bridge")
    n1.run("ip", "link", "set", host_veth(res), "master", "brx")


def _break_mac(n1, pod, res):
    sh("ip", "-n", pod, "link", "set", "eth0", "address", "02:00:00:00:00:99")


def _break_down(n1, pod, res):
    sh("ip", "-n", pod, "link", "set", "eth0", "down")


def _break_replaced_veth(n1, pod, res):
    """Both ends look right (names, bridge, MAC, address, route), but are not one pair."""
    host, mac = host_veth(res), res["interfaces"][2]["mac"]
    sh("ip", "-n", pod, "link", "del", "eth0")  # takes the host end with it
    n1.run("ip", "link", "add", host, "type", "veth", "peer", "name", "spare0")
    n1.run("ip", "link", "set", host, "master", "cni0", "up")
    sh("ip", "-n", pod, "link", "add", "eth0", "address", mac, "type", "veth", "peer", "name",
       "x0")
    sh("ip", "-n", pod, "link", "set", "eth0", "up")
    sh("ip", "-n", pod, "link", "set", "x0", "up")
    sh("ip", "-n", pod, "addr", "add", str(pod_ip(res)), "dev", "eth0")
    sh("ip", "-n", pod, "route", "add", "default", "via", str(pod_ip(res).network[1]))


BREAKAGES = {
    "address missing": (_break_address, "lacks address"),
    "route missing": (_break_route_missing, "default route"),
    "route wrong": (_break_route_wrong, "default route"),
    "veth missing": (_break_host_veth, "missing"),
    "not on a bridge": (_break_unbridged, "not attached"),
    "on another bridge": (_break_other_bridge, "not attached to cni0"),
    "mac changed": (_break_mac, "MAC"),
    "interface down": (_break_down, "down"),
    "veth replaced": (_break_replaced_veth, "not the peer"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_check_fails_when_what_add_made_is_missing_or_wrong(n1, pods, breakage):
    pod = pods()
    cid, res = n1.add(pod)
    assert n1.check(cid, pod, res).rc == 0
    brk, words = BREAKAGES[breakage]
    try:
        brk(n1, pod, res)
        assert_error(n1.check(cid, pod, res), 110, words)
    finally:
        n1.delete(cid, pod)
        n1.run("ip", "link", "del", "brx", check=False)
    assert not n1.allocated_to(cid)


@pytest.mark.parametrize("version", WITH_CHECK)
def test_check_needs_a_prev_result_that_matches(n1, pods, version):
    pod = pods()
    cid, res = n1.add(pod, version)
    c = n1.call("CHECK", n1.conf(version), cid=cid, netns=path(pod))
    assert_error(c, 7, "prevResult")
    other = json.loads(json.dumps(res))
    other["ips"][0]["address"] = str(pod_ip(res).network[200]) + "/24"
    assert_error(n1.check(cid, pod, other, version), 110, "not in prevResult")
    assert n1.check(cid, pod, res, version).rc == 0
    n1.delete(cid, pod, version)


@pytest.mark.parametrize("version", ("0.3.0", "0.3.1"))
def test_check_is_refused_before_0_4_0(n1, pods, version):
    pod = pods()
    cid, res = n1.add(pod, version)
    assert_error(n1.check(cid, pod, res, version), 1, "0.4.0")
    n1.delete(cid, pod, version)


# --- GC and STATUS (1.1.0) ------------------------------------------------------------


def test_gc_releases_every_attachment_not_listed(n1, pods):
    keep_ns, gone1_ns, gone2_ns = pods(), pods(), pods()
    keep, keep_res = n1.add(keep_ns, "1.1.0")
    gone1, res1 = n1.add(gone1_ns, "1.1.0", ipMasq=True)
    gone2, res2 = n1.add(gone2_ns, "1.1.0")
    others = [(c, i) for c, i in n1.allocations().values() if c not in (keep, gone1, gone2)]
    valid = [{"containerID": c, "ifname": i} for c, i in [(keep, "eth0"), *others]]
    conf = n1.conf("1.1.0", **{"cni.dev/valid-attachments": valid})
    c = n1.call("GC", conf)
    assert c.rc == 0, c.stdout
    assert not n1.allocated_to(gone1) and not n1.allocated_to(gone2)
    assert n1.allocated_to(keep)
    links = n1.links()
    assert host_veth(res1) not in links and host_veth(res2) not in links
    assert str(pod_ip(res1).ip) not in n1.masq_set()
    assert n1.check(keep, keep_ns, keep_res, "1.1.0").rc == 0
    # GC never replaces DEL: the runtime still calls it, and it still succeeds.
    n1.delete(gone1, gone1_ns, "1.1.0")
    n1.delete(keep, keep_ns, "1.1.0")


def test_gc_removes_an_orphaned_veth(n1, pods):
    """A veth whose allocation is gone (say, the agent died in the middle of ADD)."""
    pod = pods()
    cid, res = n1.add(pod, "1.1.0")
    (n1.ipam_dir / str(pod_ip(res).ip)).unlink()
    valid = [{"containerID": c, "ifname": i} for c, i in n1.allocations().values()]
    c = n1.call("GC", n1.conf("1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert c.rc == 0, c.stdout
    assert host_veth(res) not in n1.links()
    n1.delete(cid, pod, "1.1.0")


@pytest.mark.parametrize("valid", ["all", [{"containerID": 1, "ifname": "eth0"}], [["a", "b"]]])
def test_gc_with_a_malformed_list_releases_nothing(n1, pods, valid):
    pod = pods()
    cid, res = n1.add(pod, "1.1.0")
    before = n1.allocations()
    c = n1.call("GC", n1.conf("1.1.0", **{"cni.dev/valid-attachments": valid}))
    assert_error(c, 7, "cni.dev/valid-attachments")
    assert n1.allocations() == before and host_veth(res) in n1.links()
    n1.delete(cid, pod, "1.1.0")


def test_status_is_0_when_ready(n1):
    assert n1.call("STATUS", n1.conf("1.1.0")).rc == 0


@pytest.mark.parametrize(("command", "version"), [("GC", "1.0.0"), ("STATUS", "0.4.0")])
def test_gc_and_status_need_1_1_0(n1, command, version):
    assert_error(n1.call(command, n1.conf(version)), 1, "1.1.0")


# --- chaining --------------------------------------------------------------------------


def _iptables_nat(n1: Node) -> str:
    return n1.run("iptables-save", "-t", "nat", check=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_first_in_a_chain_with_portmap_bandwidth_and_tuning(sb, n1, pods, version):
    # The documented example, cni/examples/chained.conflist, pointed at this node's agent.
    conflist = json.loads(CHAINED_EXAMPLE.read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["overlay", "portmap", "bandwidth",
                                                         "tuning"]
    conflist["cniVersion"] = version
    conflist["plugins"][0]["agentSocket"] = n1.socket
    somaxconn_set = conflist["plugins"][3]["sysctl"]["net.core.somaxconn"]
    rc = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
          "bandwidth": {"ingressRate": 8_000_000, "ingressBurst": 80_000,
                        "egressRate": 8_000_000, "egressBurst": 80_000}}
    net = NetworkList(conflist, sb.cni_path(), prefix=sb.exec_prefix(n1.ns))
    pod = pods()
    cid = f"chain{next(_ids)}"
    res = net.add(cid, path(pod), "eth0", runtime_config=rc)
    # Our interfaces, address and route come out of the chain intact.
    assert res["cniVersion"] == version
    names = [i["name"] for i in res["interfaces"]]
    assert names[:3] == ["cni0", host_veth(res), "eth0"]
    assert pod_ip(res).network == n1.subnet()
    assert {"dst": "0.0.0.0/0", "gw": str(n1.subnet()[1])} in res["routes"]
    # Each chained plugin could use our result.
    assert "18080" in _iptables_nat(n1)
    assert "tbf" in n1.run("tc", "qdisc", "show", "dev", host_veth(res))
    assert any(n.startswith("bwp") for n in n1.links())  # bandwidth's ifb for egress
    somaxconn = sh("ip", "netns", "exec", pod, "sysctl", "-n", "net.core.somaxconn")
    assert somaxconn.stdout.decode().strip() == somaxconn_set
    if version in WITH_CHECK:
        # portmap 1.1.1's own CHECK fails for every IPv4-only pod when ip6tables exists
        # ("could not check ipv6 dnat", the same behind the reference bridge plugin):
        # the rest of the chain is checked with the final result, as libcni would.
        rest = {**conflist, "plugins": [p for p in conflist["plugins"]
                                         if p["type"] != "portmap"]}
        NetworkList(rest, sb.cni_path(), prefix=sb.exec_prefix(n1.ns)).check(
            cid, path(pod), "eth0", res, runtime_config=rc)
    net.delete(cid, path(pod), "eth0", res, runtime_config=rc)
    assert not n1.allocated_to(cid)
    assert "18080" not in _iptables_nat(n1)
    links = n1.links()
    assert host_veth(res) not in links and not any(n.startswith("bwp") for n in links)


@pytest.mark.parametrize("version", VERSIONS)
def test_later_in_a_chain_it_passes_the_previous_result_through(sb, n1, pods, version):
    conflist = {"cniVersion": version, "name": "overlay", "plugins": [
        {"type": "loopback"},
        {"type": "overlay", "agentSocket": n1.socket},
        {"type": "tuning", "mac": "02:00:00:00:aa:01"},
    ]}
    net = NetworkList(conflist, sb.cni_path(), prefix=sb.exec_prefix(n1.ns))
    pod = pods()
    cid = f"later{next(_ids)}"
    res = net.add(cid, path(pod), "eth0")
    assert res["cniVersion"] == version
    # loopback's result comes first, untouched but for ips[].version; its ::1 included.
    assert res["interfaces"][0] == {"name": "lo", "mac": "00:00:00:00:00:00",
                                    "sandbox": path(pod)}
    lo = [ip for ip in res["ips"] if ip["interface"] == 0]
    assert {ip["address"] for ip in lo} == {"127.0.0.1/8", "::1/128"}
    assert {ip["address"]: ip.get("version") for ip in lo} == (
        {"127.0.0.1/8": "4", "::1/128": "6"} if version in LEGACY
        else {"127.0.0.1/8": None, "::1/128": None})
    k = 1
    assert [i["name"] for i in res["interfaces"][k:]] == ["cni0", host_veth(res), "eth0"]
    ours = res["ips"][len(lo):]
    assert [res["interfaces"][ip["interface"]]["name"] for ip in ours] == ["eth0"]
    assert all(("version" in ip) == (version in LEGACY) for ip in res["ips"])
    assert ns_links(pod)["eth0"]["address"] == "02:00:00:00:aa:01"  # tuning used our result
    if version in WITH_CHECK:
        net.check(cid, path(pod), "eth0", res)
    net.delete(cid, path(pod), "eth0", res)
    assert not n1.allocated_to(cid) and "eth0" not in ns_links(pod)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_runtime_config_capabilities_and_args_are_tolerated(n1, pods, version):
    pod = pods()
    conf = n1.conf(version,
                   capabilities={"portMappings": True, "bandwidth": True, "ips": True},
                   runtimeConfig={"portMappings": [{"hostPort": 80, "containerPort": 80,
                                                    "protocol": "tcp"}],
                                  "bandwidth": {"ingressRate": 1000}},
                   args={"cni": {"labels": [{"key": "app", "value": "web"}]}})
    c = n1.call("ADD", conf, cid=f"caps{version}", netns=path(pod),
                args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                     "K8S_POD_INFRA_CONTAINER_ID=abc123")
    assert c.rc == 0, c.stdout
    n1.delete(f"caps{version}", pod, version)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["0.2.0", "0.1.0", "2.0.0", "1.0"])
def test_unsupported_version_is_code_1_before_any_side_effect(n1, pods, bad):
    pod = pods()
    veths = set(n1.links())
    c = n1.call("ADD", n1.conf(bad), cid="v1", netns=path(pod))
    assert_error(c, 1, bad)
    assert not n1.allocated_to("v1") and set(n1.links()) == veths and not ns_links(pod).get(
        "eth0")


@pytest.mark.parametrize(("drop", "override", "var"), [
    ("CNI_CONTAINERID", {}, "CNI_CONTAINERID"),
    ("CNI_NETNS", {}, "CNI_NETNS"),
    ("CNI_IFNAME", {}, "CNI_IFNAME"),
    (None, {"CNI_IFNAME": "eth0/1"}, "CNI_IFNAME"),
    (None, {"CNI_IFNAME": "a-much-too-long-name"}, "CNI_IFNAME"),
    (None, {"CNI_NETNS": "/run/netns/does-not-exist"}, "CNI_NETNS"),
    (None, {"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
    ("CNI_COMMAND", {}, "CNI_COMMAND"),
])
def test_bad_environment_is_code_4_naming_the_variable(n1, pods, drop, override, var):
    pod = pods()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "envtest", "CNI_NETNS": path(pod),
           "CNI_IFNAME": "eth0", "CNI_PATH": n1.sb.cni_path(), **override}
    if drop:
        del env[drop]
    full = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), **env}
    p = subprocess.run([*n1.sb.exec_prefix(n1.ns), n1.plugin], input=json.dumps(n1.conf()).encode(),
                       env=full, capture_output=True, timeout=60, check=False)
    assert_error(Call(p.returncode, p.stdout, p.stderr, 0), 4, var)
    assert not n1.allocated_to("envtest")


def test_the_nodes_own_namespace_is_refused_as_a_container(n1):
    c = n1.call("ADD", n1.conf(), cid="hostns", netns=path(n1.ns), ifname="pod0")
    assert_error(c, 4, "CNI_NETNS", "node")
    assert "pod0" not in n1.links() and not n1.allocated_to("hostns")
    # DEL with the node's namespace must not touch the node's own eth0.
    n1.delete("hostns", n1.ns)
    assert "eth0" in n1.links()


@pytest.mark.parametrize("stdin", [b"{", b"", b"\xff\xfe{}", b"[1, 2]", b"null",
                                   b'{"cniVersion": "1.0.0"} trailing'])
def test_undecodable_config_is_code_6(n1, pods, stdin):
    c = n1.call("ADD", stdin, cid="dec", netns=path(pods()))
    assert_error(c, 6)


@pytest.mark.parametrize(("patch", "key"), [
    ({"name": "bad name!"}, "name"),
    ({"type": None}, "type"),
    ({"mtu": "big"}, "mtu"),
    ({"mtu": 100}, "mtu"),
    ({"hairpinMode": "yes"}, "hairpinMode"),
    ({"ipMasq": 1}, "ipMasq"),
    ({"dns": "8.8.8.8"}, "dns"),
    ({"dns": {"nameservers": "8.8.8.8"}}, "dns.nameservers"),
    ({"ipam": {"type": "host-local"}}, "ipam"),
    ({"agentSocket": 5}, "agentSocket"),
    ({"cniVersion": None}, "cniVersion"),
    ({"prevResult": {"ips": "10.0.0.1"}}, "prevResult"),
    ({"prevResult": {"ips": [{"address": "nonsense"}]}}, "prevResult"),
])
def test_invalid_config_is_code_7_naming_the_key(n1, pods, patch, key):
    conf = {k: v for k, v in {**n1.conf(), **patch}.items() if v is not None}
    pod = pods()
    c = n1.call("ADD", conf, cid="cfg", netns=path(pod))
    assert_error(c, 7, key)
    assert not n1.allocated_to("cfg") and "eth0" not in ns_links(pod)


@pytest.mark.parametrize("version", ALL_VERSIONS)
def test_errors_are_in_the_requested_version(n1, pods, version):
    doc = assert_error(n1.call("ADD", n1.conf(version, mtu="x"), cid="ver", netns=path(pods())),
                       7, "mtu")
    assert doc["cniVersion"] == version


def test_a_node_without_a_subnet_yet_says_try_again_later(sb, pods):
    """flannel leaves pods stuck with "subnet.env missing"; we say what is going on."""
    if "n9" not in {h.name for h in sb.st.nodes}:
        sb.add_node("n9", wait=False, extra_args=["--etcd-prefix", "/nothing-here/"])
    n9 = Node(sb, "n9")
    pod = pods()

    wait_until(lambda: Path(n9.socket).exists(), 20, 0.1)
    c = n9.call("ADD", n9.conf(), cid="early", netns=path(pod))
    assert_error(c, 11, "try again later", "no pod subnet yet")
    assert_error(n9.call("STATUS", n9.conf("1.1.0")), 50, "not ready")
    assert "eth0" not in ns_links(pod)
    sb.stop_agent("n9")


def garbage(socket: str) -> list[bytes]:
    def doc(**kw: Any) -> bytes:
        return json.dumps({"cniVersion": "1.0.0", "name": "overlay", "type": "overlay",
                           "agentSocket": socket, **kw}).encode()

    return [b"", b"\x00\x01\x02", b"{" * 5000, b"[" * 100000, doc(cniVersion=1),
            doc(prevResult=3), doc(prevResult={"interfaces": [1]}), doc(name="bad name " * 40000),
            doc(dns={"nameservers": [{"a": 1}]}), doc(mtu=True), doc(hairpinMode=None)]


def _no_traceback(n1: Node, pod: str) -> None:
    for command in ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"):
        for stdin in garbage(n1.socket):
            c = n1.call(command, stdin, cid="junk", netns=path(pod))
            assert b"Traceback" not in c.stdout and b"Traceback" not in c.stderr, c.stderr
            if command == "VERSION":
                assert c.rc == 0 and "supportedVersions" in json.loads(c.stdout)
            elif command != "DEL" or c.rc != 0:
                doc = json.loads(c.stdout)
                assert c.rc != 0 and isinstance(doc["code"], int) and doc["msg"], doc


def test_never_a_traceback_on_stdout(n1, pods):
    _no_traceback(n1, pods())


# --- concurrency and durability ------------------------------------------------------------


def test_50_parallel_adds_get_50_addresses_and_50_dels_leave_nothing(sb, n1, pods):
    nss = [pods() for _ in range(50)]
    cids = [f"par{i}" for i in range(50)]
    veths_before = {n for n in n1.links() if n.startswith("veth")}
    with ThreadPoolExecutor(max_workers=50) as ex:
        adds = list(ex.map(lambda a: n1.call("ADD", n1.conf(), cid=a[0], netns=path(a[1])),
                           zip(cids, nss, strict=True)))
    assert [c.rc for c in adds] == [0] * 50, [c.stdout for c in adds if c.rc]
    ips = [pod_ip(json.loads(c.stdout)) for c in adds]
    assert len({ip.ip for ip in ips}) == 50
    assert all(ip.network == n1.subnet() for ip in ips)
    for ns, ip in zip(nss, ips, strict=True):
        got = ns_json(ns, "-4", "addr", "show", "eth0")[0]["addr_info"][0]
        assert f"{got['local']}/{got['prefixlen']}" == str(ip)
    assert len({n for n in n1.links() if n.startswith("veth")} - veths_before) == 50

    with ThreadPoolExecutor(max_workers=50) as ex:
        dels = list(ex.map(lambda a: n1.call("DEL", n1.conf(), cid=a[0], netns=path(a[1])),
                           zip(cids, nss, strict=True)))
    assert [c.rc for c in dels] == [0] * 50, [c.stdout for c in dels if c.rc]
    assert not [ip for ip, (c, _) in n1.allocations().items() if c in cids]
    assert {n for n in n1.links() if n.startswith("veth")} == veths_before
    assert all("eth0" not in ns_links(ns) for ns in nss)
    assert all(not ns_json(ns, "-4", "addr") or all(
        a["ifname"] == "lo" for a in ns_json(ns, "-4", "addr")) for ns in nss)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "crash"])
def test_allocations_survive_an_agent_restart(sb, n1, pods, sig):
    first = [(ns, *n1.add(ns)) for ns in (pods() for _ in range(5))]
    with agent_stopped(sb, "n1", sig):
        pass
    second = [(ns, *n1.add(ns)) for ns in (pods() for _ in range(5))]
    ips = [pod_ip(res).ip for _, _, res in first + second]
    assert len(set(ips)) == 10, ips
    for ns, cid, res in first:
        assert n1.allocated_to(cid) == [str(pod_ip(res).ip)]
        assert n1.check(cid, ns, res).rc == 0
    for ns, cid, _ in first + second:
        n1.delete(cid, ns)


def test_with_the_agent_down(sb, n1, pods):
    """VERSION works, ADD says "try again later", STATUS says 50; DEL succeeds and is
    recorded, and the agent completes it when it starts, before it serves anything."""
    pod, masq_pod, left = pods(), pods(), pods()
    cid, res = n1.add(pod)
    mcid, mres = n1.add(masq_pod, ipMasq=True)
    with agent_stopped(sb, "n1", signal.SIGKILL):
        assert n1.call("VERSION", {"cniVersion": "0.4.0"}).rc == 0
        c = n1.call("ADD", n1.conf(), cid="down", netns=path(left))
        assert_error(c, 11, "try again later", n1.socket)
        assert_error(n1.check(cid, pod, res), 11)
        assert_error(n1.call("STATUS", n1.conf("1.1.0")), 50)
        n1.delete(cid, pod)
        n1.delete(mcid, masq_pod, ipMasq=True)
        assert len(n1.pending()) == 2
        _no_traceback(n1, left)
        assert "eth0" not in ns_links(left)
    # Done by the restarted agent before it answered the readiness check.
    assert not n1.pending()
    assert not n1.allocated_to(cid) and not n1.allocated_to(mcid)
    links = n1.links()
    assert host_veth(res) not in links and host_veth(mres) not in links
    assert "eth0" not in ns_links(pod) and "eth0" not in ns_links(masq_pod)
    assert not n1.allocated_to("junk") and not n1.allocated_to("down")
    # The restarted agent does not masquerade the released address.
    assert str(pod_ip(mres).ip) not in n1.masq_set()
    assert n1.call("STATUS", n1.conf("1.1.0")).rc == 0


def test_a_del_recorded_while_the_agent_was_starting_is_done_before_the_next_request(
        n1, pods):
    """The plugin found no agent (here: a socket path nobody serves, in the agent's run
    dir) and recorded the DEL; the running agent completes it before its next request."""
    pod, other = pods(), pods()
    cid, res = n1.add(pod)
    absent = str(Path(n1.socket).parent / "absent.sock")
    n1.delete(cid, pod, agentSocket=absent)
    assert len(n1.pending()) == 1 and n1.allocated_to(cid)
    # The very same attachment again, as `podman restart` does: served after the DEL.
    _, again = n1.add(other, cid=cid)
    assert not n1.pending()
    assert host_veth(res) == host_veth(again) and "eth0" not in ns_links(pod)
    assert n1.allocated_to(cid) == [str(pod_ip(again).ip)]
    n1.delete(cid, other)
    assert not n1.allocated_to(cid)


def test_installed_plugin_and_conflist_work_for_a_runtime(sb, n1, pods, tmp_path):
    """`overlayctl install-cni` output, used as is: VERSION, then ADD/CHECK/DEL of the chain."""
    from overlay.sandbox.sandbox import tool

    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    p = subprocess.run([tool("overlayctl"), "install-cni", "--bin-dir", str(bin_dir),
                        "--conf-dir", str(conf_dir), "--agent-socket", n1.socket,
                        "--cni-version", "0.4.0"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    conflist = json.loads((conf_dir / "10-overlay.conflist").read_text())
    assert [pl["type"] for pl in conflist["plugins"]] == ["overlay", "portmap"]
    c = exec_plugin(str(bin_dir / "overlay"), "VERSION", {"cniVersion": "0.4.0"})
    assert c.rc == 0 and json.loads(c.stdout)["cniVersion"] == "0.4.0"
    net = NetworkList(conflist, f"{bin_dir}:{REFERENCE}", prefix=sb.exec_prefix(n1.ns))
    pod = pods()
    res = net.add("installed", path(pod), "eth0")
    assert pod_ip(res).network == n1.subnet()
    net.check("installed", path(pod), "eth0", res)
    net.delete("installed", path(pod), "eth0", res)
    assert not n1.allocated_to("installed")
    with pytest.raises(CniCallError) as ei:
        net.check("installed", path(pod), "eth0", res)
    assert ei.value.code == 110
