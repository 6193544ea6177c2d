"""Attach a pod to the node bridge: the netlink side of the CNI plugin.

Runs inside overlayd, which already has pyroute2 loaded. The container side
is reached through a netlink socket created in the pod's namespace (see
overlay.netns), from the namespace file descriptor the CNI client passed.
"""

from __future__ import annotations

import errno
import hashlib
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from overlay.netns import netlink_socket

IFF_UP = 1


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL finds it without the container's namespace."""
    return "veth" + hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()[:11]


def random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


class WiringError(Exception):
    def __init__(self, what: str, code: int = 0) -> None:
        text = errno.errorcode.get(code, str(code)) if code else ""
        super().__init__(f"{what}: {text}" if text else what)
        self.what = what
        self.code = code


def _code(exc: BaseException) -> int:
    c = getattr(exc, "code", None)
    if isinstance(c, int):
        return c
    return exc.errno if isinstance(exc, OSError) and exc.errno else 0


@dataclass(frozen=True)
class Attached:
    host_ifname: str
    host_mac: str
    container_mac: str


@dataclass(frozen=True)
class ContainerView:
    """What the pod's namespace has, for CHECK."""

    exists: bool
    kind: str | None = None
    mac: str = ""
    up: bool = False
    mtu: int = 0
    addresses: frozenset[IPv4Interface] = frozenset()
    default_gw: IPv4Address | None = None


@asynccontextmanager
async def container_netlink(ns_fd: int) -> AsyncIterator[Any]:
    from pyroute2 import AsyncIPRoute

    sock = netlink_socket(ns_fd)
    ipr = AsyncIPRoute(use_socket=sock)
    try:
        yield ipr
    finally:
        ipr.close()
        sock.close()


async def _first(res: Any) -> Any:
    if hasattr(res, "__aiter__"):
        async for m in res:
            return m
        return None
    for m in res:
        return m
    return None


async def link_index(ipr: Any, name: str) -> int | None:
    try:
        msg = await _first(await ipr.link("get", ifname=name))
    except Exception as exc:
        if _code(exc) == errno.ENODEV:
            return None
        raise
    return None if msg is None else int(msg["index"])


class PodWiring:
    def __init__(self, host_ipr: Any, bridge: str) -> None:
        self.ipr = host_ipr
        self.bridge = bridge

    async def attach(
        self,
        ns_fd: int,
        container_id: str,
        ifname: str,
        address: IPv4Interface,
        gateway: IPv4Address,
        mtu: int,
        hairpin: bool = False,
    ) -> Attached:
        """Create and configure the veth pair; on failure remove what was made."""
        host = host_veth_name(container_id, ifname)
        host_mac, cont_mac = random_mac(), random_mac()
        br = await link_index(self.ipr, self.bridge)
        if br is None:
            raise WiringError(f"bridge {self.bridge} does not exist", errno.ENODEV)
        async with container_netlink(ns_fd) as cipr:
            if await link_index(cipr, ifname) is not None:
                raise WiringError(f"interface {ifname} already exists in the container",
                                  errno.EEXIST)
            created = False
            try:
                for attempt in (1, 2):
                    try:
                        await self.ipr.link(
                            "add", ifname=host, kind="veth", address=host_mac, mtu=mtu,
                            master=br, flags=IFF_UP, change=IFF_UP,
                            peer={"ifname": ifname, "net_ns_fd": ns_fd, "address": cont_mac,
                                  "mtu": mtu},
                        )
                        created = True
                        break
                    except Exception as exc:
                        if _code(exc) == errno.EEXIST and attempt == 1:
                            # A veth left by an earlier, interrupted ADD for this pod.
                            await self._delete_host(host)
                            continue
                        raise WiringError(f"create veth {host}", _code(exc)) from exc
                if hairpin:
                    idx = await link_index(self.ipr, host)
                    await self.ipr.brport("set", index=idx, hairpin=1)
                cidx = await link_index(cipr, ifname)
                if cidx is None:
                    raise WiringError(f"{ifname} vanished from the container", errno.ENODEV)
                try:
                    await cipr.addr("add", index=cidx, address=str(address.ip),
                                    prefixlen=address.network.prefixlen)
                    await cipr.link("set", index=cidx, state="up")
                    await cipr.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=cidx)
                except Exception as exc:
                    raise WiringError(f"configure {ifname} in the container", _code(exc)) from exc
            except BaseException:
                if created:
                    await self._delete_host(host)
                raise
        return Attached(host, host_mac, cont_mac)

    async def _delete_host(self, host: str) -> bool:
        idx = await link_index(self.ipr, host)
        if idx is None:
            return False
        try:
            await self.ipr.link("del", index=idx)
        except Exception as exc:
            if _code(exc) != errno.ENODEV:
                raise WiringError(f"delete {host}", _code(exc)) from exc
            return False
        return True

    async def detach(self, container_id: str, ifname: str, ns_fd: int | None) -> bool:
        """Remove the pod's veth pair, wherever it still is. True if something was removed."""
        if await self._delete_host(host_veth_name(container_id, ifname)):
            return True
        if ns_fd is None:
            return False
        # The host end is gone but the pod may still hold its end (renamed host side).
        try:
            async with container_netlink(ns_fd) as cipr:
                idx = await link_index(cipr, ifname)
                if idx is None:
                    return False
                msg = await _first(await cipr.link("get", index=idx))
                li = msg.get("IFLA_LINKINFO") if msg is not None else None
                if li is None or li.get("IFLA_INFO_KIND") != "veth":
                    return False
                await cipr.link("del", index=idx)
                return True
        except OSError:
            return False

    async def host_view(self, container_id: str, ifname: str) -> tuple[str, int | None, bool]:
        """(host veth name, its master's index or None, hairpin) for CHECK."""
        host = host_veth_name(container_id, ifname)
        msg = None
        try:
            msg = await _first(await self.ipr.link("get", ifname=host))
        except Exception as exc:
            if _code(exc) != errno.ENODEV:
                raise
        if msg is None:
            return host, None, False
        return host, msg.get("IFLA_MASTER"), False

    async def bridge_index(self) -> int | None:
        return await link_index(self.ipr, self.bridge)

    async def container_view(self, ns_fd: int, ifname: str) -> ContainerView:
        async with container_netlink(ns_fd) as cipr:
            idx = await link_index(cipr, ifname)
            if idx is None:
                return ContainerView(False)
            msg = await _first(await cipr.link("get", index=idx))
            li = msg.get("IFLA_LINKINFO")
            addrs = set()
            async for a in await cipr.addr("dump", family=socket.AF_INET, index=idx):
                if a["index"] == idx:
                    addrs.add(IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
            gw = None
            async for r in await cipr.route("dump", family=socket.AF_INET):
                if r["dst_len"] == 0 and r["table"] == 254 and r.get("RTA_OIF") == idx:
                    g = r.get("RTA_GATEWAY")
                    gw = IPv4Address(g) if g else None
            return ContainerView(
                True,
                li.get("IFLA_INFO_KIND") if li else None,
                (msg.get("IFLA_ADDRESS") or "").lower(),
                bool(msg["flags"] & IFF_UP),
                int(msg.get("IFLA_MTU") or 0),
                frozenset(addrs),
                gw,
            )


def in_subnet(ip: IPv4Address, subnet: IPv4Network) -> bool:
    return ip in subnet
