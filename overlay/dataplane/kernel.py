"""The kernel behind a narrow interface.

`Kernel` is all the agent's reconciler needs: read a link, change devices,
read the entries on the VXLAN device, apply entry ops. `NetlinkKernel`
implements it with pyroute2; `overlay.dataplane.fake.FakeKernel` implements
it in memory, with failures on demand, for unit tests.

Every netlink failure leaves here as `KernelError` (with errno), never as a
pyroute2 exception.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any, Protocol

from overlay.dataplane.desired import Entries, Fdb, Neigh, Op, Route
from overlay.dataplane.devices import BridgeSpec, DeviceOp, LinkInfo, VxlanSpec
from overlay.errors import ConfigError, TemporaryError

log = logging.getLogger(__name__)

# Routes we own carry this protocol number, so routes an operator adds on
# our device are left alone (see /etc/iproute2/rt_protos).
RTPROT_OVERLAY = 0x9F
RTNH_F_ONLINK = 4
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NTF_SELF = 0x02
IFF_UP = 1
AF_BRIDGE = 7


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

    async def observe(self, ifindex: int) -> Entries: ...

    async def apply(self, ifindex: int, ops: Sequence[Op]) -> list[OpResult]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Underlay:
    ifname: str
    ifindex: int
    ip: IPv4Address
    mtu: int
    network: IPv4Network


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


async def collect(res: Any) -> list[Any]:
    """pyroute2 0.9 returns lists for single requests and async generators for dumps."""
    if hasattr(res, "__aiter__"):
        return [m async for m in res]
    return list(res)


def link_info(msg: Any, addresses: frozenset[IPv4Interface] = frozenset()) -> LinkInfo:
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
            raw_local = data.get("IFLA_VXLAN_LOCAL")
            local = IPv4Address(raw_local) if raw_local else None
            learning = bool(data.get("IFLA_VXLAN_LEARNING"))
            underlay = data.get("IFLA_VXLAN_LINK")
    return LinkInfo(
        name=msg.get("IFLA_IFNAME"),
        index=msg["index"],
        kind=kind,
        up=bool(msg["flags"] & IFF_UP),
        mtu=msg.get("IFLA_MTU"),
        mac=(msg.get("IFLA_ADDRESS") or "").lower(),
        addresses=addresses,
        vni=vni,
        port=port,
        local=local,
        learning=learning,
        underlay_ifindex=underlay,
    )


class NetlinkKernel:
    """`Kernel` over one pyroute2 AsyncIPRoute socket in the agent's namespace."""

    def __init__(self) -> None:
        from pyroute2 import AsyncIPRoute

        self._ipr = AsyncIPRoute()

    @property
    def ipr(self) -> Any:
        return self._ipr

    def close(self) -> None:
        self._ipr.close()

    async def link(self, name: str) -> LinkInfo | None:
        try:
            msgs = await collect(await self._ipr.link("get", ifname=name))
        except Exception as exc:
            code = _nl_code(exc)
            if code == errno.ENODEV:
                return None
            raise KernelError(f"read link {name}", code) from exc
        if not msgs:
            return None
        msg = msgs[0]
        return link_info(msg, await self._addresses(msg["index"]))

    async def _addresses(self, index: int) -> frozenset[IPv4Interface]:
        out = set()
        async for a in await self._ipr.addr("dump", family=socket.AF_INET, index=index):
            if a["index"] != index:
                continue
            out.add(IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
        return frozenset(out)

    async def _index(self, name: str) -> int:
        found = await self._ipr.link_lookup(ifname=name)
        if not found:
            raise KernelError(f"find link {name}", errno.ENODEV)
        return int(found[0])

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
                    vxlan_local=str(spec.local),
                    vxlan_learning=0,
                    mtu=spec.mtu,
                    address=spec.mac,
                )
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
            assert isinstance(op.value, IPv4Interface)
            cmd = "add" if op.action == "add_addr" else "del"
            try:
                await ipr.addr(cmd, index=index, address=str(op.value.ip),
                               prefixlen=op.value.network.prefixlen)
            except Exception as exc:
                code = _nl_code(exc)
                if not (cmd == "add" and code == errno.EEXIST) and not (
                    cmd == "del" and _ok_missing(code)
                ):
                    raise
        else:  # pragma: no cover - exhaustive
            raise ValueError(op.action)

    async def observe(self, ifindex: int) -> Entries:
        ipr = self._ipr
        routes = set()
        async for r in await ipr.route("dump", family=socket.AF_INET):
            if r.get("RTA_OIF") != ifindex or r["proto"] != RTPROT_OVERLAY:
                continue
            if r["table"] != 254 or r.get("RTA_GATEWAY") is None:
                continue
            routes.add(Route(IPv4Network(f"{r.get('RTA_DST')}/{r['dst_len']}"),
                             IPv4Address(r.get("RTA_GATEWAY"))))
        neighs = set()
        async for n in await ipr.neigh("dump", family=socket.AF_INET, ifindex=ifindex):
            if n["ifindex"] != ifindex or not n.get("NDA_LLADDR") or not n.get("NDA_DST"):
                continue
            neighs.add(Neigh(IPv4Address(n.get("NDA_DST")), n.get("NDA_LLADDR").lower(),
                             bool(n["state"] & NUD_PERMANENT)))
        fdbs = set()
        async for f in await ipr.fdb("dump", ifindex=ifindex):
            dst = f.get("NDA_DST")
            if f["ifindex"] != ifindex or not dst or not f.get("NDA_LLADDR"):
                continue
            try:
                fdbs.add(Fdb(f.get("NDA_LLADDR").lower(), IPv4Address(dst)))
            except ValueError:
                continue  # an IPv6 remote is not ours
        return Entries(frozenset(routes), frozenset(neighs), frozenset(fdbs))

    async def apply(self, ifindex: int, ops: Sequence[Op]) -> list[OpResult]:
        results = []
        for op in ops:
            try:
                await self._entry_op(ifindex, op)
                results.append(OpResult(op))
            except Exception as exc:
                code = _nl_code(exc)
                if harmless(op, code):
                    results.append(OpResult(op))
                else:
                    results.append(OpResult(op, KernelError(str(op), code)))
        return results

    async def _entry_op(self, ifindex: int, op: Op) -> None:
        e = op.entry
        ipr = self._ipr
        if isinstance(e, Fdb):
            cmd = "append" if op.action == "add" else "del"
            await ipr.fdb(cmd, ifindex=ifindex, lladdr=e.mac, dst=str(e.dst),
                          state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)
        elif isinstance(e, Neigh):
            if op.action == "add":
                await ipr.neigh("replace", dst=str(e.ip), lladdr=e.mac, ifindex=ifindex,
                                state=NUD_PERMANENT)
            else:
                await ipr.neigh("del", dst=str(e.ip), ifindex=ifindex)
        elif op.action == "add":
            await ipr.route("replace", dst=str(e.dst), gateway=str(e.via), oif=ifindex,
                            flags=RTNH_F_ONLINK, proto=RTPROT_OVERLAY)
        else:
            await ipr.route("del", dst=str(e.dst), oif=ifindex, proto=RTPROT_OVERLAY)


