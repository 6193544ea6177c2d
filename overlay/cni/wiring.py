"""Attach a pod to the node bridge: the netlink side of the CNI plugin.

Runs inside overlayd, which already has pyroute2 loaded. The container side
is reached through a netlink socket created in the pod's namespace (see
overlay.netns), from the namespace file descriptor the CNI client passed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address, ip_interface
from pathlib import Path
from typing import Any

from overlay.cni import podlink
from overlay.devnames import HOST_VETH_RE, host_veth_name
from overlay.linkget import get_link
from overlay.model import IPAddr, IPIface
from overlay.netns import netlink_socket, run_in_netns

log = logging.getLogger(__name__)

IFF_UP = 1
def random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


class WiringError(Exception):
    def __init__(self, what: str, code: int = 0) -> None:
        text = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})" if code else ""
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
    addresses: frozenset[IPIface] = frozenset()
    default_gw: IPv4Address | None = None
    peer_index: int | None = None  # the host end's index, for a veth
    # The IPv6 default route's gateway, if any.
    default_gw6: IPAddr | None = field(default=None)

    def gateway(self, version: int) -> IPAddr | None:
        return self.default_gw if version == 4 else self.default_gw6


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


async def link_index(ipr: Any, name: str) -> int | None:
    msg = await get_link(ipr, ifname=name)
    return None if msg is None else int(msg["index"])


# rtnetlink, for the link deleter (kept raw: it runs in worker threads).
RTM_DELLINK = 17
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
IFLA_IFNAME = 3
RTMGRP_LINK = 1


def _dellink_message(name: str, seq: int = 1) -> bytes:
    nm = name.encode() + b"\0"
    rta = struct.pack("=HH", 4 + len(nm), IFLA_IFNAME) + nm
    rta += b"\0" * (-len(rta) % 4)
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, 0, 0, 0) + rta
    return struct.pack("=IHHII", 16 + len(body), RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq,
                       0) + body


def _dellink_blocking(sock: socket.socket, name: str) -> int:
    """Delete link `name`; 0 or the errno. Blocks until the kernel is done (RCU barrier)."""
    try:
        sock.send(_dellink_message(name))
        while True:
            data = sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if mtype == NLMSG_ERROR and off + 20 <= len(data):
                    return -int(struct.unpack_from("=i", data, off + 16)[0])
                if length < 16:
                    break
                off += (length + 3) & ~3
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        sock.close()


def deleted_links(data: bytes) -> list[str]:
    """Names of the devices unregistered, from a batch of RTMGRP_LINK notifications."""
    names = []
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        # Family AF_UNSPEC: the device itself went away (AF_BRIDGE: it only left a bridge).
        if mtype == RTM_DELLINK and length >= 32 and data[off + 16] == socket.AF_UNSPEC:
            a, end = off + 32, min(off + length, len(data))
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype == IFLA_IFNAME:
                    names.append(data[a + 4:a + alen].split(b"\0", 1)[0].decode(
                        "utf-8", "replace"))
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return names


class LinkDeleter:
    """Deletes host links and returns as soon as the kernel has unregistered them.

    An RTM_DELLINK for a veth pair blocks its caller for ~15 ms, nearly all of
    it in the RCU barrier the kernel runs after the devices are already gone
    from every table (names, addresses, routes and bridge ports are released
    in the first millisecond, when the kernel announces the deletion). So the
    request runs in a worker thread, and the caller waits for whichever comes
    first: that announcement, or the request's own answer (an error, or the
    end of the request when the announcement was missed).
    """

    def __init__(self, workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cni-dellink")
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._monitor: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.Future[int]] = set()

    def _ensure_monitor(self) -> None:
        if self._monitor is not None:
            return
        loop = asyncio.get_running_loop()
        mon = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            mon.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            mon.bind((0, RTMGRP_LINK))
            mon.setblocking(False)
        except OSError:
            mon.close()
            raise
        loop.add_reader(mon.fileno(), self._on_events)
        self._monitor, self._loop = mon, loop

    def _on_events(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                data = self._monitor.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: events were lost; waiters fall back to the answer
                continue
            for name in deleted_links(data):
                fut = self._waiters.get(name)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def delete(self, name: str) -> bool:
        """Delete link `name` of this namespace. False if it did not exist."""
        loop = asyncio.get_running_loop()
        try:
            self._ensure_monitor()
        except OSError as exc:
            log.warning("link monitor unavailable (%s); deletions wait for the kernel", exc)
        gone = self._waiters.get(name)
        if gone is None:
            gone = self._waiters[name] = loop.create_future()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        except OSError as exc:
            raise WiringError(f"delete {name}", exc.errno or errno.EIO) from exc
        work = loop.run_in_executor(self._pool, _dellink_blocking, sock, name)
        either: set[asyncio.Future[Any]] = {gone, work}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._waiters.get(name) is gone:
                del self._waiters[name]
        if not work.done():
            # Unregistered: the worker finishes the kernel's cleanup on its own.
            self._pending.add(work)
            work.add_done_callback(self._finished(name))
            return True
        err = work.result()
        if err == errno.ENODEV:
            return gone.done()
        if err:
            raise WiringError(f"delete {name}", err)
        return True

    def _finished(self, name: str) -> Callable[[asyncio.Future[int]], None]:
        def done(work: asyncio.Future[int]) -> None:
            self._pending.discard(work)
            err = work.result()
            if err and err != errno.ENODEV:
                log.warning("deleting %s: %s", name, os.strerror(err))
        return done

    async def close(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=10)
        if self._monitor is not None and self._loop is not None:
            self._loop.remove_reader(self._monitor.fileno())
            self._monitor.close()
            self._monitor = None
        self._pool.shutdown(wait=False)


class PodWiring:
    def __init__(self, host_ipr: Any, bridge: str) -> None:
        self.ipr = host_ipr
        self.bridge = bridge
        self.deleter = LinkDeleter()
        self._bridge_idx: int | None = None
        self._host_nl: socket.socket | None = None

    async def close(self) -> None:
        await self.deleter.close()
        if self._host_nl is not None:
            self._host_nl.close()
            self._host_nl = None

    async def attach(
        self,
        ns_fd: int,
        container_id: str,
        ifname: str,
        addresses: Sequence[tuple[IPIface, IPAddr]],
        mtu: int,
        hairpin: bool = False,
    ) -> Attached:
        """Create and configure the veth pair; on failure remove what was made.

        The requests are podlink's hand-made ones: this is the pod-start path.
        """
        host = host_veth_name(container_id, ifname)
        host_mac, cont_mac = random_mac(), random_mac()
        host_nl = self._host_socket()
        cnl = netlink_socket(ns_fd)
        try:
            refreshed = removed_leftover = False
            while True:
                br = await self._bridge_index_cached()
                try:
                    podlink.request(host_nl, podlink.new_veth(host, host_mac, ifname, cont_mac,
                                                              mtu, br, ns_fd))
                    break
                except OSError as exc:
                    code = exc.errno or errno.EIO
                    if code == errno.EEXIST:
                        # Checked only now, to spare a round trip on every ADD.
                        if podlink.link_index(cnl, ifname) is not None:
                            raise WiringError(f"interface {ifname} already exists in the "
                                              "container") from None
                        if not removed_leftover:
                            # A veth left by an earlier, interrupted ADD for this pod.
                            removed_leftover = True
                            await self._delete_host(host)
                            continue
                    elif code in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP) and not refreshed:
                        # The bridge was recreated (the reconciler repairs drift): new index.
                        refreshed = True
                        self._bridge_idx = None
                        continue
                    raise WiringError(f"create veth pair {host} / {ifname}", code) from exc
            step = f"find {ifname} in the container"
            try:
                found = podlink.link_index(cnl, ifname)
                if found is None:
                    raise WiringError(f"{ifname} vanished from the container", errno.ENODEV)
                cidx, host_idx = found
                if hairpin:
                    step = f"set hairpin mode on {host}"
                    if host_idx is None:
                        raise WiringError(step, errno.ENODEV)
                    podlink.request(host_nl, podlink.hairpin(host_idx))
                step = f"configure {ifname} in the container"
                steps = podlink.configure_steps(addresses)
                try:
                    try:
                        podlink.request(cnl, podlink.configure(cidx, addresses, seq=1))
                    except podlink.RequestError as exc:
                        v6 = [(a, g) for a, g in addresses if a.version == 6]
                        if exc.errno != errno.EACCES or not v6:
                            raise
                        # IPv6 disabled on the interface (some runtimes set disable_ipv6
                        # in the pod's namespace): the pod asked for IPv6, so enable it
                        # there, as the bridge plugin does, and add the IPv6 part again.
                        run_in_netns(ns_fd, lambda: _enable_ipv6(ifname))
                        podlink.request(cnl, podlink.configure(cidx, v6, seq=1, up=False))
                except podlink.RequestError as exc:
                    step = f"{steps.get(exc.seq, 'configure')} ({ifname} in the container)"
                    raise
            except BaseException as exc:
                try:
                    await self._delete_host(host)
                except Exception as cleanup:  # must not hide the failure itself
                    log.warning("removing %s after a failed ADD: %s", host, cleanup)
                if isinstance(exc, WiringError | asyncio.CancelledError):
                    raise
                if isinstance(exc, Exception):
                    raise WiringError(step, _code(exc)) from exc
                raise
        finally:
            cnl.close()
        return Attached(host, host_mac, cont_mac)

    def _host_socket(self) -> socket.socket:
        if self._host_nl is None:
            sock = netlink_socket()
            sock.settimeout(10)  # answers are immediate; never a hung loop
            self._host_nl = sock
        return self._host_nl

    async def _bridge_index_cached(self) -> int:
        if self._bridge_idx is None:
            self._bridge_idx = await link_index(self.ipr, self.bridge)
            if self._bridge_idx is None:
                raise WiringError(f"bridge {self.bridge} does not exist", errno.ENODEV)
        return self._bridge_idx

    async def _delete_host(self, host: str) -> bool:
        return await self.deleter.delete(host)

    async def detach(self, container_id: str, ifname: str, ns_fd: int | None,
                     address: IPAddr | None = None) -> bool:
        """Remove the pod's veth pair, wherever it still is. True if something was removed.

        The pair goes with its host end, found by name. Only if that end is gone
        (renamed by someone) is the container end removed instead, and only when
        it is a veth carrying `address`, the pod's own: an interface of the same
        name that ADD refused to replace is not ours.
        """
        if await self._delete_host(host_veth_name(container_id, ifname)):
            return True
        if ns_fd is None or address is None:
            return False
        try:
            async with container_netlink(ns_fd) as cipr:
                msg = await get_link(cipr, ifname=ifname)
                li = msg.get("IFLA_LINKINFO") if msg is not None else None
                if li is None or li.get("IFLA_INFO_KIND") != "veth":
                    return False
                idx = int(msg["index"])
                ours = False
                async for a in await cipr.addr("dump", index=idx):
                    ours = ours or (a["index"] == idx and a.get("IFA_ADDRESS") == str(address))
                if not ours:
                    return False
                await cipr.link("del", index=idx)
                return True
        except OSError:
            return False

    async def host_view(self, container_id: str, ifname: str) -> tuple[str, int | None, int | None]:
        """(host veth name, its index or None, its master's index or None) for CHECK."""
        host = host_veth_name(container_id, ifname)
        msg = await get_link(self.ipr, ifname=host)
        if msg is None:
            return host, None, None
        return host, int(msg["index"]), msg.get("IFLA_MASTER")

    async def bridge_index(self) -> int | None:
        return await link_index(self.ipr, self.bridge)

    async def reattach(self, hosts: Iterable[str]) -> list[str]:
        """Put the host veths in `hosts` that exist but are not on the bridge back on it
        (the bridge was recreated: its ports went with the old one). Those moved."""
        names = list(hosts)
        self._bridge_idx = None
        if not names:  # no pods: nothing to ask the kernel
            return []
        br = await self._bridge_index_cached()
        moved = []
        for name in names:
            try:
                msg = await get_link(self.ipr, ifname=name)
                if msg is None or msg.get("IFLA_MASTER") == br:
                    continue
                await self.ipr.link("set", index=int(msg["index"]), master=br)
            except Exception as exc:
                if _code(exc) == errno.ENODEV:
                    continue  # the pod went meanwhile
                raise WiringError(f"attach {name} to {self.bridge}", _code(exc)) from exc
            moved.append(name)
        return moved

    async def orphans(self, keep: Iterable[str]) -> list[str]:
        """Our host veths on the bridge that belong to no attachment in `keep`."""
        br = await self.bridge_index()
        if br is None:
            return []
        wanted = set(keep)
        out = []
        async for m in await self.ipr.link("dump"):
            name = m.get("IFLA_IFNAME") or ""
            if m.get("IFLA_MASTER") == br and HOST_VETH_RE.match(name) and name not in wanted:
                out.append(name)
        return out

    async def container_view(self, ns_fd: int, ifname: str) -> ContainerView:
        async with container_netlink(ns_fd) as cipr:
            msg = await get_link(cipr, ifname=ifname)
            if msg is None:
                return ContainerView(False)
            idx = int(msg["index"])
            li = msg.get("IFLA_LINKINFO")
            addrs: set[IPIface] = set()
            async for a in await cipr.addr("dump", index=idx):
                if a["index"] == idx and a["family"] in (socket.AF_INET, socket.AF_INET6):
                    addrs.add(ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"))
            gws: dict[int, IPAddr | None] = {4: None, 6: None}
            for fam in (socket.AF_INET, socket.AF_INET6):
                async for r in await cipr.route("dump", family=fam):
                    if r["dst_len"] == 0 and r["table"] == 254 and r.get("RTA_OIF") == idx:
                        g = r.get("RTA_GATEWAY")
                        gws[4 if fam == socket.AF_INET else 6] = ip_address(g) if g else None
            gw = gws[4]
            peer = msg.get("IFLA_LINK")
            return ContainerView(
                True,
                li.get("IFLA_INFO_KIND") if li else None,
                (msg.get("IFLA_ADDRESS") or "").lower(),
                bool(msg["flags"] & IFF_UP),
                int(msg.get("IFLA_MTU") or 0),
                frozenset(addrs),
                gw if isinstance(gw, IPv4Address) else None,
                int(peer) if peer is not None else None,
                gws[6],
            )


def _enable_ipv6(ifname: str) -> None:
    """Runs inside the pod's namespace (the sysctl tree follows the thread's)."""
    Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("0\n")
