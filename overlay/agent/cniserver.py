"""The agent end of the CNI plugin: a unix socket server and the command handlers.

The `overlay` executable (native/overlay-cni.c) forwards env, stdin and the
pod's netns fd here (`overlay.cni.wire` is the format). Validation happens
before any side effect; a failed ADD removes the veth and releases the
address it allocated.

A DEL or GC that found this agent unreachable was recorded by the plugin, as
the very request bytes, in <run dir>/cni-pending/. They are replayed when the
agent starts, before the socket accepts anything, and again before any later
request is handled (a record written while the agent was starting): so an
address released that way is free before any ADD could want it, and the
pod's veth is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_interface
from pathlib import Path
from typing import Protocol

from overlay import metrics
from overlay.cni import spec, wire
from overlay.cni.ipam import AddressesExhausted, Ipam
from overlay.cni.spec import CniError
from overlay.cni.wiring import PodWiring, WiringError
from overlay.devnames import BRIDGE_NAME, host_veth_name
from overlay.errors import TemporaryError
from overlay.log import change_fields
from overlay.model import IPAddr, IPIface, IPNet, pod_gateway
from overlay.netns import same_netns

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class NodeNet:
    """What the CNI handlers need to know about the node, right now."""

    ready: bool
    reason: str = ""
    subnets: tuple[IPNet, ...] = ()  # one per pod address family, IPv4 first
    mtu: int = 1450
    bridge: str = BRIDGE_NAME
    bridge_mac: str = ""

    @property
    def subnet(self) -> IPNet | None:
        return self.subnets[0] if self.subnets else None

    @property
    def gateway(self) -> IPIface:
        assert self.subnet is not None
        return pod_gateway(self.subnet)


class Masquerade(Protocol):
    async def add(self, ip: IPAddr) -> None: ...
    async def remove(self, ip: IPAddr) -> None: ...


class CniService:
    def __init__(
        self,
        ipam: Ipam,
        wiring: PodWiring,
        node: Callable[[], NodeNet],
        masq: Masquerade | None = None,
        ipam6: Ipam | None = None,
    ) -> None:
        self.ipam = ipam
        # IPv6 addresses are allocated apart (overlay.cni.ipam): pods of an IPv6-only
        # or dual-stack node have a record there.
        self.ipam6 = ipam6
        self.wiring = wiring
        self.node = node
        self.masq = masq
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._path: Path | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: Path | None = None
        self._replaying = asyncio.Lock()

    # --- dispatch ---------------------------------------------------------

    async def handle(
        self, env: dict[str, str], stdin: bytes, ns_fd: int | None
    ) -> tuple[int, bytes]:
        command = env.get("CNI_COMMAND", "?")
        if command not in spec.COMMANDS:
            command = "invalid"  # a metrics label: never an arbitrary string
        t0 = time.perf_counter()
        version = spec.version_of(stdin)
        try:
            e = spec.parse_env(env)
            if e.command == "VERSION":
                return 0, spec.version_doc(version)
            conf = spec.parse_conf(stdin, e.command)
            version = conf.cni_version
            if e.command in ("ADD", "CHECK") and ns_fd is None:
                raise CniError(spec.E_INVALID_ENV,
                               f"CNI_NETNS {e.netns!r} cannot be opened",
                               env.get(wire.NETNS_ERROR, "no namespace file descriptor received"))
            if ns_fd is not None and same_netns(ns_fd):
                if e.command in ("ADD", "CHECK"):
                    raise CniError(spec.E_INVALID_ENV, f"CNI_NETNS {e.netns!r} is the node's own "
                                   "network namespace, not a container's")
                ns_fd = None  # DEL: never touch the node's own interfaces
            if e.command == "ADD":
                out = await self.add(e, conf, ns_fd)  # type: ignore[arg-type]
            elif e.command == "DEL":
                out = await self.delete(e, conf, ns_fd)
            elif e.command == "CHECK":
                out = await self.check(e, conf, ns_fd)  # type: ignore[arg-type]
            elif e.command == "GC":
                out = await self.gc(conf)
            else:
                out = self.status()
            metrics.CNI_REQUESTS.labels(command=e.command, result="ok").inc()
            return 0, out
        except CniError as err:
            metrics.CNI_REQUESTS.labels(command=command, result=str(err.code)).inc()
            log.info("CNI %s %s failed: [%d] %s %s", command, env.get("CNI_CONTAINERID", ""),
                     err.code, err.msg, err.details)
            return err.code, spec.error_doc(version, err)
        except Exception as exc:
            metrics.CNI_REQUESTS.labels(command=command, result="internal").inc()
            log.exception("CNI %s failed unexpectedly", command)
            internal = CniError(spec.E_INTERNAL, f"internal error in the overlay agent: {exc}")
            return internal.code, spec.error_doc(version, internal)
        finally:
            if command in spec.COMMANDS:
                metrics.CNI_SECONDS.labels(command=command).observe(time.perf_counter() - t0)

    def ipams(self) -> list[Ipam]:
        return [i for i in (self.ipam, self.ipam6) if i is not None]

    def _ipam_for(self, version: int) -> Ipam:
        if version == 4:
            return self.ipam
        if self.ipam6 is None:
            raise CniError(spec.E_INTERNAL, "IPv6 pod addresses are not configured in the agent")
        return self.ipam6

    async def add(self, e: spec.Env, conf: spec.NetConf, ns_fd: int) -> bytes:
        node = self.node()
        if not node.ready or not node.subnets:
            raise CniError(spec.E_TRY_AGAIN, "the overlay node agent is not ready; try again later",
                           _not_ready_details(node))
        mtu = conf.mtu or node.mtu
        if mtu > node.mtu:
            raise CniError(spec.E_INVALID_CONFIG, f"mtu: {mtu} is larger than the overlay MTU "
                           f"{node.mtu}; packets would be dropped")
        if conf.prev_result is not None:
            spec.parse_result(conf.prev_result)  # refuse a malformed one before any change
        # One address per family the node has (IPv4 first); each allocation that is new
        # is given back if anything after it fails.
        allocated: list[tuple[IPNet, IPAddr]] = []
        fresh: list[Ipam] = []
        try:
            for subnet in node.subnets:
                ipam = self._ipam_for(subnet.version)
                existing = ipam.find(e.container_id, e.ifname)
                alloc = ipam.allocate(subnet, e.container_id, e.ifname)
                if existing is None or existing.ip != alloc.ip:
                    fresh.append(ipam)
                allocated.append((subnet, alloc.ip))
        except AddressesExhausted as exc:
            for ipam in fresh:
                ipam.release(e.container_id, e.ifname)
            raise CniError(spec.E_NO_ADDRESS, "no free pod address on this node",
                           str(exc)) from None
        except BaseException:
            for ipam in fresh:
                ipam.release(e.container_id, e.ifname)
            raise
        config = [(ip_interface(f"{ip}/{subnet.prefixlen}"), pod_gateway(subnet).ip)
                  for subnet, ip in allocated]
        attached = None
        try:
            attached = await self.wiring.attach(ns_fd, e.container_id, e.ifname, config,
                                                mtu, conf.hairpin)
            if conf.ip_masq and self.masq is not None:
                for _, ip in allocated:
                    await self.masq.add(ip)
        except BaseException as exc:
            # Leave nothing behind: the veth (if made) and the addresses (if new).
            if attached is not None:
                with contextlib.suppress(Exception):
                    await self.wiring.detach(e.container_id, e.ifname, None)
            for ipam in fresh:
                ipam.release(e.container_id, e.ifname)
            if isinstance(exc, WiringError):
                code = spec.E_IFNAME_EXISTS if "already exists" in exc.what else spec.E_NETLINK
                raise CniError(code, f"cannot attach the pod: {exc}") from None
            if isinstance(exc, TemporaryError):
                raise CniError(spec.E_TRY_AGAIN, "cannot set up masquerading for the pod; try "
                               "again later", str(exc)) from None
            raise
        log.info("pod %s/%s attached: %s via %s", e.container_id[:12], e.ifname,
                 ", ".join(str(a) for a, _ in config), attached.host_ifname)
        ours = spec.Result(
            interfaces=(
                spec.Interface(node.bridge, node.bridge_mac),
                spec.Interface(attached.host_ifname, attached.host_mac),
                spec.Interface(e.ifname, attached.container_mac, e.netns),
            ),
            ips=tuple(spec.IPConfig(a, gw, 2) for a, gw in config),
            routes=tuple(spec.RouteR("0.0.0.0/0" if gw.version == 4 else "::/0", str(gw))
                         for _, gw in config),
            dns=conf.dns,
        )
        if conf.prev_result is not None:
            return spec.render(spec.chain_result(conf.prev_result, ours, conf.cni_version),
                               conf.cni_version)
        return spec.render(ours, conf.cni_version)

    async def delete(self, e: spec.Env, conf: spec.NetConf, ns_fd: int | None) -> bytes:
        if conf.lenient:
            log.warning("CNI DEL %s/%s: the network config is invalid (%s); removing the "
                        "attachment anyway", e.container_id[:12], e.ifname, conf.lenient)
        have = [a for ipam in self.ipams() if (a := ipam.find(e.container_id, e.ifname))]
        try:
            await self.wiring.detach(e.container_id, e.ifname, ns_fd,
                                     have[0].ip if have else None)
        except WiringError as exc:
            # Keep the addresses: the pod may still use them. The runtime retries DEL.
            raise CniError(spec.E_NETLINK, f"cannot remove the pod's veth: {exc}") from None
        for ipam in self.ipams():
            alloc = ipam.release(e.container_id, e.ifname)
            if alloc is not None and self.masq is not None:
                await self.masq.remove(alloc.ip)
            if alloc is not None:
                log.info("pod %s/%s detached, %s released", e.container_id[:12], e.ifname,
                         alloc.ip)
        return b""

    async def check(self, e: spec.Env, conf: spec.NetConf, ns_fd: int) -> bytes:
        if conf.prev_result is None:
            raise CniError(spec.E_INVALID_CONFIG, "prevResult: CHECK needs the result of ADD")
        prev = spec.parse_result(conf.prev_result)
        problems = []
        ours = [ip for ip in prev.ips
                if ip.interface is not None and 0 <= ip.interface < len(prev.interfaces)
                and prev.interfaces[ip.interface].name == e.ifname]
        if not ours:
            problems.append(f"prevResult has no address for {e.ifname}")
        allocs = [a for ipam in self.ipams() if (a := ipam.find(e.container_id, e.ifname))]
        if not allocs:
            problems.append(f"no address is allocated to {e.container_id}/{e.ifname}")
        for alloc in allocs:
            if not any(ip.address.ip == alloc.ip for ip in ours):
                problems.append(f"allocated address {alloc.ip} is not in prevResult")
        for family in sorted({s.version for s in self.node().subnets} - {a.ip.version
                                                                        for a in allocs}):
            if allocs:
                problems.append(f"no IPv{family} address is allocated to "
                                f"{e.container_id}/{e.ifname}")
        view = await self.wiring.container_view(ns_fd, e.ifname)
        host, host_index, master = await self.wiring.host_view(e.container_id, e.ifname)
        if not view.exists:
            problems.append(f"{e.ifname} does not exist in the container")
        else:
            if view.kind != "veth":
                problems.append(f"{e.ifname} is a {view.kind} device, not a veth")
            elif host_index is not None and view.peer_index != host_index:
                problems.append(f"{e.ifname} is not the peer of the host veth {host}")
            if not view.up:
                problems.append(f"{e.ifname} is down")
            for ip in ours:
                if ip.address not in view.addresses:
                    problems.append(f"{e.ifname} lacks address {ip.address}")
                have_gw = view.gateway(ip.address.version)
                if ip.gateway is not None and have_gw != ip.gateway:
                    what = "default route" if ip.address.version == 4 else "IPv6 default route"
                    problems.append(f"the {what} is via {have_gw or 'nothing'}, "
                                    f"not {ip.gateway}")
            mine = [i for i in prev.interfaces if i.name == e.ifname and i.sandbox]
            if mine and mine[0].mac and mine[0].mac.lower() != view.mac:
                problems.append(f"{e.ifname} has MAC {view.mac}, prevResult says {mine[0].mac}")
        if host_index is None:
            problems.append(f"the host veth {host} is missing")
        elif master is None:
            problems.append(f"the host veth {host} is not attached to a bridge")
        elif master != await self.wiring.bridge_index():
            problems.append(f"the host veth {host} is not attached to {self.wiring.bridge}")
        if not any(i.name == host and not i.sandbox for i in prev.interfaces):
            problems.append(f"prevResult does not list the host veth {host}")
        if problems:
            raise CniError(spec.E_CHECK_FAILED, "check failed", "; ".join(problems))
        return b""

    async def reattach(self) -> None:
        """The bridge was created again (deleted by hand, or while the agent was down): put
        every allocated pod's host veth back on it, so those pods are reachable again."""
        hosts = sorted({host_veth_name(a.container_id, a.ifname) for ipam in self.ipams()
                        for a in ipam.all()})
        if not hosts:
            return
        try:
            moved = await self.wiring.reattach(hosts)
        except WiringError as exc:  # the pods stay cut off; CHECK says why
            log.warning("could not put the pods' veths back on the new bridge: %s", exc)
            return
        for name in moved:
            log.info("attach %s to %s (repair: the bridge was recreated)", name,
                     self.wiring.bridge, extra=change_fields("device", "attach",
                                                             "bridge recreated", device=name))

    async def gc(self, conf: spec.NetConf) -> bytes:
        valid = conf.valid_attachments or ()
        for ipam in self.ipams():
            for a in ipam.gc(valid):
                with contextlib.suppress(WiringError):
                    await self.wiring.detach(a.container_id, a.ifname, None)
                if self.masq is not None:
                    await self.masq.remove(a.ip)
                log.info("GC released %s of %s/%s", a.ip, a.container_id[:12], a.ifname)
        # Veths whose allocation is already gone (an agent killed in the middle of an ADD).
        keep = [host_veth_name(c, i) for c, i in valid]
        keep += [host_veth_name(a.container_id, a.ifname) for ipam in self.ipams()
                 for a in ipam.all()]
        for name in await self.wiring.orphans(keep):
            with contextlib.suppress(WiringError):
                await self.wiring.deleter.delete(name)
                log.info("GC removed the orphaned veth %s", name)
        return b""

    def status(self) -> bytes:
        node = self.node()
        if not node.ready:
            raise CniError(spec.E_PLUGIN_NOT_AVAILABLE, "the overlay node agent is not ready",
                           _not_ready_details(node))
        return b""

    # --- requests recorded while the agent was unreachable ----------------------

    async def replay_pending(self) -> None:
        """Complete the DELs and GCs the plugin recorded while it could not reach us."""
        if self._pending is None:
            return
        try:
            names = os.listdir(self._pending)
        except OSError:
            return
        if not any(n.endswith(".req") for n in names):
            return  # the common case: one directory read per request
        async with self._replaying:
            for name in sorted(os.listdir(self._pending)):
                if name.endswith(".req"):
                    await self._replay(self._pending / name)

    async def _replay(self, path: Path) -> None:
        try:
            env, stdin = wire.parse_request(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("dropping the unreadable CNI record %s: %s", path.name, exc)
            path.unlink(missing_ok=True)
            return
        command = env.get("CNI_COMMAND", "")
        what = f"CNI {command} {env.get('CNI_CONTAINERID', '')[:12]}/{env.get('CNI_IFNAME', '')}"
        if command not in ("DEL", "GC"):
            log.warning("dropping the CNI record %s: %s is never recorded", path.name, what)
            path.unlink(missing_ok=True)
            return
        code, out = await self.handle(env, stdin, None)
        if code == spec.E_NETLINK:
            log.warning("%s, recorded while overlayd was unreachable, failed; retried on the "
                        "next request: %s", what, out.decode(errors="replace").strip())
            return
        if code:
            log.warning("%s, recorded while overlayd was unreachable, is refused: %s", what,
                        out.decode(errors="replace").strip())
        else:
            log.info("%s, recorded while overlayd was unreachable, done", what)
        path.unlink(missing_ok=True)

    # --- transport ----------------------------------------------------------

    async def start(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._pending = path.parent / wire.PENDING_DIR
        self._pending.mkdir(mode=0o700, exist_ok=True)
        await self.replay_pending()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
        self._sock = sock
        self._path = path
        self._accept_task = asyncio.create_task(self._accept_loop(), name="cni-accept")

    async def close(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None and self._path is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        for t in list(self._tasks):
            t.cancel()
        await self.wiring.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            t = asyncio.create_task(self._serve(conn))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        ns_fd: int | None = None
        try:
            conn.setblocking(False)
            data, fds = await _recv_with_fds(loop, conn)
            ns_fd = fds[0] if fds else None
            for extra in fds[1:]:
                os.close(extra)
            while len(data) < len(wire.MAGIC) + 4:
                data += await _recv_some(loop, conn)
            env, stdin = await _read_request(loop, conn, data)
            await self.replay_pending()
            code, out = await self.handle(env, stdin, ns_fd)
            await loop.sock_sendall(conn, wire.response_bytes(code, out))
        except (ConnectionError, ValueError, OSError) as exc:
            log.warning("bad CNI request: %s", exc)
        finally:
            if ns_fd is not None:
                os.close(ns_fd)
            conn.close()


async def _recv_some(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    chunk = await asyncio.wait_for(loop.sock_recv(conn, 65536), 30)
    if not chunk:
        raise ConnectionError("client closed the connection early")
    return chunk


async def _recv_with_fds(loop: asyncio.AbstractEventLoop, conn: socket.socket
                         ) -> tuple[bytes, list[int]]:
    fut: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    try:
        await asyncio.wait_for(fut, 30)
    finally:
        loop.remove_reader(conn.fileno())
    data, fds, _, _ = socket.recv_fds(conn, 65536, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("client closed the connection early")
    return data, list(fds)


async def _read_request(loop: asyncio.AbstractEventLoop, conn: socket.socket, data: bytes
                        ) -> tuple[dict[str, str], bytes]:
    if not data.startswith(wire.MAGIC):
        raise ValueError("not an overlay CNI request")
    pos = len(wire.MAGIC)

    async def need(n: int) -> None:
        nonlocal data
        while len(data) < pos + n:
            data += await _recv_some(loop, conn)

    await need(4)
    hlen = int.from_bytes(data[pos:pos + 4], "big")
    if hlen > wire.MAX_FIELD:
        raise ValueError("request header too large")
    pos += 4
    await need(hlen + 4)
    env = wire.parse_env_block(data[pos:pos + hlen])
    pos += hlen
    blen = int.from_bytes(data[pos:pos + 4], "big")
    if blen > wire.MAX_FIELD:
        raise ValueError("request body too large")
    pos += 4
    await need(blen)
    return env, data[pos:pos + blen]


def _not_ready_details(node: NodeNet) -> str:
    if not node.subnets:
        return (f"this node has no pod subnet yet ({node.reason or 'starting'}); pods start "
                "once overlayd holds a subnet lease")
    return node.reason or "starting"
