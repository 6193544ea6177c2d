"""The hand-made rtnetlink requests of a pod start, read back with pyroute2's parsers."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from overlay.cni import podlink
from overlay.dataplane.rtnl import split


def parse(cls, data: bytes):  # type: ignore[no-untyped-def]
    msg = cls(data)
    msg.decode()
    return msg


def test_new_veth_is_what_ip_link_add_sends():
    data = podlink.new_veth("vethabc", "02:00:00:00:00:01", "eth0", "02:00:00:00:00:02", 1400,
                            7, 42)
    m = parse(ifinfmsg, data)
    assert m["header"]["type"] == podlink.RTM_NEWLINK
    assert m["header"]["flags"] & 0x600 == 0x600  # create, exclusive
    assert m["flags"] & 1 and m["change"] & 1
    assert (m.get("IFLA_IFNAME"), m.get("IFLA_ADDRESS"), m.get("IFLA_MTU"),
            m.get("IFLA_MASTER")) == ("vethabc", "02:00:00:00:00:01", 1400, 7)
    info = m.get("IFLA_LINKINFO")
    assert info.get("IFLA_INFO_KIND") == "veth"
    peer = info.get("IFLA_INFO_DATA").get("VETH_INFO_PEER")
    assert (peer.get("IFLA_IFNAME"), peer.get("IFLA_ADDRESS"), peer.get("IFLA_MTU"),
            peer.get("IFLA_NET_NS_FD")) == ("eth0", "02:00:00:00:00:02", 1400, 42)
    assert peer["flags"] == 0  # a veth end cannot open before its pair exists


def test_configure_is_link_up_address_and_default_route_in_one_batch():
    data = podlink.configure(3, [(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1"))],
                             seq=1)
    up, addr, route = (bytes(data[off:off + n]) for off, n in _offsets(data))
    m = parse(ifinfmsg, up)
    assert (m["index"], m["flags"] & 1, m["change"] & 1) == (3, 1, 1)
    a = parse(ifaddrmsg, addr)
    assert (a["index"], a["prefixlen"], a.get("IFA_LOCAL"), a.get("IFA_ADDRESS")) == (
        3, 24, "10.244.1.5", "10.244.1.5")
    r = parse(rtmsg, route)
    assert (r["dst_len"], r["table"], r.get("RTA_GATEWAY"), r.get("RTA_OIF")) == (
        0, 254, "10.244.1.1", 3)
    # Only the last asks for an ack: errors are answered anyway, by sequence number.
    assert [(m.seq, bool(m.flags & 4)) for m in split(data)] == [(1, False), (2, False),
                                                                  (3, True)]


def test_dual_stack_configure_adds_both_addresses_then_both_routes():
    from ipaddress import IPv6Address, IPv6Interface

    pairs = [(IPv4Interface("10.244.1.5/24"), IPv4Address("10.244.1.1")),
             (IPv6Interface("fd00:0:0:1::5/64"), IPv6Address("fd00:0:0:1::1"))]
    data = podlink.configure(3, pairs, seq=7)
    parts = [bytes(data[off:off + n]) for off, n in _offsets(data)]
    assert len(parts) == 5
    a6 = parse(ifaddrmsg, parts[2])
    assert (a6["family"], a6["prefixlen"], a6["flags"] & podlink.IFA_F_NODAD,
            a6.get("IFA_LOCAL")) == (10, 64, podlink.IFA_F_NODAD, "fd00:0:0:1::5")
    r6 = parse(rtmsg, parts[4])
    assert (r6["family"], r6["dst_len"], r6.get("RTA_GATEWAY")) == (10, 0, "fd00:0:0:1::1")
    assert [(m.seq, bool(m.flags & 4)) for m in split(data)] == [
        (7, False), (8, False), (9, False), (10, False), (11, True)]
    assert podlink.configure_steps(pairs, 7)[9] == "add address fd00:0:0:1::5/64"
    # the retry after lifting disable_ipv6: the IPv6 part alone, the link already up
    assert len(list(split(podlink.configure(3, pairs[1:], seq=1, up=False)))) == 2


def test_hairpin_sets_the_bridge_port_mode():
    m = parse(ifinfmsg, podlink.hairpin(9))
    assert (m["family"], m["index"]) == (podlink.AF_BRIDGE, 9)
    assert m.get("IFLA_PROTINFO").get("IFLA_BRPORT_MODE") == 1


def _offsets(data: bytes) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < len(data):
        n = int.from_bytes(data[off:off + 4], "little")
        out.append((off, n))
        off += (n + 3) & ~3
    return out
