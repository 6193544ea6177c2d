from ipaddress import IPv4Address, IPv4Interface

from overlay.dataplane.devices import (
    BridgeSpec,
    LinkInfo,
    VxlanSpec,
    bridge_ops,
    stable_mac,
    vxlan_ops,
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
