"""The hand-made netlink messages, checked against pyroute2's own decoders and encoders."""

import socket
import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from overlay.dataplane import rtnl
from overlay.dataplane.desired import Fdb, Neigh, Op, Route

IFINDEX = 7
ROUTE = Route(IPv4Network("10.244.9.0/24"), IPv4Address("10.244.9.0"))
NEIGH = Neigh(IPv4Address("10.244.9.0"), "02:aa:bb:cc:dd:ee")
FDB = Fdb("02:aa:bb:cc:dd:ee", IPv4Address("172.30.1.12"))


def header(buf):
    return struct.unpack_from("=IHHII", buf, 0)


def decoded(cls, buf):
    m = cls(buf)
    m.decode()
    return m


def test_add_route_is_a_replace_onlink_with_our_protocol_in_the_main_table():
    buf = rtnl.encode_op(Op("add", ROUTE), IFINDEX, seq=41)
    length, mtype, flags, seq, _ = header(buf)
    assert (length, mtype, seq) == (len(buf), rtnl.RTM_NEWROUTE, 41)
    assert flags == rtnl.NLM_F_REQUEST | rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE
    m = decoded(rtmsg, buf)
    assert (m["family"], m["dst_len"], m["table"], m["proto"]) == (socket.AF_INET, 24, 254, 0x9F)
    assert m["flags"] == rtnl.RTNH_F_ONLINK and m["type"] == rtnl.RTN_UNICAST
    assert m.get_attr("RTA_DST") == "10.244.9.0"
    assert m.get_attr("RTA_GATEWAY") == "10.244.9.0"
    assert m.get_attr("RTA_OIF") == IFINDEX


def test_del_route_matches_any_scope_but_only_our_protocol_on_our_device():
    buf = rtnl.encode_op(Op("del", ROUTE), IFINDEX, seq=1, ack=True)
    _, mtype, flags, _, _ = header(buf)
    assert mtype == rtnl.RTM_DELROUTE and flags == rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK
    m = decoded(rtmsg, buf)
    assert m["scope"] == rtnl.RT_SCOPE_NOWHERE and m["proto"] == 0x9F
    assert m.get_attr("RTA_OIF") == IFINDEX and m.get_attr("RTA_GATEWAY") is None


def test_add_neigh_is_a_permanent_replace():
    buf = rtnl.encode_op(Op("add", NEIGH), IFINDEX, seq=2)
    _, mtype, flags, _, _ = header(buf)
    assert mtype == rtnl.RTM_NEWNEIGH
    assert flags == rtnl.NLM_F_REQUEST | rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE
    m = decoded(ndmsg, buf)
    assert (m["family"], m["ifindex"], m["state"]) == (socket.AF_INET, IFINDEX, 0x80)
    assert m.get_attr("NDA_DST") == "10.244.9.0"
    assert m.get_attr("NDA_LLADDR") == "02:aa:bb:cc:dd:ee"


def test_fdb_add_is_a_self_permanent_append_on_the_bridge_family():
    buf = rtnl.encode_op(Op("add", FDB), IFINDEX, seq=3)
    _, mtype, flags, _, _ = header(buf)
    assert mtype == rtnl.RTM_NEWNEIGH
    assert flags == rtnl.NLM_F_REQUEST | rtnl.NLM_F_CREATE | rtnl.NLM_F_APPEND
    m = decoded(ndmsg, buf)
    assert (m["family"], m["ifindex"], m["flags"]) == (rtnl.AF_BRIDGE, IFINDEX, rtnl.NTF_SELF)
    assert m["state"] & rtnl.NUD_PERMANENT
    assert m.get_attr("NDA_LLADDR") == "02:aa:bb:cc:dd:ee"
    assert m.get_attr("NDA_DST") == "172.30.1.12"


