"""The rtnetlink requests of a pod start, marshalled by hand.

Why not pyroute2 here: attaching a pod is four requests (the veth pair, the
lookup of its container end, hairpin mode, address and default route), and
pyroute2's request processing (argument filters, message classes, encoding,
decoding the replies) took about half of overlayd's CPU per ADD under
bench/cni_latency.py (py-spy), more than the kernel's own work; one agent
process serves every pod start of the node, so that bounds the pod-start
rate. The encoders are pure; `request` is a blocking request/ack exchange,
which is fine on the event loop because rtnetlink handles a request inside
the sender's sendmsg: the answer is queued when send returns.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Sequence

from overlay.dataplane.rtnl import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTA_GATEWAY,
    RTA_OIF,
    RTM_NEWROUTE,
    RTN_UNICAST,
    _attr,
    _msg,
    attrs,
    parse_error,
    split,
)
from overlay.model import IPAddr, IPIface

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
NLM_F_EXCL = 0x200
NLA_F_NESTED = 0x8000
IFF_UP = 1
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_PROTINFO = 12
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # the hairpin flag
IFA_ADDRESS = 1
IFA_LOCAL = 2
# Our IPv6 pod addresses are unique by construction: no duplicate address detection,
# which would leave them tentative (unusable) for the pod's first second or two.
IFA_F_NODAD = 0x02
RTPROT_BOOT = 3  # what `ip route add` sets
AF_BRIDGE = 7
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")
_U32 = struct.Struct("=I")
_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL


def _name(name: str) -> bytes:
    return name.encode() + b"\0"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def new_veth(host: str, host_mac: str, peer: str, peer_mac: str, mtu: int, master: int,
             ns_fd: int, seq: int = 1) -> bytes:
    """`ip link add HOST up master BR type veth peer PEER netns NS`.

    The peer cannot be set up here: a veth end opens only once its pair is complete."""
    up = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, IFF_UP, IFF_UP)
    peer_msg = (_IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(peer))
                + _attr(IFLA_ADDRESS, _mac(peer_mac)) + _attr(IFLA_MTU, _U32.pack(mtu))
                + _attr(IFLA_NET_NS_FD, _U32.pack(ns_fd)))
    info = _attr(IFLA_INFO_KIND, b"veth") + _attr(
        IFLA_INFO_DATA | NLA_F_NESTED, _attr(VETH_INFO_PEER, peer_msg))
    body = (up + _attr(IFLA_IFNAME, _name(host)) + _attr(IFLA_ADDRESS, _mac(host_mac))
            + _attr(IFLA_MTU, _U32.pack(mtu)) + _attr(IFLA_MASTER, _U32.pack(master))
            + _attr(IFLA_LINKINFO | NLA_F_NESTED, info))
    return _msg(RTM_NEWLINK, _CREATE, seq, body)


def get_link(name: str, seq: int = 1) -> bytes:
    body = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name))
    return _msg(RTM_GETLINK, NLM_F_REQUEST, seq, body)


def hairpin(index: int, seq: int = 1) -> bytes:
    """`bridge link set dev INDEX hairpin on`."""
    body = _IFINFO.pack(AF_BRIDGE, 0, index, 0, 0) + _attr(
        IFLA_PROTINFO | NLA_F_NESTED, _attr(IFLA_BRPORT_MODE, b"\x01"))
    return _msg(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def configure(index: int, addresses: Sequence[tuple[IPIface, IPAddr]], seq: int = 1,
              up: bool = True) -> bytes:
    """`ip link set INDEX up`, then for each (address, gateway) of the pod's families
    `ip addr add ADDRESS dev INDEX` (IPv6: nodad) and `ip route add default via GW dev
    INDEX`: one batch (seq, seq + 1, ...: see `configure_steps`), which the kernel runs in
    order, answering an error for each failed request and an ack for the last one."""
    msgs: list[tuple[int, int, bytes]] = []
    if up:
        msgs.append((RTM_SETLINK, NLM_F_REQUEST,
                     _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)))
    for address, _gw in addresses:
        fam = socket.AF_INET if address.version == 4 else socket.AF_INET6
        flags = IFA_F_NODAD if address.version == 6 else 0
        ip = address.ip.packed
        body = _IFADDR.pack(fam, address.network.prefixlen, flags, 0, index)
        msgs.append((RTM_NEWADDR, _CREATE & ~NLM_F_ACK,
                     body + _attr(IFA_LOCAL, ip) + _attr(IFA_ADDRESS, ip)))
    for _address, gateway in addresses:
        fam = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
        route = _RTMSG.pack(fam, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                            RTN_UNICAST, 0)
        msgs.append((RTM_NEWROUTE, _CREATE & ~NLM_F_ACK,
                     route + _attr(RTA_GATEWAY, gateway.packed) + _attr(RTA_OIF, _U32.pack(index))))
    last = len(msgs) - 1
    return b"".join(_msg(t, f | (NLM_F_ACK if i == last else 0), seq + i, body)
                    for i, (t, f, body) in enumerate(msgs))


def configure_steps(addresses: Sequence[tuple[IPIface, IPAddr]], seq: int = 1
                    ) -> dict[int, str]:
    """What each request of `configure(..., seq)` does, by sequence number (for errors)."""
    steps = ["set the interface up"]
    steps += [f"add address {a}" for a, _ in addresses]
    steps += [f"add the default route via {g}" for _, g in addresses]
    return {seq + i: what for i, what in enumerate(steps)}


class RequestError(OSError):
    def __init__(self, code: int, seq: int, text: str) -> None:
        super().__init__(code, text or os.strerror(code))
        self.seq = seq


def request(sock: socket.socket, msg: bytes) -> bytes:
    """Send one request (or a batch ending with an ack request); the payload of the answer
    to a GET, b"" for an ack. RequestError (errno, seq) for the first request that failed."""
    sock.send(msg)
    while True:
        for m in split(sock.recv(65536)):
            if m.type == NLMSG_ERROR:
                code, seq, text = parse_error(m)
                if code:
                    raise RequestError(code, seq, text)
                return b""
            return m.payload


def link_index(sock: socket.socket, name: str) -> tuple[int, int | None] | None:
    """(index, IFLA_LINK: a veth's peer index) of link `name`, or None if it does not exist."""
    try:
        payload = request(sock, get_link(name))
    except RequestError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    _family, _type, index, _flags, _change = _IFINFO.unpack_from(payload, 0)
    link = attrs(payload, _IFINFO.size).get(IFLA_LINK)
    return index, (_U32.unpack(link[:4])[0] if link is not None and len(link) >= 4 else None)
