"""The tables of `overlayctl status`, `sandbox status` and `sandbox watch` on every pod family.

The documents are shaped as the agent's status JSON makes them
(overlay.agent.localclient.status_json): "subnet" is the node's IPv4 subnet, or its IPv6
one on an IPv6-only cluster; "ipv6Subnet" is the IPv6 one whenever there is one."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from overlay.ctl.render import peer_row, subnets_text, watch_frame
from overlay.ctl.sandbox_cmd import print_status

V4, V6 = "10.244.1.0/24", "fd00:10:244:1::/64"
FAMILIES = {  # (subnet, ipv6Subnet) as status_json gives them, and the cell a user reads
    "ipv4": (V4, None, V4),
    "dual": (V4, V6, f"{V4}, {V6}"),
    "ipv6": (V6, V6, V6),
}


def test_subnets_text_names_each_subnet_once():
    assert subnets_text(V4, None) == V4
    assert subnets_text(V4, V6) == f"{V4}, {V6}"
    assert subnets_text(V6, V6) == V6
    assert subnets_text(None, None) == "-"
    assert subnets_text(V4, V6, " and ") == f"{V4} and {V6}"


def peer(subnet: str | None, subnet6: str | None) -> dict[str, Any]:
    return {"name": "n2", "subnet": subnet, "ipv6Subnet": subnet6, "underlayIP": "172.30.0.2",
            "state": "alive", "programmed": True, "inEtcd": True, "source": "etcd",
            "direct": False, "grpcRttUs": 250, "tunnelRttUs": None, "sinceUnixMs": 0}


def node(name: str, subnet: str | None, subnet6: str | None) -> dict[str, Any]:
    return {"name": name, "process": "running", "ready": True, "subnet": subnet,
            "ipv6Subnet": subnet6, "error": None, "peers": {}}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_watch_frame_shows_every_subnet_of_a_node(family):
    subnet, subnet6, cell = FAMILIES[family]
    doc = {"name": "demo", "time": 0, "etcd": {"running": 1, "members": 1, "down": []},
           "faults": {"lossPercent": 0, "partitioned": [], "bandwidth": {}, "poweredOff": []},
           "nodes": [node("n1", subnet, subnet6),
                     {"name": "n2", "process": "not running", "ready": False, "subnet": None,
                      "ipv6Subnet": None, "error": None, "peers": {}}]}
    lines = watch_frame(doc).splitlines()
    assert lines[2].startswith("n1") and f"  {cell}  " in lines[2], lines
    assert lines[3].split()[:5] == ["n2", "not", "running", "-", "-"], lines


def test_a_watch_frame_from_a_document_without_ipv6_subnet_still_renders():
    # `lab.views` documents from before the field (a script may build its own).
    doc = {"name": "demo", "time": 0, "etcd": {"running": 1, "members": 1, "down": []},
           "faults": {"lossPercent": 0, "partitioned": [], "bandwidth": {}, "poweredOff": []},
           "nodes": [{"name": "n1", "process": "running", "ready": True, "subnet": V4,
                      "error": None, "peers": {}}]}
    assert watch_frame(doc).splitlines()[2].split() == ["n1", "running", "yes", V4, "-"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peer_row_shows_every_subnet_of_the_peer(family):
    subnet, subnet6, cell = FAMILIES[family]
    assert peer_row(peer(subnet, subnet6))[:3] == ("n2", cell, "172.30.0.2")


@pytest.mark.parametrize("family", FAMILIES)
def test_sandbox_status_shows_every_subnet_of_each_node_and_address_of_each_pod(family):
    subnet, subnet6, cell = FAMILIES[family]
    ip, ip6 = {"ipv4": ("10.244.1.2", None), "dual": ("10.244.1.2", "fd00:10:244:1::2"),
               "ipv6": ("fd00:10:244:1::2", "fd00:10:244:1::2")}[family]
    doc = {"name": "demo", "etcdEndpoints": "http://172.30.1.1:2379", "clusterCIDR": "-",
           "nodes": [{"name": "n1", "namespace": "demo-n1", "underlayIP": "172.30.0.1",
                      "subnet": subnet, "ipv6Subnet": subnet6, "ready": True,
                      "peers": [peer(subnet, subnet6)]}],
           "pods": [{"name": "n1-p1", "node": "n1", "namespace": "demo-n1-p1", "ip": ip,
                     "ipv6": ip6}]}
    out = io.StringIO()
    print_status(doc, out)
    rows = [re.split(r"\s{2,}", x) for x in out.getvalue().splitlines()]  # cells: 2+ spaces
    assert ["n1", "demo-n1", "172.30.0.1", cell, "yes", "1 (1)"] in rows, rows
    assert ["n1", "n2", cell, "172.30.0.2", "alive", "0.25ms", "-", "-", "yes"] in rows, rows
    assert ["n1-p1", "n1", subnets_text(ip, ip6), "demo-n1-p1"] in rows, rows
