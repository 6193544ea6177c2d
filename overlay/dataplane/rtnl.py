"""The few rtnetlink messages the peer entries need, marshalled and parsed by hand.

Why not pyroute2 here: programming 5,000 peers is 15,000 kernel entries, and
pyroute2's request/ack loop (encode through its message classes, send, wait
for the ack, decode) costs about eight times what the kernel itself spends,
which is what `ip -batch` pays. These functions build the messages with
`struct` so that many go out in one `sendmsg`, and decode dumps into our own
records without building pyroute2 objects. Pure: bytes in, bytes out; the
socket lives in `overlay.dataplane.kernel`.

Batches rely on two kernel behaviours (net/netlink/af_netlink.c,
netlink_rcv_skb): messages of one `sendmsg` are processed in order, each
one even when an earlier one failed; and an error is always answered while a
success is answered only if the request asked for an ack. So a batch asks
for an ack on its last message only, and every reply before it names a
failed op by its sequence number.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlay.dataplane.desired import Fdb, Neigh, Op, Route
from overlay.model import IPAddr, IPNet, within

# linux/netlink.h
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: the request is not echoed in full
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NETLINK_CAP_ACK = 10
NETLINK_GET_STRICT_CHK = 12

# linux/rtnetlink.h, linux/neighbour.h
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_TABLE = 15
NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RTN_UNICAST = 1
RTNH_F_ONLINK = 4
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7
# Routes we own carry this protocol number, so routes an operator adds on
# our device are left alone (see /etc/iproute2/rt_protos).
RTPROT_OVERLAY = 0x9F

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad, pad, ifindex, state, flags, type
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NLA = struct.Struct("=HH")
_ERR = struct.Struct("=i")


def _attr(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size & 3)


def _msg(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _family(addr: IPAddr | IPNet) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def encode_op(op: Op, ifindex: int, seq: int, ack: bool = False,
              underlay: int | None = None) -> bytes:
    """One request for `op` on the device `ifindex`, the same request `ip`/`bridge` would send.

    add fdb    = bridge fdb append MAC dev DEV dst IP self permanent
    add neigh  = ip [-6] neigh replace IP lladdr MAC dev DEV nud permanent
    add route  = ip [-6] route replace NET via GW dev DEV onlink proto 0x9f
    a direct route (DirectRouting) goes on the underlay device `underlay`:
                 ip route replace NET via PEER dev UNDERLAY proto 0x9f
    and the matching deletes. IPv4 or IPv6 follows the entry's addresses.
    """
    e = op.entry
    add = op.action == "add"
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0)
    if isinstance(e, Fdb):
        body = (_NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
                + _attr(NDA_LLADDR, _mac(e.mac)) + _attr(NDA_DST, e.dst.packed))
        if add:
            return _msg(RTM_NEWNEIGH, flags | NLM_F_CREATE | NLM_F_APPEND, seq, body)
        return _msg(RTM_DELNEIGH, flags, seq, body)
    if isinstance(e, Neigh):
        fam = _family(e.ip)
        if add:
            body = (_NDMSG.pack(fam, 0, 0, ifindex, NUD_PERMANENT, 0, 0)
                    + _attr(NDA_DST, e.ip.packed) + _attr(NDA_LLADDR, _mac(e.mac)))
            return _msg(RTM_NEWNEIGH, flags | NLM_F_CREATE | NLM_F_REPLACE, seq, body)
        body = _NDMSG.pack(fam, 0, 0, ifindex, 0, 0, 0) + _attr(NDA_DST, e.ip.packed)
        return _msg(RTM_DELNEIGH, flags, seq, body)
    assert isinstance(e, Route)
    fam = _family(e.dst)
    if e.direct:
        if underlay is None:
            raise ValueError(f"{e}: no underlay device for a direct route")
        dev, rtflags = underlay, 0
    else:
        dev, rtflags = ifindex, RTNH_F_ONLINK
    oif = _attr(RTA_OIF, struct.pack("=I", dev))
    dst = _attr(RTA_DST, e.dst.network_address.packed)
    if add:
        body = (_RTMSG.pack(fam, e.dst.prefixlen, 0, 0, RT_TABLE_MAIN,
                            RTPROT_OVERLAY, RT_SCOPE_UNIVERSE, RTN_UNICAST, rtflags)
                + dst + _attr(RTA_GATEWAY, e.via.packed) + oif)
        return _msg(RTM_NEWROUTE, flags | NLM_F_CREATE | NLM_F_REPLACE, seq, body)
    # As `ip route del`: scope NOWHERE and type 0 match any; the protocol and
    # the device restrict the delete to our route.
    body = (_RTMSG.pack(fam, e.dst.prefixlen, 0, 0, RT_TABLE_MAIN, RTPROT_OVERLAY,
                        RT_SCOPE_NOWHERE, 0, 0) + dst + oif)
    return _msg(RTM_DELROUTE, flags, seq, body)


DumpKind = str  # "route" | "route6" | "neigh" | "neigh6" | "fdb"
DUMPS = ("route", "route6", "neigh", "neigh6", "fdb")


def encode_dump(kind: DumpKind, ifindex: int, seq: int) -> bytes:
    """A dump request, with the filters a kernel in strict-check mode applies itself.

    Without strict checking the kernel ignores them and dumps everything; the
    decoders below filter again either way. A route dump with `ifindex` 0
    filters on our protocol only: our routes on the VXLAN and the underlay
    device (DirectRouting).
    """
    flags = NLM_F_REQUEST | NLM_F_DUMP
    if kind in ("route", "route6"):
        fam = socket.AF_INET if kind == "route" else socket.AF_INET6
        body = _RTMSG.pack(fam, 0, 0, 0, RT_TABLE_MAIN, RTPROT_OVERLAY, 0, 0, 0)
        if ifindex:
            body += _attr(RTA_OIF, struct.pack("=I", ifindex))
        return _msg(RTM_GETROUTE, flags, seq, body)
    if kind in ("neigh", "neigh6"):
        fam = socket.AF_INET if kind == "neigh" else socket.AF_INET6
        body = (_NDMSG.pack(fam, 0, 0, 0, 0, 0, 0)
                + _attr(NDA_IFINDEX, struct.pack("=I", ifindex)))
        return _msg(RTM_GETNEIGH, flags, seq, body)
    if kind == "fdb":
        return _msg(RTM_GETNEIGH, flags, seq, _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, 0, 0, 0))
    raise ValueError(f"unknown dump {kind!r}")


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    payload: bytes


def split(buf: bytes) -> Iterator[Message]:
    """The netlink messages in one datagram."""
    off, end = 0, len(buf)
    while off + _HDR.size <= end:
        size, mtype, flags, seq, _pid = _HDR.unpack_from(buf, off)
        if size < _HDR.size or off + size > end:
            raise ValueError(f"truncated netlink message at offset {off} (length {size})")
        yield Message(mtype, flags, seq, bytes(buf[off + _HDR.size:off + size]))
        off += (size + 3) & ~3


def attrs(buf: bytes, start: int) -> dict[int, bytes]:
    """Top-level attributes from `start` on (later duplicates win; none of ours repeat)."""
    out: dict[int, bytes] = {}
    off, end = start, len(buf)
    while off + _NLA.size <= end:
        size, kind = _NLA.unpack_from(buf, off)
        if size < _NLA.size:
            break
        out[kind & 0x3FFF] = buf[off + _NLA.size:off + size]
        off += (size + 3) & ~3
    return out


def parse_error(msg: Message) -> tuple[int, int, str]:
    """(errno, seq of the request, extended-ack text) from an NLMSG_ERROR; errno 0 is an ack."""
    (err,) = _ERR.unpack_from(msg.payload, 0)
    req_len, _t, _f, req_seq, _p = _HDR.unpack_from(msg.payload, _ERR.size)
    text = ""
    if msg.flags & NLM_F_ACK_TLVS:
        echoed = _HDR.size if msg.flags & NLM_F_CAPPED else req_len
        raw = attrs(msg.payload, _ERR.size + ((echoed + 3) & ~3)).get(NLMSGERR_ATTR_MSG)
        if raw:
            text = raw.split(b"\0", 1)[0].decode(errors="replace")
    return -err, req_seq, text


def done_error(msg: Message) -> int:
    """The errno an NLMSG_DONE carries when a dump failed part-way (0: complete)."""
    if len(msg.payload) < _ERR.size:
        return 0
    return -int(_ERR.unpack_from(msg.payload, 0)[0])


def _ip(raw: bytes) -> IPAddr | None:
    if len(raw) == 4:
        return IPv4Address(raw)
    if len(raw) == 16:
        return IPv6Address(raw)
    return None


def decode_route(payload: bytes, ifindex: int, underlay: int | None = None) -> Route | None:
    """Our route (main table, our protocol, with a gateway) on the VXLAN device
    `ifindex`, or a direct one on the underlay device `underlay`; else None."""
    family, dst_len, _s, _t, table, proto, _sc, _ty, _fl = _RTMSG.unpack_from(payload, 0)
    if family not in (socket.AF_INET, socket.AF_INET6) or proto != RTPROT_OVERLAY:
        return None
    a = attrs(payload, _RTMSG.size)
    raw_table = a.get(RTA_TABLE)
    if raw_table is not None:
        (table,) = struct.unpack("=I", raw_table)
    oif = a.get(RTA_OIF)
    if table != RT_TABLE_MAIN or oif is None:
        return None
    (dev,) = struct.unpack("=I", oif)
    if dev == ifindex:
        direct = False
    elif underlay is not None and dev == underlay:
        direct = True
    else:
        return None
    width = 4 if family == socket.AF_INET else 16
    gw = a.get(RTA_GATEWAY)
    if gw is None or len(gw) != width:
        return None
    dst = a.get(RTA_DST, bytes(width))
    if len(dst) != width:
        return None
    via = _ip(gw)
    assert via is not None
    net: IPNet = (IPv4Network((int.from_bytes(dst, "big"), dst_len)) if width == 4
                  else IPv6Network((int.from_bytes(dst, "big"), dst_len)))
    return Route(net, via, direct)


def decode_neigh(payload: bytes, ifindex: int) -> Neigh | None:
    """An IPv4 or IPv6 neighbour with a link-layer address on `ifindex`, else None."""
    family, _p1, _p2, index, state, _f, _t = _NDMSG.unpack_from(payload, 0)
    if family not in (socket.AF_INET, socket.AF_INET6) or index != ifindex:
        return None
    a = attrs(payload, _NDMSG.size)
    dst, ll = a.get(NDA_DST), a.get(NDA_LLADDR)
    if not dst or len(dst) != (4 if family == socket.AF_INET else 16) or not ll \
            or len(ll) != 6:
        return None
    ip = _ip(dst)
    assert ip is not None
    if ip.is_multicast or ip.is_link_local:
        return None  # the kernel's own (MLD groups, neighbour discovery): never ours
    return Neigh(ip, ll.hex(":"), bool(state & NUD_PERMANENT))


def decode_fdb(payload: bytes, ifindex: int) -> Fdb | None:
    """A forwarding entry with an IPv4 or IPv6 remote on `ifindex`, else None."""
    family, _p1, _p2, index, _state, _f, _t = _NDMSG.unpack_from(payload, 0)
    if family != AF_BRIDGE or index != ifindex:
        return None
    a = attrs(payload, _NDMSG.size)
    dst, ll = a.get(NDA_DST), a.get(NDA_LLADDR)
    if not dst or not ll or len(ll) != 6:
        return None
    ip = _ip(dst)
    return None if ip is None else Fdb(ll.hex(":"), ip)


@dataclass
class BatchReplies:
    """What came back for one batch: failures by sequence number, and whether it is complete."""

    first_seq: int
    last_seq: int
    failures: dict[int, tuple[int, str]]
    done: bool = False

    def feed(self, msg: Message) -> None:
        if msg.type != NLMSG_ERROR:
            return  # nothing else is sent to this socket for requests
        code, seq, text = parse_error(msg)
        if not self.first_seq <= seq <= self.last_seq:
            return  # a late reply to an earlier batch that timed out
        if code:
            self.failures[seq] = (code, text)
        if seq == self.last_seq:
            self.done = True


# --- notifications (rtnetlink multicast groups) -----------------------------------------

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFF_UP = 0x1
_IFINFO = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index


@dataclass(frozen=True)
class Watched:
    """What the agent keeps in the kernel, as notifications name it."""

    vxlan: int | None  # ifindex
    bridge: int | None
    vxlan_mtu: int
    bridge_mtu: int
    vxlan_mac: str
    bridge_mac: str
    cluster: IPNet | tuple[IPNet, ...]  # the pod network(s)
    underlay: int | None = None  # ifindex, when DirectRouting puts routes on it
    # Our permanent IPv6 neighbours (packed): NDP changes other entries all the time.
    neigh6: frozenset[bytes] = frozenset()

    @property
    def clusters(self) -> tuple[IPNet, ...]:
        return self.cluster if isinstance(self.cluster, tuple) else (self.cluster,)


def drift(msg: Message, w: Watched) -> str:
    """Why notification `msg` may mean the kernel no longer matches what we programmed,
    or "" if it cannot. Errs towards yes (a pass that finds nothing costs one diff);
    ignores what changes all the time and is not ours: pods' veths, bridge port churn."""
    try:
        return _drift(msg, w)
    except (struct.error, ValueError):
        return "undecodable notification"


