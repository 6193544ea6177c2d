from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from overlay.dataplane.devices import (
    BridgeSpec,
    LinkInfo,
    VxlanSpec,
    bridge_ops,
    stable_mac,
    vxlan_ops,
    vxlan_overhead,
)

SPEC = VxlanSpec("overlay.1", 1, 8472, IPv4Address("172.30.1.11"), 1450, "02:00:00:00:00:01",
                 IPv4Interface("10.244.1.0/32"), 2)


def link(**kw):
    base = dict(name="overlay.1", index=5, kind="vxlan", up=True, mtu=1450,
                mac="02:00:00:00:00:01", addresses=frozenset({IPv4Interface("10.244.1.0/32")}),
                vni=1, port=8472, local=IPv4Address("172.30.1.11"), learning=False,
                underlay_ifindex=2)
    base.update(kw)
    return LinkInfo(**base)


def test_stable_mac_is_unicast_local_and_stable():
    m = stable_mac("bridge:n1")
    assert m == stable_mac("bridge:n1") != stable_mac("bridge:n2")
    first = int(m[:2], 16)
    assert first & 1 == 0 and first & 2 == 2


def test_missing_device_is_created_addressed_and_up():
    assert [o.action for o in vxlan_ops(SPEC, None)] == ["create", "add_addr", "up"]


def test_compatible_device_is_kept():
    assert vxlan_ops(SPEC, link()) == []


def test_fixable_differences_are_fixed_in_place():
    ops = vxlan_ops(SPEC, link(mtu=1500, up=False, mac="02:00:00:00:00:09",
                               addresses=frozenset({IPv4Interface("10.244.9.0/32")})))
    assert [o.action for o in ops] == ["set_mtu", "set_mac", "del_addr", "add_addr", "up"]


def test_incompatible_device_is_recreated():
    for bad in (link(vni=2), link(port=4789), link(local=IPv4Address("1.1.1.1")),
                link(learning=True), link(kind="bridge")):
        ops = vxlan_ops(SPEC, bad)
        assert [o.action for o in ops][:2] == ["delete", "create"], bad


def test_bridge_gets_the_new_gateway_and_loses_the_old_one():
    spec = BridgeSpec("cni0", "02:00:00:00:00:aa", 1450, IPv4Interface("10.244.2.1/24"))
    have = LinkInfo("cni0", 3, "bridge", True, 1450, "02:00:00:00:00:aa",
                    frozenset({IPv4Interface("10.244.1.1/24")}))
    ops = bridge_ops(spec, have)
    assert [(o.action, str(o.value)) for o in ops] == [("del_addr", "10.244.1.1/24"),
                                                       ("add_addr", "10.244.2.1/24")]


def test_dual_stack_devices_get_an_address_per_family_and_keep_link_local_ones():
    v4, v6 = IPv4Interface("10.244.1.0/32"), IPv6Interface("fd00:0:0:1::/128")
    spec = VxlanSpec("overlay.1", 1, 8472, IPv6Address("fd30::1:11"), 1430,
                     "02:00:00:00:00:01", (v4, v6), 2)
    assert [(o.action, str(o.value)) for o in vxlan_ops(spec, None)][1:] == [
        ("add_addr", "10.244.1.0/32"), ("add_addr", "fd00:0:0:1::/128"), ("up", "None")]
    ll = IPv6Interface("fe80::1/64")
    have = link(local=IPv6Address("fd30::1:11"), mtu=1430,
                addresses=frozenset({v4, ll, IPv6Interface("fd00:0:0:9::/128")}))
    ops = vxlan_ops(spec, have)
    assert [(o.action, str(o.value)) for o in ops] == [("del_addr", "fd00:0:0:9::/128"),
                                                       ("add_addr", "fd00:0:0:1::/128")]
    bridge = BridgeSpec("cni0", "02:00:00:00:00:aa", 1430,
                        (IPv4Interface("10.244.1.1/24"), IPv6Interface("fd00:0:0:1::1/64")))
    have = LinkInfo("cni0", 3, "bridge", True, 1430, "02:00:00:00:00:aa",
                    frozenset(bridge.addresses) | {ll})
    assert bridge_ops(bridge, have) == []


def test_underlay_family_change_recreates_the_device():
    ops = vxlan_ops(SPEC, link(local=IPv6Address("fd30::1:11")))
    assert [o.action for o in ops][:2] == ["delete", "create"]


def test_vxlan_overhead_is_50_over_ipv4_and_70_over_ipv6():
    assert (vxlan_overhead(4), vxlan_overhead(6)) == (50, 70)


def test_overlay_mtu_follows_the_underlay_family_and_flannels_backend_mtu():
    from ipaddress import IPv4Network, IPv6Network

    import pytest

    from overlay.agent.agent import overlay_mtu
    from overlay.dataplane.kernel import Underlay
    from overlay.errors import ConfigError
    from overlay.model import NetworkConfig

    v4 = Underlay("eth0", 2, IPv4Address("172.30.1.11"), 1500, IPv4Network("172.30.0.0/16"))
    v6 = Underlay("eth0", 2, IPv6Address("fd30::1:11"), 1500, IPv6Network("fd30::/64"))
    cfg = NetworkConfig(IPv4Network("10.244.0.0/16"))
    assert (overlay_mtu(cfg, v4, None), overlay_mtu(cfg, v6, None)) == (1450, 1430)
    assert overlay_mtu(NetworkConfig(IPv4Network("10.244.0.0/16"), mtu=9000), v4, None) == 8950
    assert overlay_mtu(cfg, v4, 1400) == 1400
    dual = NetworkConfig(IPv4Network("10.244.0.0/16"), ipv6_network=IPv6Network("fd00::/48"),
                         mtu=1300)
    with pytest.raises(ConfigError, match="below 1280"):
        overlay_mtu(dual, v4, None)