def test_deletes_name_the_entry_by_key():
    n = decoded(ndmsg, rtnl.encode_op(Op("del", NEIGH), IFINDEX, seq=4))
    assert n["header"]["type"] == rtnl.RTM_DELNEIGH and n.get_attr("NDA_DST") == "10.244.9.0"
    f = decoded(ndmsg, rtnl.encode_op(Op("del", FDB), IFINDEX, seq=5))
    assert f["header"]["type"] == rtnl.RTM_DELNEIGH and f["family"] == rtnl.AF_BRIDGE
    assert f.get_attr("NDA_DST") == "172.30.1.12"


macs = st.binary(min_size=5, max_size=5).map(lambda b: (b"\x02" + b).hex(":"))
addrs = st.integers(0, 2**32 - 1).map(IPv4Address)
nets = st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)).map(
    lambda t: IPv4Network(t, strict=False))


@given(nets, addrs, addrs, macs)
def test_what_we_send_decodes_back_to_the_same_entry(net, via, dst, mac):
    """A dump reply has the layout of the request that made the entry."""
    cases = [(Route(net, via), rtnl.decode_route),
             (Fdb(mac, dst), rtnl.decode_fdb)]
    if not (via.is_multicast or via.is_link_local):  # the kernel's own, skipped on purpose
        cases.append((Neigh(via, mac), rtnl.decode_neigh))
    for entry, decode in cases:
        [msg] = rtnl.split(rtnl.encode_op(Op("add", entry), IFINDEX, seq=9))
        assert decode(msg.payload, IFINDEX) == entry
        assert decode(msg.payload, IFINDEX + 1) is None


def kernel_route(**kw):
    """A route as the kernel would dump it, encoded by pyroute2."""
    m = rtmsg()
    m["family"] = socket.AF_INET
    m["dst_len"] = kw.get("dst_len", 24)
    m["table"] = kw.get("table", 254)
    m["proto"] = kw.get("proto", 0x9F)
    m["type"] = 1
    m["attrs"] = [(k, v) for k, v in (("RTA_TABLE", kw.get("rta_table")),
                                      ("RTA_DST", kw.get("dst", "10.244.9.0")),
                                      ("RTA_GATEWAY", kw.get("gw", "10.244.9.0")),
                                      ("RTA_OIF", kw.get("oif", IFINDEX))) if v is not None]
    m.encode()
    return bytes(m.data[16:])


def test_route_decoder_keeps_only_our_routes_on_our_device():
    assert rtnl.decode_route(kernel_route(), IFINDEX) == ROUTE
    assert rtnl.decode_route(kernel_route(rta_table=254, table=252), IFINDEX) == ROUTE
    assert rtnl.decode_route(kernel_route(rta_table=100), IFINDEX) is None
    assert rtnl.decode_route(kernel_route(proto=4), IFINDEX) is None  # static, by an operator
    assert rtnl.decode_route(kernel_route(oif=3), IFINDEX) is None
    assert rtnl.decode_route(kernel_route(gw=None), IFINDEX) is None
    default = kernel_route(dst=None, dst_len=0)
    assert rtnl.decode_route(default, IFINDEX) == Route(IPv4Network("0.0.0.0/0"), ROUTE.via)


def kernel_neigh(family=socket.AF_INET, state=0x80, dst="10.244.9.0",
                 lladdr="02:AA:BB:CC:DD:EE", ifindex=IFINDEX):
    m = ndmsg()
    m["family"], m["ifindex"], m["state"] = family, ifindex, state
    m["attrs"] = [(k, v) for k, v in (("NDA_DST", dst), ("NDA_LLADDR", lladdr)) if v]
    m.encode()
    return bytes(m.data[16:])


def test_the_kernels_own_ipv6_neighbours_are_not_ours():
    for dst in ("ff02::16", "fe80::1"):
        nd = kernel_neigh(family=socket.AF_INET6, state=0x40, dst=dst, lladdr="33:33:00:00:00:16")
        assert rtnl.decode_neigh(nd, IFINDEX) is None
    ours = kernel_neigh(family=socket.AF_INET6, dst="fd00:0:0:9::")
    assert rtnl.decode_neigh(ours, IFINDEX) == Neigh(IPv6Address("fd00:0:0:9::"),
                                                     "02:aa:bb:cc:dd:ee")


