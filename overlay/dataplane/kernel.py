"""The kernel behind a narrow interface.

`Kernel` is all the agent's reconciler needs: read a link, change devices,
read the entries on the VXLAN device, apply entry ops. `NetlinkKernel`
implements it with pyroute2; `overlay.dataplane.fake.FakeKernel` implements
it in memory, with failures on demand, for unit tests.

Every netlink failure leaves here as `KernelError` (with errno), never as a
pyroute2 exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_interface
from typing import Any, Protocol

from overlay.dataplane import rtnl
from overlay.dataplane.desired import Entries, Fdb, Op
from overlay.dataplane.devices import BridgeSpec, DeviceOp, LinkInfo, VxlanSpec
from overlay.devnames import is_node_device
from overlay.errors import ConfigError, TemporaryError
from overlay.linkget import get_link
from overlay.model import IPAddr, IPIface, IPNet

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
SO_RCVBUFFORCE = 33
# Requests per sendmsg: the kernel spends ~30 us on each, so a batch holds
# the event loop for ~10 ms, and all its replies fit in RCVBUF.
BATCH = 256
RCVBUF = 4 << 20
RECV_SIZE = 1 << 16
# Our IPv6 addresses are unique by construction: no duplicate address detection,
# which would keep them tentative (unusable) for a second or two.
IFA_F_NODAD = 0x02


class KernelError(TemporaryError):
    def __init__(self, what: str, code: int, message: str = "") -> None:
        text = message or (errno.errorcode.get(code, str(code)) if code else "failed")
        super().__init__(f"{what}: {text}")
        self.what = what
        self.code = code


@dataclass(frozen=True)
class OpResult:
    op: Op
    error: KernelError | None = None


class Kernel(Protocol):
    async def link(self, name: str) -> LinkInfo | None: ...

    async def apply_device_ops(self, ops: Sequence[DeviceOp]) -> None: ...

    async def observe(self, ifindex: int, underlay: int | None = None) -> Entries: ...

    async def apply(self, ifindex: int, ops: Sequence[Op],
                    underlay: int | None = None) -> list[OpResult]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    ip: IPAddr  # IPv4 or IPv6: the family VXLAN packets travel in
    mtu: int
    network: IPNet

    @property
    def family(self) -> int:
        return self.ip.version


def _nl_code(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return 0


def _ok_missing(code: int) -> bool:
    return code in (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


def harmless(op: Op, code: int) -> bool:
    """Errors that mean the kernel already is as the op wants it."""
    if op.action == "del":
        return _ok_missing(code)
    return isinstance(op.entry, Fdb) and code == errno.EEXIST


def link_info(msg: Any, addresses: frozenset[IPIface] = frozenset()) -> LinkInfo:
    """Decode an RTM_NEWLINK message into LinkInfo."""
    li = msg.get("IFLA_LINKINFO")
    kind = li.get("IFLA_INFO_KIND") if li else None
    vni = port = underlay = None
    local = None
    learning = None
    if kind == "vxlan" and li is not None:
        data = li.get("IFLA_INFO_DATA")
        if data is not None:
            vni = data.get("IFLA_VXLAN_ID")
            port = data.get("IFLA_VXLAN_PORT")
            raw_local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
            local = ip_address(raw_local) if raw_local else None
            learning = bool(data.get("IFLA_VXLAN_LEARNING"))
            underlay = data.get("IFLA_VXLAN_LINK")
    return LinkInfo(
        name=msg.get("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        up=bool(msg["flags"] & rtnl.IFF_UP),
        mtu=msg.get("IFLA_MTU"),
        mac=(msg.get("IFLA_ADDRESS") or "").lower(),
        addresses=addresses,
        vni=vni,
        port=port,
        local=local,
        learning=learning,
        underlay_ifindex=underlay,
    )


def rtnl_socket(groups: int) -> socket.socket:
    """A non-blocking rtnetlink socket with a large receive buffer, subscribed to
    `groups` (0: requests and their replies only)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    sock.bind((0, groups))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock


