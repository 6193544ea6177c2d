"""overlayd's composition root: builds the parts, starts them in order, supervises them.

Start-up: serve the CNI socket and the local API at once (answering "not
ready" until the node is), find the underlay, read the network config
(`followers`), lease a subnet (or start DEGRADED from the saved state when
etcd does not answer: `degraded`), reconcile the kernel once from a fresh
listing of the leases (so entries of peers that vanished while we were down
go away), then run the lease keep-alive, the lease and config watches, the
reconciler, the readiness loop and the membership together. If any of them
dies the others are cancelled and overlayd exits non-zero; the kernel state
and the lease are left in place, so a restart does not disturb running pods.

The node's kernel, the etcd store and the membership come from `Parts`
factories, so a unit test runs all of this in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from ipaddress import ip_interface

from overlay import metrics
from overlay.agent import state
from overlay.agent.cniserver import CniService, NodeNet
from overlay.agent.degraded import DegradedStart
from overlay.agent.followers import ConfigFollower, LeaseFollower
from overlay.agent.http import serve_probes
from overlay.agent.lease import LeaseManager, Template
from overlay.agent.localapi import start_local_api
from overlay.agent.masq import NftMasquerade
from overlay.agent.memtrim import glibc_trim, trim_forever
from overlay.agent.nodekernel import NodeKernel
from overlay.agent.options import AgentOptions
from overlay.agent.parts import AgentStore, MembershipPort, Parts
from overlay.agent.peers import PeerTable
from overlay.agent.readiness import Readiness
from overlay.agent.status import AgentStatus, PeerStatus, state_counts
from overlay.agent.vxlanfilter import VxlanFilter
from overlay.cni.ipam import Ipam
from overlay.dataplane.desired import UnderlayView
from overlay.dataplane.devices import BridgeSpec, DeviceOp, VxlanSpec, stable_mac, vxlan_overhead
from overlay.dataplane.kernel import Underlay
from overlay.dataplane.reconciler import Reconciler, Specs
from overlay.devnames import BRIDGE_NAME, vxlan_name
from overlay.errors import ConfigError, PermanentError, TemporaryError
from overlay.membership import tls as tlsmod
from overlay.membership.signing import NodeKey
from overlay.model import LeaseEntry, NetworkConfig, hostport, validate_network

log = logging.getLogger("overlayd")

Closer = Callable[[], object]  # called at exit; a returned awaitable is awaited


class Agent:
    def __init__(self, opts: AgentOptions, parts: Parts | None = None) -> None:
        self.opts = opts
        self.parts = parts or Parts()
        self.started = time.time()
        self.readiness = Readiness()
        self.degraded = DegradedStart(opts.state_dir, self.readiness, opts.etcd_startup_timeout)
        self.node = ""
        self.vtep_mac = ""
        self.node_key: NodeKey | None = None
        self.incarnation = 0
        self.mtu = 0
        self.cfg: NetworkConfig | None = None
        self.underlay: Underlay | None = None
        self.host: NodeKernel | None = None
        self.store: AgentStore | None = None
        self.lease: LeaseManager | None = None
        self.peers: PeerTable | None = None
        self.reconciler: Reconciler | None = None
        self.membership: MembershipPort | None = None
        self.masq: NftMasquerade | None = None
        self.cni: CniService | None = None
        self.vxlan_filter: VxlanFilter | None = None
        self.config: ConfigFollower | None = None
        self.leases: LeaseFollower | None = None
        self._closers: list[Closer] = []
        self._stop = asyncio.Event()
        self._leave = False
        self._main_task: asyncio.Task[int] | None = None

    # --- what the CNI server, the local API and the probes ask ---------------------

    def node_net(self) -> NodeNet:
        self.readiness.lease_pending(self.lease)
        subnets = self.lease.subnets if self.lease else ()
        ready = self.readiness.ready() and bool(subnets)
        return NodeNet(ready=ready, reason="" if ready else self.readiness.not_ready_reason(),
                       subnets=subnets, mtu=self.mtu or 1450, bridge=BRIDGE_NAME,
                       bridge_mac=self.bridge_mac)

    @property
    def bridge_mac(self) -> str:
        return stable_mac(f"bridge:{self.node}") if self.node else ""

    def status(self) -> AgentStatus:
        self.readiness.lease_pending(self.lease)
        current = self.lease.current if self.lease else None
        rec, ms = self.reconciler, self.membership
        if ms is not None:
            peers = tuple(PeerStatus.of_view(v, bool(
                rec and v.in_etcd and v.source != "left" and rec.is_programmed(v.record)),
                bool(rec and rec.is_direct(v.record.node))) for v in ms.views())
        else:
            peers = tuple(PeerStatus(e.record, e.mod_revision,
                                     bool(rec and rec.is_programmed(e.record)))
                          for e in sorted(self.peers.entries.values() if self.peers else (),
                                          key=lambda e: e.record.node)
                          if e.record.node != self.node)
        return AgentStatus(
            node=self.node, me=current.record if current else None,
            lease_revision=current.mod_revision if current else 0,
            incarnation=ms.incarnation if ms else 0, ready=self.readiness.ready(),
            degraded=self.degraded.active, conditions=tuple(self.readiness.conditions.items()),
            mtu=self.mtu, cfg=self.cfg, started=self.started, peers=peers)

    def refresh_metrics(self) -> None:
        """Gauges computed at scrape time: peers by membership state."""
        if self.membership is not None:
            counts = state_counts(v.state for v in self.membership.views())
        else:
            counts = state_counts(None for _ in (self.peers.peer_records() if self.peers else ()))
        for label, n in counts.items():
            metrics.PEERS.labels(state=label).set(n)

    def _probe_ready(self) -> tuple[bool, dict[str, object]]:
        ok = self.readiness.ready()
        return ok, {"ready": ok, "conditions": {k: {"ok": c.ok, "message": c.message}
                                                for k, c in self.readiness.conditions.items()}}

    def _status_line(self) -> str:
        """One line for `systemctl status`."""
        if not self.readiness.ready():
            return f"not ready: {self.readiness.not_ready_reason()}"
        npeers = len(self.peers.peer_records()) if self.peers else 0
        return f"ready: node {self.node}, subnet {self.lease.describe() if self.lease else '-'}, " \
               f"{npeers} peers"

    # --- lifecycle ------------------------------------------------------------

    async def run(self) -> int:
        main = asyncio.current_task()
        assert main is not None
        self._main_task = main
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.opts.run_dir.mkdir(parents=True, exist_ok=True)
        self.opts.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._serve()
            pending_revision = await self._start()
            await self._run(pending_revision)
            return 0
        except asyncio.CancelledError:
            if self._stop.is_set():
                if self._leave:
                    # Every task has stopped: nothing can put back what leave() removes.
                    await self.leave()
                    log.info("stopped after leaving the cluster")
                else:
                    log.info("stopped; the kernel state and the lease are kept for the next "
                             "start%s", await self._keep_lease_for_restart())
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
                    if isinstance(res, Awaitable):
                        await res

    # A supervisor SIGKILLs a stop that outlasts its timeout (podman's 10 s), and what
    # held it up dies unseen: past this, every thread's stack goes to stderr and the
    # process exits (status 1). A stop normally takes well under a second.
    STOP_WATCHDOG = 9.0

    def _on_signal(self, sig: int) -> None:
        log.info("received %s, stopping", signal.Signals(sig).name)
        # Armed until the process is gone: interpreter teardown (thread joins, grpc's
        # shutdown) is covered too.
        faulthandler.dump_traceback_later(self.STOP_WATCHDOG, exit=True)
        self.stop(f"stopping on {signal.Signals(sig).name}")

    def stop(self, why: str = "stopping") -> None:
        """Stop every task; the kernel state and the lease stay for the next start."""
        self.readiness.stopping(why)
        self._stop.set()
        if self._main_task is not None:
            self._main_task.cancel()

    def request_leave(self) -> None:
        """Leave gracefully: stop every task, then release the lease and remove devices."""
        log.info("leave requested")
        self._leave = True
        self.stop("leaving the cluster")

    async def _serve(self) -> None:
        """What answers at once, even before the node is ready: CNI, local API, probes."""
        opts = self.opts
        self.host = host = self.parts.kernel()
        self._closers.append(host.close)
        ipam = Ipam(opts.run_dir / "ipam")
        fixed = ipam.repair()
        if fixed:
            log.warning("IPAM: repaired %d records left inconsistent by a crash", fixed)
        self.masq = masq = NftMasquerade(lambda: self.cfg.networks if self.cfg else None,
                                         lambda: self.lease.subnets if self.lease else None,
                                         opts.run_dir / "masq", opts.ip_masq, host.nft)
        self._closers.append(masq.close)
        ipam6 = Ipam(opts.run_dir / "ipam6")  # IPv6 pod addresses (overlay.cni.ipam)
        fixed = ipam6.repair()
        if fixed:
            log.warning("IPAM (IPv6): repaired %d records left inconsistent by a crash", fixed)
        self.cni = cni = CniService(ipam, host.pod_wiring(BRIDGE_NAME), self.node_net, masq,
                                    ipam6=ipam6)
        await cni.start(opts.run_dir / "cni.sock")
        self._closers.append(cni.close)
        server = await start_local_api(opts.run_dir / "overlayd.sock", self.status,
                                       self.request_leave)
        self._closers.append(lambda: server.stop(0.5))
        for srv in await serve_probes(opts.health_addr, opts.metrics_addr, self._probe_ready,
                                      self.refresh_metrics):
            self._closers.append(srv.close)

    async def _start(self) -> int | None:
        """From nothing to a ready node; the lease revision to watch from (None: list first)."""
        underlay, cfg = await self._config_and_underlay()
        entry, tls = await self._lease_up(underlay, cfg)
        revision = await self._dataplane_up(entry, cfg, tls)
        log.info("node %s ready%s: subnet %s, %d peers", self.node,
                 " (DEGRADED: etcd unreachable)" if self.degraded.active else "",
                 " and ".join(map(str, entry.record.subnets)),
                 len(self.peers.peer_records()) if self.peers else 0)
        metrics.READY.set(1)
        # systemd: started only now that the lease, the devices and the first
        # reconcile are done, so pods scheduled after this get an address.
        self.readiness.started(self._status_line())
        return revision

    async def _config_and_underlay(self) -> tuple[Underlay, NetworkConfig]:
        opts = self.opts
        assert self.host is not None
        # The underlay first: a wrong --iface fails at once, even while etcd is down.
        self.underlay = underlay = await self.host.find_underlay(
            opts.iface, opts.iface_regex, opts.public_ip, opts.underlay_family)
        # Connects on first use: an etcd host name that does not resolve yet (DNS not
        # up at boot) is waited for like an etcd that does not answer.
        self.store = store = self.parts.store(opts.etcd)
        self._closers.append(store.close)
        self.config = ConfigFollower(store, self.readiness, opts.state_dir)
        self.cfg = cfg = await self.config.first(state.load_network(opts.state_dir),
                                                 opts.etcd_startup_timeout)
        try:
            validate_network(cfg, (underlay.network,))
        except ConfigError as exc:
            raise ConfigError(exc.field, f"{exc.message} (underlay {underlay.ifname})") from None
        self.mtu = self._overlay_mtu(underlay)
        return underlay, cfg

    async def _lease_up(self, underlay: Underlay, cfg: NetworkConfig
                        ) -> tuple[LeaseEntry, tlsmod.TlsMaterial | None]:
        """Our identity and our lease: from etcd, or assumed from the saved state."""
        opts = self.opts
        assert self.store is not None and self.config is not None
        ident = state.resolve(opts.state_dir, opts.node_name, opts.vtep_mac)
        self.node, self.vtep_mac = ident.node, ident.vtep_mac
        tls = tlsmod.load(opts.tls, ident.node) if opts.tls is not None else None
        # Next to the VTEP MAC in the state dir: the key our lease publishes and our
        # membership statements are signed with (overlay.membership.signing).
        self.node_key = node_key = NodeKey(state.signing_key(opts.state_dir))
        self.incarnation = state.next_incarnation(ident.incarnation, int(time.time() * 1000))
        grpc_addr = opts.grpc_advertise or hostport(underlay.ip,
                                                    self._grpc_listen().rpartition(":")[2])
        template = Template(ident.node, str(underlay.ip), ident.vtep_mac, grpc_addr,
                            node_key.public)
        self.peers = PeerTable(ident.node)
        self.lease = lease = LeaseManager(self.store, cfg, template, opts.lease_ttl,
                                          ident.subnets)
        lease.on_change = self._lease_changed
        self.readiness.set("lease", False, "acquiring a subnet lease")
        self.readiness.status("acquiring a subnet lease")
        self._closers.append(self.degraded.cancel)
        entry = await self.degraded.acquire_or_assume(
            lease, ident, template, etcd_answered=not self.config.from_saved)
        if not self.degraded.active:
            metrics.LEASE_ACQUISITIONS.inc()
            self.readiness.set("lease", True, f"holding {lease.describe()}")
            self.readiness.set("etcd", True, "reachable")
            metrics.ETCD_UP.set(1)
        self._save_identity(entry)
        state.save_network(opts.state_dir, cfg)
        return entry, tls

    async def _dataplane_up(self, entry: LeaseEntry, cfg: NetworkConfig,
                            tls: tlsmod.TlsMaterial | None) -> int | None:
        """Membership, reconciler, the first listing of the leases and the first pass."""
        opts = self.opts
        assert self.host and self.store and self.peers and self.lease and self.masq
        assert self.node_key is not None
        peers = self.peers
        self.membership = ms = self.parts.membership(
            entry.record, entry.mod_revision, self.incarnation, opts.membership,
            self._grpc_listen(), tls, lambda: peers.entries, self._membership_changed,
            self.node_key)
        self._closers.append(ms.close)
        assert self.underlay is not None
        filt = VxlanFilter(cfg.port, self.host.nft, self.underlay.family)
        if opts.vxlan_filter:
            self.vxlan_filter = filt
        else:
            log.warning("VXLAN filter disabled (--no-vxlan-filter): any host on the underlay "
                        "can inject packets into pods")
        self.reconciler = rec = Reconciler(
            self.host.kernel, ms.peer_records, opts.reconcile_interval,
            self.vxlan_filter.after_pass if self.vxlan_filter else None, self.host.monitor(),
            self.cni.reattach if self.cni else None)
        rec.set_specs(self._specs(entry))
        self.leases = LeaseFollower(self.store, peers, self.lease, rec.wake)
        if self.degraded.active:
            snap = self.degraded.saved_peers() or peers.snapshot()
        else:
            snap = await self.leases.list_until_ok()
        peers.reset(snap)
        peers.listeners.append(ms.sync_etcd)
        await ms.start()
        if self.vxlan_filter is None:
            # A table left by an earlier run with the filter on would still drop traffic.
            await filt.remove()
        self.host.enable_forwarding(ipv6=cfg.enable_ipv6)
        await self._first_reconcile(rec)
        if opts.ip_masq or self.masq.has_pods():
            await self.masq.ensure()
        else:
            await self.masq.discard()
        return None if self.degraded.active else snap.revision

    async def _run(self, revision: int | None) -> None:
        """The node runs: every loop supervised, none returns."""
        assert self.lease and self.peers and self.membership and self.config and self.leases
        assert self.reconciler is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._keep_lease(), name="lease-keepalive")
            tg.create_task(self.leases.run(revision), name="lease-watch")
            tg.create_task(self.reconciler.run(), name="reconciler")
            if self.vxlan_filter is not None:
                tg.create_task(self.vxlan_filter.watch(self.reconciler.wake),
                               name="vxlan-filter-verify")
            tg.create_task(self.config.watch(), name="config-watch")
            tg.create_task(self.readiness.follow(self._observe, self._status_line),
                           name="conditions")
            tg.create_task(self.membership.run(), name="membership")
            tg.create_task(self.degraded.persist_peers(self.peers), name="persist-peers")
            tg.create_task(trim_forever(glibc_trim()), name="malloc-trim")

    async def _keep_lease(self) -> None:
        assert self.lease is not None
        await self.degraded.until_etcd(self._lease_changed)
        await self.lease.keep_alive()

    def _observe(self) -> None:
        assert self.lease is not None and self.reconciler is not None
        self.readiness.observe(self.lease, self.reconciler,
                               self.membership.condition() if self.membership else None,
                               self.degraded.active)

    async def _first_reconcile(self, rec: Reconciler) -> None:
        await rec.first_pass(lambda why: self.readiness.set("reconciled", False, why))
        self.readiness.set("device", True, f"{rec.specs.vxlan.name} up" if rec.specs else "up")
        self.readiness.set("reconciled", True, "kernel matches the leases")

    def _grpc_listen(self) -> str:
        if self.opts.grpc_listen:
            return self.opts.grpc_listen
        return "[::]:7946" if self.underlay and self.underlay.family == 6 else "0.0.0.0:7946"

    def _overlay_mtu(self, underlay: Underlay) -> int:
        assert self.cfg is not None
        mtu = overlay_mtu(self.cfg, underlay, self.opts.mtu)
        log.info("underlay %s, address %s, MTU %d: overlay MTU %d (%d bytes of VXLAN over "
                 "IPv%d)", underlay.ifname, underlay.ip, underlay.mtu, mtu,
                 vxlan_overhead(underlay.family), underlay.family)
        return mtu

    def _specs(self, entry: LeaseEntry) -> Specs:
        assert self.cfg is not None and self.underlay is not None
        rec = entry.record
        # the VTEP address of each pod family: the source of node -> remote pod traffic
        vx = VxlanSpec(name=vxlan_name(self.cfg.vni), vni=self.cfg.vni, port=self.cfg.port,
                       local=self.underlay.ip, mtu=self.mtu, mac=self.vtep_mac,
                       addresses=tuple(ip_interface(f"{a}/{a.max_prefixlen}")
                                       for a in rec.vtep_ips),
                       underlay_ifindex=self.underlay.ifindex)
        br = BridgeSpec(BRIDGE_NAME, self.bridge_mac, self.mtu, rec.gateways)
        view = UnderlayView(self.underlay.family, self.underlay.network, self.cfg.direct_routing)
        return Specs(self.node, vx, br, self.cfg.networks, view)

    async def _lease_changed(self, entry: LeaseEntry) -> None:
        assert self.reconciler is not None and self.masq is not None
        self._save_identity(entry)
        self.reconciler.set_specs(self._specs(entry))
        if self.membership is not None:
            self.membership.set_self(entry.record, entry.mod_revision)
        metrics.LEASE_ACQUISITIONS.inc()
        if self.masq.active:
            await self.masq.ensure()

    def _save_identity(self, entry: LeaseEntry) -> None:
        rec = entry.record
        state.save(self.opts.state_dir, state.Identity(
            self.node, self.vtep_mac, rec.key_subnet, entry.mod_revision, self.incarnation,
            rec.subnet6 if rec.subnet is not None else None))

    def _membership_changed(self) -> None:
        if self.reconciler is not None:
            self.reconciler.wake()

    # A stop must finish well within a supervisor's kill timeout (podman's 10 s, the
    # kubelet's grace period): the lease hand-over gets this long, then the key expires
    # after the TTL as after a crash.
    KEEP_LEASE_TIMEOUT = 5.0

    async def _keep_lease_for_restart(self) -> str:
        """Hand the lease to one of --restart-grace seconds; what to add to the log line."""
        grace = self.opts.restart_grace
        if self.lease is None or grace <= self.opts.lease_ttl:
            return ""
        try:
            kept = await asyncio.wait_for(self.lease.keep_for_restart(grace),
                                          self.KEEP_LEASE_TIMEOUT)
        except (TemporaryError, TimeoutError) as exc:
            log.warning("could not keep the lease for the next start (%s): it expires after "
                        "the %d s TTL", exc or "etcd did not answer in time", self.opts.lease_ttl)
            return ""
        if kept is None:
            return ""
        return (f" (subnet {self.lease.describe()} for {grace} s, --restart-grace: peers keep "
                "the routes to this node's pods until then; `overlayctl uninstall` releases "
                "it now)")

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
        if self.host is not None and self.reconciler is not None and self.reconciler.specs:
            specs = self.reconciler.specs
            for name in (specs.vxlan.name, specs.bridge.name):
                with contextlib.suppress(Exception):
                    await self.host.kernel.apply_device_ops([DeviceOp("delete", name, None,
                                                                      "leave")])
        if self.vxlan_filter is not None:
            await self.vxlan_filter.remove()


def overlay_mtu(cfg: NetworkConfig, underlay: Underlay, flag: int | None) -> int:
    """The MTU of the VXLAN device, the bridge and the pods: --mtu, else flannel's
    Backend.MTU (the outer MTU to plan for) or the underlay's, minus the VXLAN
    overhead of the underlay's family (50 bytes over IPv4, 70 over IPv6)."""
    overhead = vxlan_overhead(underlay.family)
    outer = cfg.mtu or underlay.mtu
    if cfg.mtu and cfg.mtu > underlay.mtu:
        log.warning("Backend.MTU %d exceeds %s's MTU %d: large packets will be dropped",
                    cfg.mtu, underlay.ifname, underlay.mtu)
    mtu = flag or outer - overhead
    if flag and flag > underlay.mtu - overhead:
        log.warning("--mtu %d exceeds %s's MTU %d minus the %d-byte VXLAN overhead: large "
                    "packets will be dropped", flag, underlay.ifname, underlay.mtu, overhead)
    least = 1280 if cfg.enable_ipv6 else 576  # IPv6 needs 1280 on every link
    if mtu < least:
        raise ConfigError("--mtu" if flag else "Backend.MTU" if cfg.mtu else "underlay",
                          f"overlay MTU {mtu} is below {least}"
                          + (" (IPv6's minimum)" if least == 1280 else ""))
    return mtu
