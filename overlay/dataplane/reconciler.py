"""Keeps the kernel equal to the desired state.

One pass: ensure the bridge and the VXLAN device (recreate only if
incompatible), read the entries the device has, diff against the desired
state from the current peers, apply the difference, and only then record
what is programmed. Passes run when something changes (`wake`) and on a
timer. With a `ChangeMonitor`, a kernel notification that may mean drift (an
entry or device deleted or changed by hand) wakes a pass at once, so the timer
is only the safety net and can be slow; without one, the timer finds drift.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from overlay import metrics
from overlay.dataplane import rtnl
from overlay.dataplane.desired import (
    Desired,
    Entries,
    Neigh,
    UnderlayView,
    apply_ops,
    desired,
    explain,
    peer_entries,
    plan,
)
from overlay.dataplane.devices import BridgeSpec, VxlanSpec, bridge_ops, vxlan_ops
from overlay.dataplane.kernel import Kernel, KernelError
from overlay.errors import OverlayError, TemporaryError
from overlay.log import change_fields
from overlay.model import IPNet, NodeRecord
from overlay.retry import Backoff, Once, wait

log = logging.getLogger(__name__)


class Monitor(Protocol):
    async def changed(self, watched: Callable[[], rtnl.Watched]) -> str: ...


@dataclass(frozen=True)
class Specs:
    me: str
    vxlan: VxlanSpec
    bridge: BridgeSpec
    cluster: IPNet | tuple[IPNet, ...]  # the pod network of each family
    underlay: UnderlayView | None = None  # the VXLAN device's family, DirectRouting

    @property
    def clusters(self) -> tuple[IPNet, ...]:
        return self.cluster if isinstance(self.cluster, tuple) else (self.cluster,)


@dataclass
class PassResult:
    device_ops: int = 0
    applied: int = 0
    failed: int = 0
    repaired: int = 0
    duration: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and not self.errors


class Reconciler:
    def __init__(
        self,
        kernel: Kernel,
        peers: Callable[[], Iterable[NodeRecord]],
        interval: float = 1.0,
        after_pass: Callable[[Desired], Awaitable[None]] | None = None,
        monitor: Monitor | None = None,
        bridge_created: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.kernel = kernel
        # Runs after the pod bridge was (re)created: ports do not survive their bridge, so
        # the pods' host veths must be put back on it.
        self.bridge_created = bridge_created
        # Runs after the entries are applied, with the desired state (e.g. to
        # let only these peers' VXLAN traffic in); a failure fails the pass.
        self.after_pass = after_pass
        self.peers = peers
        self.interval = interval
        self.specs: Specs | None = None
        self.programmed = Entries()
        self.want = Desired()  # the desired state of the last pass
        self._neigh6: frozenset[bytes] = frozenset()  # its IPv6 neighbours, for `watched`
        self.vxlan_index: int | None = None
        self.bridge_index: int | None = None
        self.monitor = monitor
        self.passes = 0
        self.first_done = asyncio.Event()
        self.last_ok: float | None = None
        self.last_error = ""
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def set_specs(self, specs: Specs) -> None:
        if specs != self.specs:
            self.specs = specs
            self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def reconcile_once(self) -> PassResult:
        async with self._lock:
            try:
                res = await self._pass()
            except KernelError:
                # A device could not be read or changed (entry failures are counted per op).
                metrics.NETLINK_ERRORS.labels(kind="device").inc()
                metrics.RECONCILE_PASSES.labels(result="error").inc()
                raise
            except OverlayError:
                metrics.RECONCILE_PASSES.labels(result="error").inc()
                raise
            finally:
                self.passes += 1
            metrics.RECONCILE_PASSES.labels(result="ok" if res.ok else "partial").inc()
            return res

    async def _pass(self) -> PassResult:
        assert self.specs is not None, "set_specs() first"
        specs = self.specs
        res = PassResult()
        t0 = time.perf_counter()

        br = await self.kernel.link(specs.bridge.name)
        bops = bridge_ops(specs.bridge, br)
        vx = await self.kernel.link(specs.vxlan.name)
        vops = vxlan_ops(specs.vxlan, vx)
        for op in (*bops, *vops):
            log.info("%s: %s", op, op.why,
                     extra=change_fields("device", op.action, op.why, device=op.name))
            if op.action == "create" and self.passes > 0:
                metrics.REPAIRS.labels(kind="device").inc()
                res.repaired += 1
        if bops:
            await self.kernel.apply_device_ops(bops)
            br = await self.kernel.link(specs.bridge.name)
            if self.bridge_created and any(op.action == "create" for op in bops):
                await self.bridge_created()
        self.bridge_index = br.index if br is not None else None
        if vops:
            await self.kernel.apply_device_ops(vops)
            if any(op.action == "create" for op in vops):
                # A new device starts empty: nothing we programmed survives.
                self.programmed = Entries()
        res.device_ops = len(bops) + len(vops)
        if vx is None or vops:
            vx = await self.kernel.link(specs.vxlan.name)
        if vx is None:
            raise KernelError(f"{specs.vxlan.name} missing right after creating it", 0)
        self.vxlan_index = vx.index

        # Direct routes (DirectRouting) live on the underlay device: always looked at, so
        # that turning the option off removes them.
        under = specs.vxlan.underlay_ifindex
        observed = await self.kernel.observe(vx.index, under)
        want = desired(self.peers(), specs.me, specs.clusters, specs.underlay)
        if want.neighs != self.want.neighs:
            self._neigh6 = frozenset(n.ip.packed for n in want.neighs if n.ip.version == 6)
        self.want = want
        for node, why in want.rejected:
            log.warning("not programming node %s: %s", node, why)
        ops = plan(want, observed)
        if ops:
            reasons = [explain(op, want, self.programmed) for op in ops]
            results = await self.kernel.apply(vx.index, ops, under)
            done = []
            for r, why in zip(results, reasons, strict=True):
                if r.error is None:
                    done.append(r.op)
                    log.info("%s (%s)", r.op, why,
                             extra=change_fields(r.op.kind, r.op.action, why,
                                                 entry=str(r.op.entry)))
                    metrics.KERNEL_CHANGES.labels(kind=r.op.kind, action=r.op.action).inc()
                    if why.startswith("repair"):
                        metrics.REPAIRS.labels(kind=r.op.kind).inc()
                        res.repaired += 1
                else:
                    log.warning("failed: %s (%s): %s", r.op, why, r.error)
                    metrics.NETLINK_ERRORS.labels(kind=r.op.kind).inc()
                    res.errors.append(str(r.error))
            res.applied = len(done)
            res.failed = len(results) - len(done)
            self.programmed = apply_ops(observed, done)
        else:
            self.programmed = observed
        if self.after_pass is not None:
            try:
                await self.after_pass(want)
            except OverlayError as exc:
                res.errors.append(str(exc))
        for kind, n in (("route", len(self.programmed.routes)),
                        ("neigh", len(self.programmed.neighs)),
                        ("fdb", len(self.programmed.fdbs))):
            metrics.PEER_ENTRIES.labels(kind=kind).set(n)
        res.duration = time.perf_counter() - t0
        metrics.RECONCILE_SECONDS.observe(res.duration)
        return res

    async def first_pass(self, failed: Callable[[str], None]) -> None:
        """Pass after pass (backing off up to 5 s) until one succeeds; `failed(why)` after
        each that did not. Then `first_done` is set."""
        backoff = Backoff(0.2, 5)
        while True:
            try:
                res = await self.reconcile_once()
                if res.ok:
                    break
                msg = "; ".join(res.errors[:3])
            except TemporaryError as exc:
                msg = str(exc)
            failed(msg)
            log.warning("first reconcile incomplete: %s; retrying", msg)
            await asyncio.sleep(backoff.next())
        self.first_done.set()

    def is_programmed(self, rec: NodeRecord) -> bool:
        # Set lookups, not scans: the status RPC asks this for every peer.
        if self.specs is None:
            return False
        p = self.programmed
        families = {c.version for c in self.specs.clusters}
        entries = peer_entries(rec, families, self.specs.underlay)
        return bool(entries) and all(
            e in p or (isinstance(e, Neigh) and Neigh(e.ip, e.mac, permanent=False) in p)
            for e in entries)

    def is_direct(self, node: str) -> bool:
        """Peer `node` is reached by a direct route (DirectRouting)."""
        return node in self.want.direct

    def watched(self) -> rtnl.Watched:
        assert self.specs is not None
        sp = self.specs
        return rtnl.Watched(self.vxlan_index, self.bridge_index, sp.vxlan.mtu, sp.bridge.mtu,
                            sp.vxlan.mac, sp.bridge.mac, sp.clusters,
                            sp.vxlan.underlay_ifindex, self._neigh6)

    async def _follow_kernel(self, monitor: Monitor) -> None:
        while True:
            try:
                why = await monitor.changed(self.watched)
            except KernelError as exc:
                # Not fatal: the periodic pass still finds drift, only later.
                log.warning("cannot read kernel notifications: %s; reconciling now and "
                            "retrying in 1 s", exc)
                self.wake()
                await asyncio.sleep(1)
                continue
            log.debug("kernel notification: %s; reconciling", why)
            metrics.DRIFT_NOTIFICATIONS.inc()
            self.wake()

    async def run(self) -> None:
        """Reconcile on every wake-up and at least every `interval` seconds. Never returns."""
        if self.monitor is None:
            await self._loop()
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_kernel(self.monitor), name="kernel-notifications")
            tg.create_task(self._loop(), name="reconcile-passes")

    # A failed pass is retried soon, whatever the periodic interval: the safety-net
    # interval is long, but an entry that could not be programmed is a broken peer.
    RETRY_FIRST = 0.5
    RETRY_MAX = 10.0

    async def _loop(self) -> None:
        backoff = Backoff(min(self.RETRY_FIRST, self.interval), self.RETRY_MAX)
        said = Once()
        while True:
            self._wake.clear()
            try:
                res = await self.reconcile_once()
            except OverlayError as exc:
                if said.changed(str(exc)):
                    log.warning("reconcile failed: %s; retrying in %.1fs", exc, backoff.delay)
                self.last_error = str(exc)
            else:
                if res.ok:
                    self.last_ok = time.monotonic()
                    self.last_error = ""
                    said.reset()
                    backoff.reset()
                    self.first_done.set()
                    await self._sleep(self.interval)
                    continue
                self.last_error = "; ".join(res.errors[:3])
            await self._sleep(backoff.next())

    async def _sleep(self, seconds: float) -> None:
        await wait(self._wake, seconds)
