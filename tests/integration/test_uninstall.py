"""`overlayctl uninstall` on a sandbox node: what is there before, nothing after.

The node is left the way a crash or `kubectl delete` leaves it (overlayd
killed: devices, entries, both nftables tables, files and the lease in
place), with a pod still attached, the plugin and the conflist installed, and
a DEL the plugin recorded while the agent was down.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_until

from overlay.cni.install import InstallOptions, install
from overlay.devnames import host_veth_name
from overlay.sandbox.sandbox import Sandbox, tool

pytestmark = pytest.mark.integration


def leftovers(sb: Sandbox, node: str, bin_dir: Path) -> dict[str, list[str]]:
    """What of overlay a person would find on the node, by looking with the usual tools."""
    ns = sb.node(node).netns
    links = json.loads(sb.run_in(ns, "ip", "-j", "-d", "link", "show").stdout)
    ours = sorted(str(lk["ifname"]) for lk in links
                  if str(lk["ifname"]).startswith(("overlay.", "cni0", "veth")))
    tables = sorted(line for line in sb.run_in(ns, "nft", "list", "tables").stdout.decode()
                    .splitlines() if "overlay" in line)
    d = sb.node_dir(node)
    files = sorted(str(p) for p in (bin_dir / "overlay", d / "net.d" / "10-overlay.conflist",
                                    d / "run", d / "state") if p.exists())
    files += sorted(str(p) for p in (d / "run" / "cni-pending").glob("*.req"))
    keys = sb.etcdctl("get", "--prefix", "/overlay/subnets/").stdout.decode()
    lease = [line for line in keys.splitlines() if f'"node": "{node}"' in line
             or f'"node":"{node}"' in line]
    return {"links": ours, "nft": tables, "files": files, "lease": lease}


def uninstall(sb: Sandbox, node: str, bin_dir: Path, *extra: str
              ) -> subprocess.CompletedProcess[bytes]:
    d = sb.node_dir(node)
    return sb.run_in(sb.node(node).netns, tool("overlayctl"), "uninstall",
                     "--bin-dir", str(bin_dir), "--conf-dir", str(d / "net.d"),
                     "--run-dir", str(d / "run"), "--state-dir", str(d / "state"),
                     "--etcd-endpoints", sb.etcd_endpoints(), *extra, check=False)


def test_uninstall_removes_everything_and_peers_forget_the_node(
        make_sandbox: Callable[..., Sandbox]) -> None:
    sb = make_sandbox(nodes=2, pods_per_node=2, agent_args=["--ip-masq"])
    bin_dir = sb.node_dir("n1") / "bin"
    install(InstallOptions(bin_dir=bin_dir, conf_dir=sb.node_dir("n1") / "net.d",
                           agent_socket=str(sb.cni_socket("n1"))))
    n1_subnet = str(sb.status("n1").self.subnet)

    # While overlayd runs: refused, nothing touched.
    before_running = leftovers(sb, "n1", bin_dir)
    p = uninstall(sb, "n1", bin_dir)
    assert p.returncode == 1, p
    assert b"overlayd is running" in p.stderr and b"stop it first" in p.stderr, p.stderr
    assert leftovers(sb, "n1", bin_dir) == before_running

    sb.stop_agent("n1", signal.SIGKILL)
    # The runtime removes a pod while the agent is down: the plugin records the DEL.
    gone = sb.pod("n1-p2")
    sb.del_pod(gone.name)
    # The kernel destroys the pod's veth pair with its namespace, a moment later.
    veth = host_veth_name(gone.container_id, gone.ifname)
    wait_until(lambda: veth not in leftovers(sb, "n1", bin_dir)["links"], 15, 0.2)
    # What a dual-stack node's masquerading leaves beside the IPv4 table (this sandbox
    # is IPv4 only): the same table in family ip6.
    sb.run_in(sb.node("n1").netns, "nft", "add", "table", "ip6", "overlay")
    before = leftovers(sb, "n1", bin_dir)
    print("before:", json.dumps(before, indent=1))
    assert any(t.endswith("table ip6 overlay") for t in before["nft"])
    assert {"overlay.1", "cni0"} <= set(before["links"])
    assert any(name.startswith("veth") for name in before["links"])  # the pod's
    assert any("table ip overlay_vxlan" in t for t in before["nft"])
    assert any(t.endswith("table ip overlay") for t in before["nft"])
    assert len(before["files"]) == 5 and len(before["lease"]) == 1
    assert before["files"][-1].endswith(".req"), before["files"]

    dry = uninstall(sb, "n1", bin_dir, "--dry-run")
    assert dry.returncode == 0, dry
    assert leftovers(sb, "n1", bin_dir) == before
    planned = dry.stdout.decode()
    for what in ("VXLAN device overlay.1", "pod bridge cni0", "pod veth veth",
                 "nftables table ip overlay_vxlan", "nftables table ip overlay\n",
                 "nftables table ip6 overlay\n",
                 "10-overlay.conflist", "cni-pending/ (1 DEL/GC",
                 f"subnets/{n1_subnet.replace('/', '-')}"):
        assert what in planned, (what, planned)

    p = uninstall(sb, "n1", bin_dir)
    print(p.stdout.decode(), p.stderr.decode())
    assert p.returncode == 0, p
    after = leftovers(sb, "n1", bin_dir)
    print("after:", json.dumps(after, indent=1))
    assert after == {"links": [], "nft": [], "files": [], "lease": []}

    # The peer drops its route to n1's subnet at once (not after the lease TTL).
    def n2_forgot() -> bool:
        routes = sb.run_in(sb.node("n2").netns, "ip", "route", "show", n1_subnet).stdout
        return not routes.strip()
    wait_until(n2_forgot, 15, 0.2)

    # A second run finds nothing and says so.
    again = uninstall(sb, "n1", bin_dir)
    assert again.returncode == 0 and b"nothing of overlay on this node" in again.stdout, again
