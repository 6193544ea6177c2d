"""Our own device names: one source, used by everything that must recognise them."""

from __future__ import annotations

import pytest

from overlay.devnames import (
    BRIDGE_NAME,
    HOST_VETH_RE,
    IFNAMSIZ,
    host_veth_name,
    is_node_device,
    is_vxlan_device,
    vxlan_name,
)


def test_vxlan_names_fit_ifnamsiz():
    assert vxlan_name(1) == "overlay.1"
    assert vxlan_name(9_999_999) == "overlay.9999999"
    assert vxlan_name(10_000_000) == "ovl.10000000"
    assert len(vxlan_name(16_777_215)) <= IFNAMSIZ


@pytest.mark.parametrize("vni", [1, 42, 9_999_999, 10_000_000, 16_777_215])
def test_every_vxlan_name_is_recognised(vni):
    assert is_vxlan_device(vxlan_name(vni)) and is_node_device(vxlan_name(vni))


@pytest.mark.parametrize("name", ["eth0", "lo", "overlay", "overlay.", "ovl.x", "ovl0",
                                  "cni1", "docker0", "overlay.1x"])
def test_the_hosts_devices_are_not_ours(name):
    assert not is_node_device(name)


def test_bridge_and_host_veths():
    assert is_node_device(BRIDGE_NAME) and BRIDGE_NAME == "cni0"
    name = host_veth_name("c1", "eth0")
    assert HOST_VETH_RE.match(name) and len(name) <= IFNAMSIZ
    assert name == host_veth_name("c1", "eth0") != host_veth_name("c1", "eth1")