def test_neigh_decoder():
    assert rtnl.decode_neigh(kernel_neigh(), IFINDEX) == NEIGH
    stale = rtnl.decode_neigh(kernel_neigh(state=0x04), IFINDEX)
    assert stale == Neigh(NEIGH.ip, NEIGH.mac, permanent=False)
    assert rtnl.decode_neigh(kernel_neigh(lladdr=None), IFINDEX) is None  # incomplete
    assert rtnl.decode_neigh(kernel_neigh(ifindex=2), IFINDEX) is None
    assert rtnl.decode_neigh(kernel_neigh(family=rtnl.AF_BRIDGE), IFINDEX) is None


def test_fdb_decoder_reads_both_underlay_families_and_skips_other_devices():
    fdb = kernel_neigh(family=rtnl.AF_BRIDGE, dst="172.30.1.12")
    assert rtnl.decode_fdb(fdb, IFINDEX) == FDB
    assert rtnl.decode_fdb(kernel_neigh(family=rtnl.AF_BRIDGE, dst="fd30::1"), IFINDEX) == \
        Fdb(FDB.mac, IPv6Address("fd30::1"))
    assert rtnl.decode_fdb(kernel_neigh(family=rtnl.AF_BRIDGE, dst=None), IFINDEX) is None
    assert rtnl.decode_fdb(kernel_neigh(family=rtnl.AF_BRIDGE, ifindex=3), IFINDEX) is None


def error_msg(code, seq, text="", capped=True):
    request = struct.pack("=IHHII", 44, rtnl.RTM_NEWROUTE, 5, seq, 0)
    payload = struct.pack("=i", -code) + request
    flags = 0
    if not capped:
        payload += b"\0" * 28  # the rest of the echoed request
    else:
        flags |= rtnl.NLM_F_CAPPED
    if text:
        raw = text.encode() + b"\0"
        attr = struct.pack("=HH", 4 + len(raw), rtnl.NLMSGERR_ATTR_MSG) + raw
        payload += attr + b"\0" * (-len(attr) & 3)
        flags |= rtnl.NLM_F_ACK_TLVS
    return struct.pack("=IHHII", 16 + len(payload), rtnl.NLMSG_ERROR, flags, seq, 123) + payload


def test_split_and_parse_errors_with_and_without_extended_ack():
    buf = (error_msg(0, 10) + error_msg(22, 11, "Invalid flags for nexthop")
           + error_msg(19, 12, "unknown ifindex", capped=False) + error_msg(17, 13))
    msgs = list(rtnl.split(buf))
    assert [m.seq for m in msgs] == [10, 11, 12, 13]
    assert [rtnl.parse_error(m) for m in msgs] == [
        (0, 10, ""), (22, 11, "Invalid flags for nexthop"), (19, 12, "unknown ifindex"),
        (17, 13, "")]


def test_split_refuses_a_truncated_message():
    buf = error_msg(0, 1)
    with pytest.raises(ValueError, match="truncated"):
        list(rtnl.split(buf[:-4]))


def test_batch_replies_name_failures_by_sequence_and_end_at_the_last_ack():
    r = rtnl.BatchReplies(first_seq=100, last_seq=104, failures={})
    for seq, code in ((99, 22), (101, 17), (103, 22)):  # 99: a late reply to an older batch
        [m] = rtnl.split(error_msg(code, seq, "bad" if code == 22 else ""))
        r.feed(m)
    assert r.failures == {101: (17, ""), 103: (22, "bad")} and not r.done
    [ack] = rtnl.split(error_msg(0, 104))
    r.feed(ack)
    assert r.done and set(r.failures) == {101, 103}


def test_a_failing_last_request_also_ends_the_batch():
    r = rtnl.BatchReplies(first_seq=1, last_seq=2, failures={})
    [m] = rtnl.split(error_msg(2, 2))
    r.feed(m)
    assert r.done and r.failures == {2: (2, "")}