def _drift(msg: Message, w: Watched) -> str:
    ours = {w.vxlan, w.bridge} - {None}
    t, p = msg.type, msg.payload
    if t in (RTM_NEWLINK, RTM_DELLINK):
        _f, _p, _t, index, flags, _c = _IFINFO.unpack_from(p, 0)
        if index not in ours:
            return ""
        if t == RTM_DELLINK:
            return f"device {index} deleted"
        if not flags & IFF_UP:
            return f"device {index} down"
        a = attrs(p, _IFINFO.size)
        mtu, mac = a.get(IFLA_MTU), a.get(IFLA_ADDRESS)
        want_mtu, want_mac = ((w.vxlan_mtu, w.vxlan_mac) if index == w.vxlan
                              else (w.bridge_mtu, w.bridge_mac))
        if mtu is not None and struct.unpack("=I", mtu)[0] != want_mtu:
            return f"device {index} MTU changed"
        if mac is not None and mac.hex(":") != want_mac.lower():
            return f"device {index} MAC changed"
        return ""
    if t in (RTM_NEWADDR, RTM_DELADDR):
        family, _l, _f, _s, index = _IFADDR.unpack_from(p, 0)
        return f"address changed on device {index}" if index in ours else ""
    if t in (RTM_NEWNEIGH, RTM_DELNEIGH):
        fam, _p1, _p2, index, state, _f, _t = _NDMSG.unpack_from(p, 0)
        if index != w.vxlan:
            return ""
        if fam in (socket.AF_INET, AF_BRIDGE):
            return "neighbour or FDB entry changed"
        if fam == socket.AF_INET6:
            # Neighbour discovery on the device is not ours and would only add passes:
            # only a permanent entry (a DEL carries the state it had) or one of ours.
            dst = attrs(p, _NDMSG.size).get(NDA_DST)
            if state & NUD_PERMANENT or (dst is not None and dst in w.neigh6):
                return "IPv6 neighbour entry changed"
        return ""
    if t in (RTM_NEWROUTE, RTM_DELROUTE):
        family, dst_len, _s, _tos, _tb, proto, *_ = _RTMSG.unpack_from(p, 0)
        if family not in (socket.AF_INET, socket.AF_INET6):
            return ""
        a = attrs(p, _RTMSG.size)
        oif = a.get(RTA_OIF)
        dev = struct.unpack("=I", oif)[0] if oif is not None else None
        if dev is not None and dev == w.vxlan:
            return "route changed"
        if dev is not None and dev == w.underlay and proto == RTPROT_OVERLAY:
            return "direct route changed"
        dst = a.get(RTA_DST)
        width = 4 if family == socket.AF_INET else 16
        if dst is not None and len(dst) == width:
            net: IPNet = (IPv4Network((int.from_bytes(dst, "big"), dst_len), strict=False)
                          if width == 4 else
                          IPv6Network((int.from_bytes(dst, "big"), dst_len), strict=False))
            if any(within(net, c) and dst_len > c.prefixlen for c in w.clusters):
                return f"route to {net} changed"
        return ""
    return ""