async def find_underlay(
    ipr: Any,
    iface: str | None = None,
    iface_regex: str | None = None,
    public_ip: str | None = None,
) -> Underlay:
    """The interface and address VXLAN packets leave from.

    Order: --iface, then --iface-regex, then the interface holding --public-ip,
    then the interface of the default route, then the only interface with an
    IPv4 address. Every failure names what was looked for.
    """
    links = {m["index"]: m async for m in await ipr.link("dump")}
    addrs: dict[int, list[IPv4Interface]] = {}
    async for a in await ipr.addr("dump", family=socket.AF_INET):
        addrs.setdefault(a["index"], []).append(
            IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        )
    names = {i: m.get("IFLA_IFNAME") for i, m in links.items()}

    def usable(i: int) -> bool:
        """Not loopback and not one of our own devices (they carry pod addresses)."""
        n = names.get(i) or ""
        return (n != "cni0" and not n.startswith("overlay.")
                and any(not a.ip.is_loopback for a in addrs.get(i, [])))

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
            raise ConfigError("--iface-regex", f"no interface with an IPv4 address matches "
                              f"{iface_regex!r}")
    elif public_ip:
        candidates = [i for i, lst in addrs.items() if any(str(a.ip) == public_ip for a in lst)]
        if not candidates:
            raise ConfigError("--public-ip", f"{public_ip} is not an address of this host")
    else:
        candidates = []
        async for r in await ipr.route("dump", family=socket.AF_INET):
            if r["dst_len"] == 0 and r["table"] == 254 and r.get("RTA_OIF"):
                candidates.append(r.get("RTA_OIF"))
        if not candidates:
            candidates = [i for i in sorted(addrs) if usable(i)]
        if not candidates:
            raise ConfigError("--iface", "no default route and no interface with an IPv4 "
                              "address: say which interface to use with --iface")
    index = candidates[0]
    lst = addrs.get(index, [])
    if public_ip:
        chosen = [a for a in lst if str(a.ip) == public_ip]
    else:
        chosen = [a for a in lst if not a.ip.is_loopback and not a.ip.is_link_local] or lst
    if not chosen and public_ip:
        raise ConfigError("--public-ip", f"{public_ip} is not an address of {names[index]}")
    if not chosen:
        raise ConfigError("--iface", f"{names[index]} has no IPv4 address")
    link = links[index]
    return Underlay(
        ifname=names[index],
        ifindex=index,
        ip=chosen[0].ip,
        mtu=int(link.get("IFLA_MTU")),
        network=chosen[0].network,
    )