class NetlinkKernel:
    """`Kernel` over one pyroute2 AsyncIPRoute socket in the agent's namespace."""

    def __init__(self) -> None:
        from pyroute2 import AsyncIPRoute

        self._ipr = AsyncIPRoute()
        # Entries go through a socket of our own, in batches (see `apply`).
        # (its RCVBUF has room for every reply of a batch, even if all are errors)
        self._raw = rtnl_socket(groups=0)
        for opt in (rtnl.NETLINK_CAP_ACK, rtnl.NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):
                self._raw.setsockopt(rtnl.SOL_NETLINK, opt, 1)
        self._strict = False
        self._set_strict(True)
        self._rbuf = bytearray(RECV_SIZE)
        self._seq = 0
        self._raw_lock = asyncio.Lock()

    @property
    def ipr(self) -> Any:
        return self._ipr

    def close(self) -> None:
        self._ipr.close()
        self._raw.close()

    async def link(self, name: str) -> LinkInfo | None:
        try:
            msg = await get_link(self._ipr, ifname=name)
        except Exception as exc:
            raise KernelError(f"read link {name}", _nl_code(exc)) from exc
        if msg is None:
            return None
        return link_info(msg, await self._addresses(msg["index"]))

    async def _addresses(self, index: int) -> frozenset[IPIface]:
        """Both families' addresses (the IPv6 link-local one included: devices.managed
        tells ours apart)."""
        out: set[IPIface] = set()
        async for a in await self._ipr.addr("dump", index=index):
            if a["index"] != index or a["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            out.add(ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
        return frozenset(out)

    async def _index(self, name: str) -> int:
        try:
            msg = await get_link(self._ipr, ifname=name)
        except Exception as exc:
            raise KernelError(f"find link {name}", _nl_code(exc)) from exc
        if msg is None:
            raise KernelError(f"find link {name}", errno.ENODEV)
        return int(msg["index"])

    async def apply_device_ops(self, ops: Sequence[DeviceOp]) -> None:
        for op in ops:
            try:
                await self._device_op(op)
            except KernelError:
                raise
            except Exception as exc:
                raise KernelError(str(op), _nl_code(exc)) from exc

    async def _device_op(self, op: DeviceOp) -> None:
        ipr = self._ipr
        if op.action == "create":
            spec = op.value
            if isinstance(spec, VxlanSpec):
                kw: dict[str, Any] = dict(
                    ifname=spec.name,
                    kind="vxlan",
                    vxlan_id=spec.vni,
                    vxlan_port=spec.port,
                    vxlan_learning=0,
                    mtu=spec.mtu,
                    address=spec.mac,
                )
                # The local address's family is the underlay's (one device, both pod
                # families inside: see overlay.dataplane.desired).
                kw["vxlan_local6" if spec.local.version == 6 else "vxlan_local"] = str(spec.local)
                if spec.underlay_ifindex is not None:
                    kw["vxlan_link"] = spec.underlay_ifindex
                await ipr.link("add", **kw)
            elif isinstance(spec, BridgeSpec):
                # An explicit MAC: a bridge without ports would otherwise have
                # 00:00:00:00:00:00 and its MAC would change with its ports.
                await ipr.link("add", ifname=spec.name, kind="bridge", mtu=spec.mtu,
                               address=spec.mac)
            else:
                raise TypeError(f"cannot create {spec!r}")
            return
        if op.action == "delete":
            try:
                await ipr.link("del", index=await self._index(op.name))
            except KernelError as exc:
                if exc.code != errno.ENODEV:
                    raise
            return
        index = await self._index(op.name)
        if op.action == "set_mtu":
            await ipr.link("set", index=index, mtu=op.value)
        elif op.action == "set_mac":
            await ipr.link("set", index=index, address=op.value)
        elif op.action == "up":
            await ipr.link("set", index=index, state="up")
        elif op.action in ("add_addr", "del_addr"):
            assert isinstance(op.value, IPv4Interface | IPv6Interface)
            cmd = "add" if op.action == "add_addr" else "del"
            kw = {"flags": IFA_F_NODAD} if op.value.version == 6 and cmd == "add" else {}
            try:
                await ipr.addr(cmd, index=index, address=str(op.value.ip),
                               prefixlen=op.value.network.prefixlen, **kw)
            except Exception as exc:
                code = _nl_code(exc)
                if not (cmd == "add" and code == errno.EEXIST) and not (
                    cmd == "del" and _ok_missing(code)
                ):
                    raise
        else:  # pragma: no cover - exhaustive
            raise ValueError(op.action)

    async def observe(self, ifindex: int, underlay: int | None = None) -> Entries:
        """The entries on the device (and our direct routes on `underlay`), from dumps of
        both families decoded by `rtnl` (no pyroute2 objects)."""
        # With direct routes the route dumps filter on our protocol only, not the device.
        rdev = 0 if underlay is not None else ifindex
        async with self._raw_lock:
            routes = {r for kind in ("route", "route6") for p in await self._dump(kind, rdev)
                      if (r := rtnl.decode_route(p, ifindex, underlay)) is not None}
            neighs = {n for kind in ("neigh", "neigh6") for p in await self._dump(kind, ifindex)
                      if (n := rtnl.decode_neigh(p, ifindex)) is not None}
            fdbs = {f for p in await self._dump("fdb", ifindex)
                    if (f := rtnl.decode_fdb(p, ifindex)) is not None}
        return Entries(frozenset(routes), frozenset(neighs), frozenset(fdbs))

    async def apply(self, ifindex: int, ops: Sequence[Op],
                    underlay: int | None = None) -> list[OpResult]:
        """Apply `ops` in order, `BATCH` requests per sendmsg; one result per op.

        Only failures are answered (plus an ack for the last request of each
        batch), so the cost is about the kernel's own; see `overlay.dataplane.rtnl`.
        """
        results: list[OpResult] = []
        async with self._raw_lock:
            for start in range(0, len(ops), BATCH):
                results.extend(await self._apply_batch(ifindex, ops[start:start + BATCH],
                                                       underlay))
                # Let the agent's other tasks (CNI, keep-alive, API) run between batches.
                await asyncio.sleep(0)
        return results

    # --- the raw socket for entries -----------------------------------------

    def _seqs(self, n: int) -> int:
        """`n` consecutive sequence numbers that do not wrap around."""
        if self._seq + n >= 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += n
        return first

    async def _apply_batch(self, ifindex: int, ops: Sequence[Op],
                           underlay: int | None = None) -> list[OpResult]:
        first = self._seqs(len(ops))
        last = first + len(ops) - 1
        buf = b"".join(rtnl.encode_op(op, ifindex, first + i, ack=(first + i == last),
                                      underlay=underlay)
                       for i, op in enumerate(ops))
        replies = rtnl.BatchReplies(first, last, {})
        lost = 0
        try:
            self._raw.send(buf)
            await self._collect(replies)
        except OSError as exc:
            # Sent but unanswered (timeout, ENOBUFS: replies dropped) or not
            # sent at all: none of the ops without a reply can count as done.
            lost = exc.errno or errno.EIO
        results = []
        for i, op in enumerate(ops):
            seq = first + i
            code, text = replies.failures.get(seq, (0, ""))
            if not code and lost and not replies.done:
                code = lost
            if code == 0 or harmless(op, code):
                results.append(OpResult(op))
            else:
                name = errno.errorcode.get(code, str(code))
                results.append(OpResult(op, KernelError(str(op), code,
                                                        f"{name}: {text}" if text else "")))
        return results

    async def _collect(self, replies: rtnl.BatchReplies) -> None:
        while not replies.done:
            for msg in rtnl.split(await self._recv()):
                replies.feed(msg)

    async def _recv(self, timeout: float = 10.0) -> bytes:
        """One datagram from the raw socket, waiting in the event loop if none is queued."""
        while True:
            try:
                n = self._raw.recv_into(self._rbuf)
                return bytes(self._rbuf[:n])
            except BlockingIOError:
                await self._readable(timeout)

    async def _readable(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._raw.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "no answer from the kernel") from None
        finally:
            loop.remove_reader(fd)

    async def _dump(self, kind: str, ifindex: int) -> list[bytes]:
        """The payloads of one dump; repeated when the kernel says it was interrupted."""
        payloads: list[bytes] = []
        for _attempt in range(3):
            try:
                payloads, interrupted, code, text = await self._dump_once(kind, ifindex)
            except OSError as exc:
                raise KernelError(f"read {kind} entries", exc.errno or errno.EIO) from exc
            if code == errno.EINVAL and self._strict:
                # A kernel that refuses our dump filters: filter on our side only.
                self._set_strict(False)
                continue
            if code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP) and kind.endswith("6"):
                return []  # a kernel without IPv6 (ipv6.disable=1) has no IPv6 entries
            if code:
                raise KernelError(f"read {kind} entries", code, text)
            if not interrupted:
                return payloads
        # Still changing under us: an inconsistent view only costs redundant,
        # idempotent ops, and the next pass sees a settled kernel.
        return payloads

    async def _dump_once(self, kind: str, ifindex: int) -> tuple[list[bytes], bool, int, str]:
        seq = self._seqs(1)
        self._raw.send(rtnl.encode_dump(kind, ifindex, seq))
        payloads: list[bytes] = []
        interrupted = False
        while True:
            for msg in rtnl.split(await self._recv()):
                if msg.seq != seq:
                    continue  # a late reply to an earlier request
                interrupted |= bool(msg.flags & rtnl.NLM_F_DUMP_INTR)
                if msg.type == rtnl.NLMSG_DONE:
                    return payloads, interrupted, rtnl.done_error(msg), ""
                if msg.type == rtnl.NLMSG_ERROR:
                    code, _seq, text = rtnl.parse_error(msg)
                    return payloads, interrupted, code, text
                payloads.append(msg.payload)

    def _set_strict(self, on: bool) -> None:
        try:
            self._raw.setsockopt(rtnl.SOL_NETLINK, rtnl.NETLINK_GET_STRICT_CHK, int(on))
            self._strict = on
        except OSError:
            self._strict = False