def test_dump_requests_carry_the_filters():
    route = decoded(rtmsg, rtnl.encode_dump("route", IFINDEX, seq=5))
    assert route["header"]["flags"] == rtnl.NLM_F_REQUEST | rtnl.NLM_F_DUMP
    assert (route["table"], route["proto"]) == (254, 0x9F)
    assert route.get_attr("RTA_OIF") == IFINDEX
    neigh = decoded(ndmsg, rtnl.encode_dump("neigh", IFINDEX, seq=6))
    assert neigh["ifindex"] == 0 and neigh.get_attr("NDA_IFINDEX") == IFINDEX
    fdb = decoded(ndmsg, rtnl.encode_dump("fdb", IFINDEX, seq=7))
    assert (fdb["family"], fdb["ifindex"]) == (rtnl.AF_BRIDGE, IFINDEX)
    with pytest.raises(ValueError):
        rtnl.encode_dump("addr", IFINDEX, 1)


def test_done_carries_the_error_of_a_failed_dump():
    ok = rtnl.Message(rtnl.NLMSG_DONE, 2, 1, struct.pack("=i", 0))
    bad = rtnl.Message(rtnl.NLMSG_DONE, 2, 1, struct.pack("=i", -16))
    assert rtnl.done_error(ok) == 0 and rtnl.done_error(bad) == 16
    assert rtnl.done_error(rtnl.Message(rtnl.NLMSG_DONE, 2, 1, b"")) == 0


# --- notifications that may mean drift ---------------------------------------------------

WATCHED = rtnl.Watched(vxlan=IFINDEX, bridge=8, vxlan_mtu=1450, bridge_mtu=1450,
                       vxlan_mac="02:00:00:00:00:01", bridge_mac="02:00:00:00:00:aa",
                       cluster=IPv4Network("10.244.0.0/16"))


def notification(mtype, body):
    return next(rtnl.split(struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body))


def link_msg(mtype, index, up=True, mtu=1450, mac="02:00:00:00:00:01"):
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    m = ifinfmsg()
    m["index"], m["flags"] = index, 1 if up else 0
    m["attrs"] = [("IFLA_MTU", mtu), ("IFLA_ADDRESS", mac)]
    m.encode()
    return notification(mtype, bytes(m.data[16:m["header"]["length"]]))


def as_notification(op):
    buf = rtnl.encode_op(op, IFINDEX, 1)
    mtype = header(buf)[1]
    return notification(mtype, buf[16:])


def test_changes_to_our_devices_and_entries_are_drift():
    assert rtnl.drift(link_msg(rtnl.RTM_DELLINK, IFINDEX), WATCHED)
    assert rtnl.drift(link_msg(rtnl.RTM_NEWLINK, IFINDEX, up=False), WATCHED)
    assert "MTU" in rtnl.drift(link_msg(rtnl.RTM_NEWLINK, IFINDEX, mtu=1400), WATCHED)
    assert "MAC" in rtnl.drift(link_msg(rtnl.RTM_NEWLINK, 8, mac="02:00:00:00:00:01"), WATCHED)
    assert rtnl.drift(link_msg(rtnl.RTM_DELLINK, 8), WATCHED)
    for op in (Op("del", FDB), Op("del", NEIGH), Op("del", ROUTE), Op("add", NEIGH)):
        assert rtnl.drift(as_notification(op), WATCHED), op
    addr = struct.pack("=BBBBi", socket.AF_INET, 24, 0, 0, 8)
    assert rtnl.drift(notification(rtnl.RTM_DELADDR, addr), WATCHED)


def test_a_route_into_the_cluster_moved_to_another_device_is_drift():
    buf = bytearray(rtnl.encode_op(Op("add", ROUTE), 99, 1))
    assert rtnl.drift(notification(header(buf)[1], bytes(buf[16:])), WATCHED)


