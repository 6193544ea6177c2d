"""overlayd: the node agent, as one supervised set of asyncio tasks.

Start-up: serve the CNI socket and the local API at once (answering "not
ready" until the node is), read the network config, find the underlay, lease
a subnet, reconcile the kernel once from a fresh listing of the leases (so
entries of peers that vanished while we were down go away), then run the
lease keep-alive, the lease watch, the reconciler, the config watch and the
membership protocol (overlay.membership) together. If any of them dies the
others are cancelled and overlayd exits non-zero; the kernel state and the
lease are left in place, so a restart does not disturb running pods.

Degraded start: when etcd cannot be reached within --etcd-startup-timeout
and the state dir has the network config, the subnet and the peers of the
last run, the agent starts from them, gossips its own (possibly new) record
so that peers reprogram it, and re-takes its lease when etcd returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from overlay import __version__, metrics
from overlay.agent import state
from overlay.agent.cniserver import CniService, NodeNet
from overlay.agent.lease import LeaseManager, Template
from overlay.agent.peers import PeerTable
from overlay.agent.sdnotify import Notifier
from overlay.cni.ipam import Ipam
from overlay.cni.wiring import PodWiring
from overlay.dataplane.devices import VXLAN_OVERHEAD_V4, BridgeSpec, VxlanSpec, stable_mac
from overlay.dataplane.kernel import ChangeMonitor, NetlinkKernel, Underlay, find_underlay
from overlay.dataplane.reconciler import Reconciler, Specs
from overlay.devnames import BRIDGE_NAME, vxlan_name
from overlay.errors import ConfigError, NotFound, PermanentError, TemporaryError
from overlay.etcdstore import EtcdOptions, EtcdStore, WatchLost
from overlay.log import change_fields
from overlay.membership.swim import SwimConfig
from overlay.membership.tls import TlsFiles
from overlay.model import LeaseEntry, NetworkConfig, validate_network

log = logging.getLogger("overlayd")


@dataclass(frozen=True)
class AgentOptions:
    etcd: EtcdOptions = field(default_factory=EtcdOptions)
    node_name: str | None = None
    iface: str | None = None
    iface_regex: str | None = None
    public_ip: str | None = None
    mtu: int | None = None
    vtep_mac: str | None = None
    grpc_listen: str = "0.0.0.0:7946"
    grpc_advertise: str | None = None
    run_dir: Path = Path("/run/overlay")
    state_dir: Path = Path("/var/lib/overlay")
    lease_ttl: int = 60
    reconcile_interval: float = 10.0
    health_addr: str | None = None
    metrics_addr: str | None = None
    ip_masq: bool = False
    vxlan_filter: bool = True
    membership: SwimConfig = field(default_factory=SwimConfig)
    tls: TlsFiles | None = None
    etcd_startup_timeout: float = 1.0


@dataclass
class Condition:
    ok: bool = False
    message: str = "not checked yet"


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.started = time.time()
        self.cfg: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.mtu = 0
        self.store: EtcdStore | None = None
        self.lease: LeaseManager | None = None
        self.peers: PeerTable | None = None
        self.reconciler: Reconciler | None = None
        self.kernel: NetlinkKernel | None = None
        self.vxlan_filter: Any = None  # overlay.agent.vxlanfilter.VxlanFilter when on
        self._stale_filter: Any = None  # one to remove at start-up, when off
        self.membership: Any = None  # overlay.membership.service.Membership once started
        self.degraded = False
        self._etcd_down_at_start = False
        self.incarnation = 0
        self.node = ""
        self.vtep_mac = ""
        self.conditions: dict[str, Condition] = {
            k: Condition() for k in ("etcd", "config", "lease", "device", "reconciled")
        }
        self._closers: list[Any] = []
        self._stop = asyncio.Event()
        self._leave = False
        self._main_task: asyncio.Task[Any] | None = None
        self.notifier = Notifier()  # systemd Type=notify ($NOTIFY_SOCKET)
        self._notified = ""
        self._cfg_bad = ""  # the last refusal of the config in etcd, logged once
        self._cfg_msg = ""  # the last "config changed, restart" warning, logged once

    # --- what other parts ask -------------------------------------------------

    def set_condition(self, name: str, ok: bool, message: str = "") -> None:
        c = self.conditions.setdefault(name, Condition())
        c.ok, c.message = ok, message or ("ok" if ok else "failing")

    def ready(self) -> bool:
        return all(self.conditions[k].ok for k in ("lease", "device", "reconciled"))

    def refresh_conditions(self) -> None:
        """Conditions that are read from state on demand (the status loop starts later)."""
        if self.lease is not None and self.lease.current is None and self.lease.last_error:
            self.set_condition("lease", False, f"no subnet yet: {self.lease.last_error}")

    def not_ready_reason(self) -> str:
        bad = [f"{k}: {c.message}" for k, c in self.conditions.items()
               if not c.ok and k in ("config", "lease", "device", "reconciled")]
        return "; ".join(bad) or "starting"

    def node_net(self) -> NodeNet:
        self.refresh_conditions()
        subnet = self.lease.subnet if self.lease else None
        ready = self.ready() and subnet is not None
        return NodeNet(
            ready=ready,
            reason="" if ready else self.not_ready_reason(),
            subnet=subnet,
            mtu=self.mtu or 1450,
            bridge=BRIDGE_NAME,
            bridge_mac=self.bridge_mac,
        )

    @property
    def bridge_mac(self) -> str:
        return stable_mac(f"bridge:{self.node}") if self.node else ""

    # --- lifecycle ------------------------------------------------------------

    async def run(self) -> int:
        opts = self.opts
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        self._main_task = main
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig, main)
        opts.run_dir.mkdir(parents=True, exist_ok=True)
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_servers()
            await self._main()
            return 0
        except asyncio.CancelledError:
            if self._stop.is_set():
                if self._leave:
                    # Every task has stopped: nothing can put back what leave() removes.
                    await self.leave()
                log.info("stopped%s", " after leaving the cluster" if self._leave else
                         "; the kernel state and the lease are kept for the next start")
                return 0
            raise
        except PermanentError as exc:
            log.error("invalid configuration: %s" if isinstance(exc, ConfigError) else "%s", exc)
            return 2
        except BaseExceptionGroup as group:
            # A supervised task died: the others were cancelled; say which and why.
            for failure in group.exceptions:
                if isinstance(failure, PermanentError):
                    log.error("%s", failure)
                    return 2
                log.error("task failed: %s", failure, exc_info=failure)
            return 1
        finally:
            for closer in reversed(self._closers):
                with contextlib.suppress(Exception):
                    res = closer()
                    if asyncio.iscoroutine(res):
                        await res

    def _on_signal(self, sig: int, main: asyncio.Task[Any]) -> None:
        log.info("received %s, stopping", signal.Signals(sig).name)
        self.notifier.stopping(f"stopping on {signal.Signals(sig).name}")
        self._stop.set()
        main.cancel()

    def request_leave(self) -> None:
        """Leave gracefully: stop every task, then release the lease and remove devices."""
        log.info("leave requested")
        self.notifier.stopping("leaving the cluster")
        self._leave = True
        self._stop.set()
        if self._main_task is not None:
            self._main_task.cancel()

    async def _start_servers(self) -> None:
        from overlay.agent.localapi import start_local_api

        opts = self.opts
        self.kernel = NetlinkKernel()
        self._closers.append(self.kernel.close)
        from pyroute2 import AsyncIPRoute

        cni_ipr = AsyncIPRoute()
        self._closers.append(cni_ipr.close)
        ipam = Ipam(opts.run_dir / "ipam")
        fixed = ipam.repair()
        if fixed:
            log.warning("IPAM: repaired %d records left inconsistent by a crash", fixed)
        from overlay.agent.masq import NftMasquerade

        masq = NftMasquerade(lambda: self.cfg.network if self.cfg else None,
                             lambda: self.lease.subnet if self.lease else None,
                             opts.run_dir / "masq", whole_node=opts.ip_masq)
        self._closers.append(masq.close)
        self.cni = CniService(ipam, PodWiring(cni_ipr, BRIDGE_NAME), self.node_net, masq)
        self.masq = masq
        await self.cni.start(opts.run_dir / "cni.sock")
        self._closers.append(self.cni.close)
        server = await start_local_api(self, opts.run_dir / "overlayd.sock")
        self._closers.append(lambda: server.stop(0.5))
        if opts.health_addr or opts.metrics_addr:
            from overlay.agent.http import HttpServer, json_route, metrics_route, split_hostport

            def health() -> tuple[bool, dict[str, object]]:
                return True, {"status": "alive", "version": __version__}

            def ready() -> tuple[bool, dict[str, object]]:
                ok = self.ready()
                return ok, {"ready": ok, "conditions": {k: {"ok": c.ok, "message": c.message}
                                                        for k, c in self.conditions.items()}}

            def scrape() -> tuple[int, str, bytes]:
                self.refresh_metrics()
                return metrics_route()

            routes = {"/healthz": json_route(health), "/readyz": json_route(ready)}
            if opts.health_addr:
                srv = HttpServer({**routes, "/metrics": scrape})
                await srv.start(*split_hostport(opts.health_addr, "--health-addr"),
                                "--health-addr")
                self._closers.append(srv.close)
            if opts.metrics_addr and opts.metrics_addr != opts.health_addr:
                msrv = HttpServer({"/metrics": scrape, **routes})
                await msrv.start(*split_hostport(opts.metrics_addr, "--metrics-addr"),
                                 "--metrics-addr")
                self._closers.append(msrv.close)

    async def _main(self) -> None:
        opts = self.opts
        assert self.kernel is not None
        # The underlay first: a wrong --iface fails at once, even while etcd is down.
        self.underlay = underlay = await find_underlay(
            self.kernel.ipr, opts.iface, opts.iface_regex, opts.public_ip)
        self.store = store = EtcdStore(opts.etcd)
        await store.connect()
        self._closers.append(store.close)

        self.cfg = cfg = await self._wait_config(store, state.load_network(opts.state_dir))
        try:
            validate_network(cfg, (underlay.network,))
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{exc.message} (underlay {underlay.ifname})") from None
        self.mtu = opts.mtu or underlay.mtu - VXLAN_OVERHEAD_V4
        if opts.mtu and opts.mtu > underlay.mtu - VXLAN_OVERHEAD_V4:
            log.warning("--mtu %d exceeds %s's MTU %d minus the %d-byte VXLAN overhead: large "
                        "packets will be dropped", opts.mtu, underlay.ifname, underlay.mtu,
                        VXLAN_OVERHEAD_V4)
        if self.mtu < 576:
            raise ConfigError("--mtu", f"overlay MTU {self.mtu} is below 576")
        log.info("underlay %s, address %s, MTU %d: overlay MTU %d", underlay.ifname,
                 underlay.ip, underlay.mtu, self.mtu)

        ident = state.resolve(opts.state_dir, opts.node_name, opts.vtep_mac)
        self.node, self.vtep_mac = ident.node, ident.vtep_mac
        tls = None
        if opts.tls is not None:
            from overlay.membership import tls as tlsmod

            tls = tlsmod.load(opts.tls, ident.node)
        self.incarnation = state.next_incarnation(ident.incarnation, int(time.time() * 1000))
        grpc_addr = opts.grpc_advertise or f"{underlay.ip}:{opts.grpc_listen.rpartition(':')[2]}"
        template = Template(ident.node, str(underlay.ip), ident.vtep_mac, grpc_addr)
        self.peers = PeerTable(ident.node)
        self.lease = LeaseManager(store, cfg, template, opts.lease_ttl, ident.subnet)
        self.lease.on_change = self._lease_changed
        self.set_condition("lease", False, "acquiring a subnet lease")
        self.notifier.status("acquiring a subnet lease")
        entry, pending = await self._acquire_or_assume(ident, template)
        if pending is None:
            metrics.LEASE_ACQUISITIONS.inc()
            self.set_condition("lease", True, f"holding {entry.record.subnet}")
            self.set_condition("etcd", True, "reachable")
            metrics.ETCD_UP.set(1)
        self._save_identity(entry)
        state.save_network(opts.state_dir, cfg)

        from overlay.membership.service import Membership

        self.membership = ms = Membership(
            entry.record, entry.mod_revision, self.incarnation, opts.membership,
            opts.grpc_listen, tls, lambda: self.peers.entries if self.peers else {},
            self._membership_changed)
        self._closers.append(ms.close)
        monitor = ChangeMonitor()
        self._closers.append(monitor.close)
        self.reconciler = Reconciler(self.kernel, ms.peer_records, opts.reconcile_interval,
                                     self._vxlan_filter_hook(cfg), monitor)
        self.reconciler.set_specs(self._specs(entry))
        if pending is None:
            snap = await self._list_until_ok(store)
        else:
            snap = state.load_peers(opts.state_dir) or self.peers.snapshot()
        self.peers.reset(snap)
        self.peers.listeners.append(ms.sync_etcd)
        await ms.start()
        if self._stale_filter is not None:
            await self._stale_filter.remove()
        enable_forwarding()
        await self._first_reconcile()
        if opts.ip_masq or self.masq.has_pods():
            await self.masq.ensure()
        else:
            await self.masq.discard()
        log.info("node %s ready%s: subnet %s, %d peers", self.node,
                 " (DEGRADED: etcd unreachable)" if self.degraded else "", entry.record.subnet,
                 len(self.peers.peer_records()))
        metrics.READY.set(1)
        # systemd: started only now that the lease, the devices and the first
        # reconcile are done, so pods scheduled after this get an address.
        self._notified = self._ready_status()
        self.notifier.ready(self._notified)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._lease_loop(pending), name="lease-keepalive")
            tg.create_task(self._watch(store, None if pending else snap.revision),
                           name="lease-watch")
            tg.create_task(self._run_reconciler(), name="reconciler")
            tg.create_task(self._watch_config(store), name="config-watch")
            tg.create_task(self._conditions_loop(), name="conditions")
            tg.create_task(ms.run(), name="membership")
            tg.create_task(self._persist_peers(), name="persist-peers")

    async def _acquire_or_assume(self, ident: state.Identity, template: Template
                                 ) -> tuple[LeaseEntry, asyncio.Task[LeaseEntry] | None]:
        """Our lease from etcd; or, if etcd does not answer in time and the state dir has
        our last lease, that one (degraded) with the acquisition still running."""
        assert self.lease is not None
        # Retry often: when etcd returns after a long outage our key may have expired,
        # and peers do not program us until we hold a lease again.
        task = asyncio.create_task(self.lease.acquire(retry_max=1.0), name="lease-acquire")
        if not (ident.subnet and ident.lease_revision):
            return await task, None
        # (no second wait when etcd already did not answer for the config)
        wait = 0.0 if self._etcd_down_at_start else self.opts.etcd_startup_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait), None
        except TimeoutError:
            pass
        self._closers.append(task.cancel)
        entry = LeaseEntry(template.record(ident.subnet), ident.lease_revision, 0)
        self.lease.assume(entry)
        self.degraded = True
        msg = (f"unreachable at start-up: running DEGRADED from the state saved in "
               f"{self.opts.state_dir} (subnet {ident.subnet}, lease revision "
               f"{ident.lease_revision}); peers learn our record by gossip; the lease is "
               "re-taken when etcd answers")
        log.warning("etcd %s", msg)
        self.set_condition("etcd", False, msg)
        self.set_condition("lease", True, f"assumed {ident.subnet} from the saved state")
        return entry, task

    async def _lease_loop(self, pending: asyncio.Task[LeaseEntry] | None) -> None:
        assert self.lease is not None
        if pending is not None:
            entry = await pending
            log.info("etcd answers again: lease for %s re-taken; no longer degraded",
                     entry.record.subnet)
            self.degraded = False
            await self._lease_changed(entry)
        await self.lease.keep_alive()

    def _save_identity(self, entry: LeaseEntry) -> None:
        state.save(self.opts.state_dir, state.Identity(
            self.node, self.vtep_mac, entry.record.subnet, entry.mod_revision, self.incarnation))

    def _membership_changed(self) -> None:
        if self.reconciler is not None:
            self.reconciler.wake()

    async def _persist_peers(self, interval: float = 2.0) -> None:
        """Keep the last listing of the leases on disk, for a start without etcd."""
        assert self.peers is not None
        saved = self.peers.revision if self.degraded else -1
        while True:
            await asyncio.sleep(interval)
            if self.peers.synced and self.peers.revision != saved and not self.degraded:
                try:
                    state.save_peers(self.opts.state_dir, self.peers.snapshot())
                    saved = self.peers.revision
                except OSError as exc:
                    log.warning("cannot save the peers to %s: %s", self.opts.state_dir, exc)

    async def leave(self) -> None:
        """Graceful leave: tell the peers, give the subnet back and remove our devices."""
        log.info("leaving the cluster: telling the peers, releasing the lease and removing "
                 "the devices")
        if self.membership is not None:
            with contextlib.suppress(Exception):
                await self.membership.leave()
        if self.lease is not None:
            with contextlib.suppress(TemporaryError):
                await self.lease.release()
        if self.kernel is not None and self.reconciler is not None and self.reconciler.specs:
            from overlay.dataplane.devices import DeviceOp

            specs = self.reconciler.specs
            for name in (specs.vxlan.name, specs.bridge.name):
                with contextlib.suppress(Exception):
                    await self.kernel.apply_device_ops([DeviceOp("delete", name, None, "leave")])
        if self.vxlan_filter is not None:
            await self.vxlan_filter.remove()

    def _vxlan_filter_hook(self, cfg: NetworkConfig) -> Any:
        from overlay.agent.vxlanfilter import VxlanFilter

        filt = VxlanFilter(cfg.port)
        if not self.opts.vxlan_filter:
            log.warning("VXLAN filter disabled (--no-vxlan-filter): any host on the underlay "
                        "can inject packets into pods")
            # A table left by an earlier run with the filter on would still drop traffic.
            self._stale_filter = filt
            return None
        self.vxlan_filter = filt

        async def sync(want: Any) -> None:
            await filt.sync(f.dst for f in want.fdbs)

        return sync

    async def _first_reconcile(self) -> None:
        assert self.reconciler is not None
        delay = 0.2
        while True:
            try:
                res = await self.reconciler.reconcile_once()
                if res.ok:
                    break
                msg = "; ".join(res.errors[:3])
            except TemporaryError as exc:
                msg = str(exc)
            self.set_condition("reconciled", False, msg)
            log.warning("first reconcile incomplete: %s; retrying", msg)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5)
        self.reconciler.first_done.set()
        self.set_condition("device", True, f"{self.reconciler.specs.vxlan.name} up"
                           if self.reconciler.specs else "up")
        self.set_condition("reconciled", True, "kernel matches the leases")

    async def _run_reconciler(self) -> None:
        assert self.reconciler is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.reconciler.run(), name="reconcile-loop")
            if self.vxlan_filter is not None:
                tg.create_task(self._verify_filter(), name="vxlan-filter-verify")

    async def _verify_filter(self) -> None:
        assert self.reconciler is not None and self.vxlan_filter is not None
        while True:
            await asyncio.sleep(self.vxlan_filter.VERIFY_INTERVAL)
            if await self.vxlan_filter.verify():
                self.reconciler.wake()

    async def _conditions_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            lease, rec = self.lease, self.reconciler
            if lease is not None:
                if lease.current is None:
                    self.set_condition("lease", False, "no subnet lease")
                elif lease.assumed:
                    self.set_condition("lease", True, f"assumed {lease.subnet} from the saved "
                                       "state (etcd unreachable)")
                else:
                    self.set_condition("lease", True, f"holding {lease.subnet}")
                if not self.degraded:
                    self.set_condition("etcd", lease.healthy, "reachable" if lease.healthy
                                       else "cannot renew the lease")
                metrics.ETCD_UP.set(1 if lease.healthy else 0)
            if rec is not None and rec.last_error:
                self.set_condition("reconciled", False, rec.last_error)
            elif rec is not None:
                self.set_condition("reconciled", True, "kernel matches the leases")
            if self.membership is not None:
                self.set_condition("membership", *self.membership.condition())
            metrics.READY.set(1 if self.ready() else 0)
            status = self._ready_status()
            if status != self._notified:
                self._notified = status
                self.notifier.status(status)

    def _ready_status(self) -> str:
        """One line for `systemctl status`."""
        if not self.ready():
            return f"not ready: {self.not_ready_reason()}"
        npeers = len(self.peers.peer_records()) if self.peers else 0
        return f"ready: node {self.node}, subnet {self.lease.subnet if self.lease else '-'}, " \
               f"{npeers} peers"

    def refresh_metrics(self) -> None:
        """Gauges computed at scrape time: peers by membership state."""
        from overlay.agent.localapi import status_reply
        from overlay.v1 import overlay_pb2 as pb

        names = {pb.PEER_STATE_UNSPECIFIED: "unknown", pb.PEER_STATE_ALIVE: "alive",
                 pb.PEER_STATE_SUSPECT: "suspect", pb.PEER_STATE_DEAD: "dead",
                 pb.PEER_STATE_LEFT: "left"}
        counts = dict.fromkeys(names.values(), 0)
        for p in status_reply(self).peers:
            state = names.get(p.state, "unknown")
            counts[state] += 1
        for state, n in counts.items():
            metrics.PEERS.labels(state=state).set(n)

    def _specs(self, entry: LeaseEntry) -> Specs:
        assert self.cfg is not None and self.underlay is not None
        rec = entry.record
        vx = VxlanSpec(
            name=vxlan_name(self.cfg.vni),
            vni=self.cfg.vni,
            port=self.cfg.port,
            local=self.underlay.ip,
            mtu=self.mtu,
            mac=self.vtep_mac,
            address=IPv4Interface(f"{rec.vtep_ip}/32"),
            underlay_ifindex=self.underlay.ifindex,
        )
        br = BridgeSpec(BRIDGE_NAME, self.bridge_mac, self.mtu, rec.gateway)
        return Specs(self.node, vx, br, self.cfg.network)

    async def _lease_changed(self, entry: LeaseEntry) -> None:
        assert self.reconciler is not None
        self._save_identity(entry)
        self.reconciler.set_specs(self._specs(entry))
        if self.membership is not None:
            self.membership.set_self(entry.record, entry.mod_revision)
        metrics.LEASE_ACQUISITIONS.inc()
        if self.masq.active:
            await self.masq.ensure()

    async def _wait_config(self, store: EtcdStore, saved: NetworkConfig | None = None
                           ) -> NetworkConfig:
        last = ""
        first = True
        while True:
            try:
                if first and saved is not None:
                    # Do not wait long for an etcd that does not answer: there is a
                    # saved config to start from (degraded, see _acquire_or_assume).
                    try:
                        cfg = await asyncio.wait_for(store.get_config(),
                                                     self.opts.etcd_startup_timeout)
                    except TimeoutError:
                        raise TemporaryError("etcd did not answer in "
                                             f"{self.opts.etcd_startup_timeout}s") from None
                else:
                    cfg = await store.get_config()
                self.set_condition("etcd", True, "reachable")
                self.set_condition("config", True, str(cfg.network))
                log.info("network config: %s, /%d per node, VNI %d, UDP port %d", cfg.network,
                         cfg.subnet_len, cfg.vni, cfg.port)
                return cfg
            except NotFound as exc:
                msg = str(exc)
                self.set_condition("config", False, msg)
            except ConfigError as exc:
                msg = f"invalid network config: {exc}"
                self.set_condition("config", False, msg)
            except TemporaryError as exc:
                msg = f"{exc}"
                self.set_condition("etcd", False, msg)
                if first and saved is not None:
                    log.warning("cannot read the network config from etcd (%s); using the "
                                "one saved in %s: %s", msg, self.opts.state_dir, saved.to_json())
                    self._etcd_down_at_start = True
                    self.set_condition("config", True, f"{saved.network} (saved)")
                    return saved
            first = False
            if msg != last:
                log.warning("waiting for the network config: %s", msg)
                self.notifier.status(f"waiting for the network config: {msg}")
                last = msg
            await asyncio.sleep(1)

    async def _list_until_ok(self, store: EtcdStore) -> Any:
        while True:
            try:
                return await store.list_leases()
            except TemporaryError as exc:
                log.warning("cannot list leases: %s; retrying", exc)
                await asyncio.sleep(1)

    async def _watch(self, store: EtcdStore, revision: int | None) -> None:
        """Follow the leases from `revision` on (None: list them first)."""
        assert self.peers is not None and self.reconciler is not None
        peers, rec = self.peers, self.reconciler
        last_err = ""
        while True:
            if revision is not None:
                try:
                    async for batch in store.watch_leases(revision + 1):
                        if peers.apply(batch):
                            rec.wake()
                        revision = max(revision, peers.revision)
                        self._check_own_lease()
                except WatchLost as exc:
                    log.info("lease watch restarts from a fresh listing: %s", exc)
                except TemporaryError as exc:
                    log.warning("lease watch failed: %s; relisting", exc)
                    await asyncio.sleep(1)
            try:
                snap = await store.list_leases()
            except TemporaryError as exc:
                if str(exc) != last_err:
                    log.warning("cannot list leases: %s; retrying", exc)
                last_err = str(exc)
                await asyncio.sleep(1)
                continue
            last_err = ""
            if peers.reset(snap):
                rec.wake()
            revision = snap.revision
            self._check_own_lease()

    def _check_own_lease(self) -> None:
        lease, peers = self.lease, self.peers
        if lease is None or lease.current is None or peers is None or lease.assumed:
            return
        if peers.revision < lease.current.mod_revision:
            return  # the watch has not reached our own last write yet: old news
        e = peers.entries.get(lease.current.record.subnet)
        if e is None:
            lease.lost("its key was deleted from etcd")
        elif e.record.node != self.node:
            lease.lost(f"node {e.record.node} now holds it")

    async def _watch_config(self, store: EtcdStore, recheck: float = 60.0) -> None:
        """Check the config in etcd whenever it changes (a watch), and every `recheck`
        seconds in case a change slipped past a watch that was being re-established."""
        changed = asyncio.Event()

        async def follow() -> None:
            while True:
                try:
                    start = await store.ping() + 1
                    changed.set()  # anything before `start` is checked by this read
                    async for _ in store.watch_config(start):
                        changed.set()
                except (WatchLost, TemporaryError) as exc:
                    log.debug("config watch restarts: %s", exc)
                await asyncio.sleep(1)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(follow(), name="config-watch-stream")
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), recheck)
                changed.clear()
                await self._check_config(store)

    async def _check_config(self, store: EtcdStore) -> None:
        try:
            cfg = await store.get_config()
        except (ConfigError, NotFound) as exc:
            msg = str(exc)
            if msg != self._cfg_bad:
                log.error("refusing the network config now in etcd (%s); keeping the last "
                          "good one (%s)", msg, self.cfg.network if self.cfg else "-")
                self._cfg_bad = msg
            self.set_condition("config", False, f"refused: {msg}; using the last good one")
            return
        except TemporaryError:
            return
        self._cfg_bad = ""
        if self.cfg is not None and cfg != self.cfg:
            msg = (f"the network config changed in etcd ({self.cfg.to_json()} -> "
                   f"{cfg.to_json()}); restart overlayd on every node to apply it")
            self.set_condition("config", True, msg)
            if msg != self._cfg_msg:
                log.warning("%s", msg)
                self._cfg_msg = msg
        else:
            self.set_condition("config", True, str(cfg.network))

    # --- status for the local API ---------------------------------------------

    def status(self) -> dict[str, Any]:
        me = self.lease.current.record if self.lease and self.lease.current else None
        peers = []
        if self.peers is not None:
            for e in sorted(self.peers.entries.values(), key=lambda e: e.record.node):
                if e.record.node == self.node:
                    continue
                peers.append({
                    "record": e.record,
                    "lease_revision": e.mod_revision,
                    "programmed": bool(self.reconciler and self.reconciler.is_programmed(e.record)),
                })
        return {"self": me, "ready": self.ready(), "conditions": self.conditions,
                "peers": peers, "mtu": self.mtu, "cfg": self.cfg,
                "started": self.started, "degraded": self.degraded}


def enable_forwarding() -> None:
    path = Path("/proc/sys/net/ipv4/ip_forward")
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
            why = "pods' traffic is routed through this host"
            log.info("enabled net.ipv4.ip_forward (%s)", why,
                     extra=change_fields("sysctl", "set", why, sysctl="net.ipv4.ip_forward"))
    except OSError as exc:
        log.warning("cannot enable net.ipv4.ip_forward: %s; pod traffic will not be forwarded",
                    exc)


def cluster_of(cfg: NetworkConfig) -> IPv4Network:
    return cfg.network