class ChangeMonitor:
    """Kernel notifications about links, addresses, neighbours and routes, so that drift
    (an entry or device deleted or changed by hand) is repaired when it happens instead
    of at the next periodic pass, which can then be rare and cheap at thousands of peers.
    """

    GROUPS = (rtnl.RTMGRP_LINK | rtnl.RTMGRP_NEIGH | rtnl.RTMGRP_IPV4_IFADDR
              | rtnl.RTMGRP_IPV4_ROUTE | rtnl.RTMGRP_IPV6_IFADDR | rtnl.RTMGRP_IPV6_ROUTE)

    def __init__(self) -> None:
        # (its RCVBUF holds the 15,000 notifications of a first pass at 5,000 peers)
        self._sock = rtnl_socket(groups=self.GROUPS)
        self._buf = bytearray(RECV_SIZE)

    def close(self) -> None:
        self._sock.close()

    def _drain(self, watched: rtnl.Watched) -> str:
        why = ""
        while True:
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                return why
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise KernelError("read kernel notifications", exc.errno or 0,
                                      str(exc)) from None
                why = "kernel notifications were lost (socket buffer full)"
                continue
            if why:
                continue  # a pass is due anyway: just empty the queue
            try:
                for msg in rtnl.split(bytes(self._buf[:n])):
                    why = why or rtnl.drift(msg, watched)
            except ValueError:
                why = "undecodable notification"

    async def changed(self, watched: Callable[[], rtnl.Watched]) -> str:
        """Waits until a notification may mean drift; returns why."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self._sock.fileno()
        loop.add_reader(fd, ready.set)
        try:
            while True:
                await ready.wait()
                ready.clear()
                why = self._drain(watched())
                if why:
                    return why
        finally:
            loop.remove_reader(fd)


async def find_underlay(
    ipr: Any,
    iface: str | None = None,
    iface_regex: str | None = None,
    public_ip: str | None = None,
    family: int | None = None,
) -> Underlay:
    """The interface and address VXLAN packets leave from.

    Order: --iface, then --iface-regex, then the interface holding --public-ip,
    then the interface of the default route, then the only interface with an
    address. The address is of `family` (4 or 6) when given (--underlay-family),
    else IPv4 when the interface has one and IPv6 otherwise; never loopback or
    link-local. Every failure names what was looked for.
    """
    links = {m["index"]: m async for m in await ipr.link("dump")}
    addrs: dict[int, list[IPIface]] = {}
    for fam in (socket.AF_INET, socket.AF_INET6):
        async for a in await ipr.addr("dump", family=fam):
            addrs.setdefault(a["index"], []).append(
                ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
    names = {i: m.get("IFLA_IFNAME") for i, m in links.items()}
    what = f"an IPv{family}" if family else "an IP"

    def good(a: IPIface) -> bool:
        return (not a.ip.is_loopback and not a.ip.is_link_local
                and (family is None or a.version == family))

    def usable(i: int) -> bool:
        """Not loopback and not one of our own devices (they carry pod addresses)."""
        n = names.get(i) or ""
        return (not is_node_device(n)
                and any(good(a) for a in addrs.get(i, [])))

    candidates: list[int]
    if iface:
        candidates = [i for i, n in names.items() if n == iface]
        if not candidates:
            raise ConfigError(
                "--iface",
                f"no interface named {iface!r} here (have: {', '.join(sorted(names.values()))})",
            )
    elif iface_regex:
        try:
            rx = re.compile(iface_regex)
        except re.error as exc:
            raise ConfigError("--iface-regex", f"invalid regular expression: {exc}") from None
        candidates = [i for i, n in sorted(names.items()) if rx.fullmatch(n) and usable(i)]
        if not candidates:
            raise ConfigError("--iface-regex", f"no interface with {what} address matches "
                              f"{iface_regex!r}")
    elif public_ip:
        try:
            wanted = ip_address(public_ip)
        except ValueError:
            raise ConfigError("--public-ip", f"{public_ip!r} is not an IP address") from None
        if family is not None and wanted.version != family:
            raise ConfigError("--public-ip", f"{public_ip} is not IPv{family} "
                              "(--underlay-family)")
        candidates = [i for i, lst in addrs.items() if any(a.ip == wanted for a in lst)]
        if not candidates:
            raise ConfigError("--public-ip", f"{public_ip} is not an address of this host")
    else:
        candidates = []
        for fam in ((socket.AF_INET, socket.AF_INET6) if family is None else
                    ((socket.AF_INET,) if family == 4 else (socket.AF_INET6,))):
            async for r in await ipr.route("dump", family=fam):
                if r["dst_len"] == 0 and r["table"] == 254 and r.get("RTA_OIF"):
                    candidates.append(r.get("RTA_OIF"))
        candidates = [i for i in candidates if usable(i)] or candidates
        if not candidates:
            candidates = [i for i in sorted(addrs) if usable(i)]
        if not candidates:
            raise ConfigError("--iface", f"no default route and no interface with {what} "
                              "address: say which interface to use with --iface")
    index = candidates[0]
    lst = addrs.get(index, [])
    if public_ip:
        chosen = [a for a in lst if a.ip == ip_address(public_ip)]
    else:
        chosen = [a for a in lst if good(a)]
        if family is None:
            # IPv4 first (the addresses came in that order): the common underlay.
            chosen = [a for a in chosen if a.version == 4] or chosen
    if not chosen and public_ip:
        raise ConfigError("--public-ip", f"{public_ip} is not an address of {names[index]}")
    if not chosen:
        kind = f"IPv{family}" if family else "IP"
        raise ConfigError("--iface", f"{names[index]} has no {kind} address (loopback and "
                          "link-local ones do not count)")
    link = links[index]
    return Underlay(
        ifname=names[index],
        ifindex=index,
        ip=chosen[0].ip,
        mtu=int(link.get("IFLA_MTU")),
        network=chosen[0].network,
    )