def test_what_changes_all_the_time_and_is_not_ours_is_not_drift():
    # A pod's veth comes and goes; the bridge gains a port and stays as it was.
    assert not rtnl.drift(link_msg(rtnl.RTM_NEWLINK, 30, mac="0a:58:00:00:00:01"), WATCHED)
    assert not rtnl.drift(link_msg(rtnl.RTM_DELLINK, 30), WATCHED)
    assert not rtnl.drift(link_msg(rtnl.RTM_NEWLINK, 8, mac="02:00:00:00:00:aa"), WATCHED)
    # The bridge learns a pod's MAC on its port; an unrelated route elsewhere.
    bridge_fdb = rtnl.encode_op(Op("add", FDB), 30, 1)
    assert not rtnl.drift(notification(header(bridge_fdb)[1], bridge_fdb[16:]), WATCHED)
    other = Route(IPv4Network("192.168.5.0/24"), IPv4Address("192.168.5.1"))
    buf = rtnl.encode_op(Op("add", other), 99, 1)
    assert not rtnl.drift(notification(header(buf)[1], buf[16:]), WATCHED)
    addr = struct.pack("=BBBBi", socket.AF_INET, 24, 0, 0, 30)
    assert not rtnl.drift(notification(rtnl.RTM_NEWADDR, addr), WATCHED)
    # IPv6 neighbour discovery on our device when it comes up.
    nd = struct.pack("=BBHiHBB", socket.AF_INET6, 0, 0, IFINDEX, 0x2, 0, 1)
    assert not rtnl.drift(notification(rtnl.RTM_NEWNEIGH, nd), WATCHED)
    nd = kernel_neigh(family=socket.AF_INET6, state=0x02, dst="fe80::1")
    assert not rtnl.drift(notification(rtnl.RTM_NEWNEIGH, nd), WATCHED)


@given(st.binary(max_size=64), st.sampled_from([16, 17, 20, 21, 24, 25, 28, 29]))
def test_garbage_notifications_never_raise(body, mtype):
    rtnl.drift(rtnl.Message(mtype, 0, 0, body), WATCHED)


# --- IPv6 and direct routes ----------------------------------------------------------------

ROUTE6 = Route(IPv6Network("fd00:0:0:9::/64"), IPv6Address("fd00:0:0:9::"))
NEIGH6 = Neigh(IPv6Address("fd00:0:0:9::"), "02:aa:bb:cc:dd:ee")
FDB6 = Fdb("02:aa:bb:cc:dd:ee", IPv6Address("fd30::1:12"))
DIRECT = Route(IPv4Network("10.244.9.0/24"), IPv4Address("172.30.1.12"), direct=True)
UNDERLAY = 2


def test_ipv6_route_and_neighbour_are_the_ip_minus_6_requests():
    m = decoded(rtmsg, rtnl.encode_op(Op("add", ROUTE6), IFINDEX, seq=1))
    assert (m["family"], m["dst_len"], m["proto"], m["flags"]) == (
        socket.AF_INET6, 64, 0x9F, rtnl.RTNH_F_ONLINK)
    assert (m.get_attr("RTA_DST"), m.get_attr("RTA_GATEWAY")) == ("fd00:0:0:9::", "fd00:0:0:9::")
    n = decoded(ndmsg, rtnl.encode_op(Op("add", NEIGH6), IFINDEX, seq=2))
    assert (n["family"], n["state"], n.get_attr("NDA_DST")) == (socket.AF_INET6, 0x80,
                                                                "fd00:0:0:9::")
    f = decoded(ndmsg, rtnl.encode_op(Op("add", FDB6), IFINDEX, seq=3))
    assert (f["family"], f.get_attr("NDA_DST")) == (rtnl.AF_BRIDGE, "fd30::1:12")
    d = decoded(rtmsg, rtnl.encode_op(Op("del", ROUTE6), IFINDEX, seq=4))
    assert d["family"] == socket.AF_INET6 and d.get_attr("RTA_OIF") == IFINDEX


def test_direct_route_goes_on_the_underlay_device_without_onlink():
    m = decoded(rtmsg, rtnl.encode_op(Op("add", DIRECT), IFINDEX, seq=1, underlay=UNDERLAY))
    assert m.get_attr("RTA_OIF") == UNDERLAY and m["flags"] == 0
    assert m.get_attr("RTA_GATEWAY") == "172.30.1.12"
    d = decoded(rtmsg, rtnl.encode_op(Op("del", DIRECT), IFINDEX, seq=2, underlay=UNDERLAY))
    assert d.get_attr("RTA_OIF") == UNDERLAY
    with pytest.raises(ValueError, match="no underlay device"):
        rtnl.encode_op(Op("add", DIRECT), IFINDEX, seq=3)


nets6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(16, 128)).map(
    lambda t: IPv6Network(t, strict=False))
addrs6 = st.integers(0, 2**128 - 1).map(IPv6Address)
# Neighbours of ours: never multicast or link-local (the kernel's own, which decode skips)
unicast6 = addrs6.filter(lambda a: not (a.is_multicast or a.is_link_local))


@given(nets6, addrs6, addrs6, macs, st.booleans(), unicast6)
def test_ipv6_and_direct_entries_decode_back(net, via, dst, mac, direct, vtep):
    for entry, decode in ((Route(net, via, direct), rtnl.decode_route),
                          (Neigh(vtep, mac), rtnl.decode_neigh),
                          (Fdb(mac, dst), rtnl.decode_fdb)):
        [msg] = rtnl.split(rtnl.encode_op(Op("add", entry), IFINDEX, seq=9, underlay=UNDERLAY))
        if decode is rtnl.decode_route:
            assert decode(msg.payload, IFINDEX, UNDERLAY) == entry
            assert decode(msg.payload, IFINDEX) == (None if direct else entry)
        else:
            assert decode(msg.payload, IFINDEX) == entry


def test_route_dumps_of_both_families_can_cover_every_device():
    r6 = decoded(rtmsg, rtnl.encode_dump("route6", 0, seq=1))
    assert (r6["family"], r6["proto"], r6.get_attr("RTA_OIF")) == (socket.AF_INET6, 0x9F, None)
    n6 = decoded(ndmsg, rtnl.encode_dump("neigh6", IFINDEX, seq=2))
    assert (n6["family"], n6.get_attr("NDA_IFINDEX")) == (socket.AF_INET6, IFINDEX)


WATCHED6 = rtnl.Watched(vxlan=IFINDEX, bridge=8, vxlan_mtu=1430, bridge_mtu=1430,
                        vxlan_mac="02:00:00:00:00:01", bridge_mac="02:00:00:00:00:aa",
                        cluster=(IPv4Network("10.244.0.0/16"), IPv6Network("fd00::/48")),
                        underlay=UNDERLAY, neigh6=frozenset({NEIGH6.ip.packed}))


def test_ipv6_entries_and_direct_routes_are_drift():
    for op in (Op("del", ROUTE6), Op("del", NEIGH6), Op("add", NEIGH6), Op("del", FDB6)):
        assert rtnl.drift(as_notification(op), WATCHED6), op
    # our neighbour changed to a learned (non-permanent) state by someone
    learned = kernel_neigh(family=socket.AF_INET6, state=0x02, dst=str(NEIGH6.ip))
    assert rtnl.drift(notification(rtnl.RTM_NEWNEIGH, learned), WATCHED6)
    buf = rtnl.encode_op(Op("del", DIRECT), IFINDEX, 1, underlay=UNDERLAY)
    assert rtnl.drift(notification(header(buf)[1], buf[16:]), WATCHED6)
    moved = rtnl.encode_op(Op("add", ROUTE6), 99, 1)
    assert "fd00:0:0:9::/64" in rtnl.drift(notification(header(moved)[1], moved[16:]), WATCHED6)
    addr6 = struct.pack("=BBBBi", socket.AF_INET6, 64, 0, 0, 8)
    assert rtnl.drift(notification(rtnl.RTM_DELADDR, addr6), WATCHED6)


def test_ipv6_groups_are_subscribed():
    from overlay.dataplane.kernel import ChangeMonitor

    assert ChangeMonitor.GROUPS & rtnl.RTMGRP_IPV6_ROUTE
    assert ChangeMonitor.GROUPS & rtnl.RTMGRP_IPV6_IFADDR
