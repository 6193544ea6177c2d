"""The node's subnet lease: acquire, keep alive, win it back.

Allocation is an etcd transaction that succeeds only if none of the lease's
keys exists (one per family, see overlay.model); a lost race moves on to the
next candidate (flannel exits instead).
A node that finds its own key (by node name) after a restart takes it over
in place, and a node whose lease expired asks for its old subnet first and
moves, saying so, only if somebody else took it meanwhile.

The TTL is how long a node that dies keeps its subnet (and its peers' routes
to it). A stop is not a death: the agent is restarted, upgraded or its pod
replaced while the node's pods keep running, and that can take longer than
the TTL (a DaemonSet update pulls the new image after the old pod is gone).
So a stop that is not a leave hands the key to an etcd lease of the restart
grace (`keep_for_restart`), which nobody renews; the next start takes it over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import Protocol

from overlay import metrics, subnets
from overlay.errors import TemporaryError
from overlay.model import IPNet, LeaseEntry, LeaseSnapshot, NetworkConfig, NodeRecord
from overlay.retry import Backoff, Once, wait
from overlay.subnets import split as split_subnets

log = logging.getLogger(__name__)


class LeaseStore(Protocol):
    async def list_leases(self) -> LeaseSnapshot: ...
    async def grant(self, ttl: int) -> int: ...
    async def keepalive(self, lease_id: int) -> int: ...
    async def create_lease(self, record: NodeRecord, lease_id: int) -> int | None: ...
    async def replace_lease(
        self, record: NodeRecord, lease_id: int, expect_mod: int | Mapping[IPNet, int],
        drop: Mapping[IPNet, int] | None = None,
    ) -> int | None: ...
    async def delete_lease(self, subnet: IPNet | NodeRecord,
                           expect_mod: int | None = None) -> bool: ...
    async def revoke(self, lease_id: int) -> None: ...


class SubnetsExhausted(TemporaryError):
    pass


@dataclass(frozen=True)
class Template:
    """Everything in our lease record except the subnets."""

    node: str
    underlay_ip: str
    vtep_mac: str
    grpc_addr: str
    public_key: str = ""    # membership signing key (overlay.membership.signing)

    def record(self, *subnets: IPNet) -> NodeRecord:
        v4, v6 = split_subnets(subnets)
        return NodeRecord(self.node, v4, ip_address(self.underlay_ip), self.vtep_mac,
                          self.grpc_addr, public_key=self.public_key, subnet6=v6)


def _preferred(value: IPNet | Sequence[IPNet] | None) -> tuple[IPNet, ...]:
    if value is None:
        return ()
    if isinstance(value, IPv4Network | IPv6Network):
        return (value,)
    return tuple(value)


class LeaseManager:
    """Holds this node's lease: one subnet per enabled family (IPv4 and/or IPv6),
    written and renewed as one (see overlay.model for the etcd layout)."""

    def __init__(
        self,
        store: LeaseStore,
        cfg: NetworkConfig,
        template: Template,
        ttl: int = 60,
        preferred: IPNet | Sequence[IPNet] | None = None,
        rng: random.Random | None = None,
        retry_max: float = 5.0,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.template = template
        self.ttl = ttl
        self.preferred = _preferred(preferred)
        self.rng = rng or random.Random()
        self.retry_max = retry_max
        self.current: LeaseEntry | None = None
        self.lease_id = 0
        self.healthy = False
        self.last_renewal = 0.0
        self.renewals = 0
        self.failures = 0
        self._lost = asyncio.Event()
        # Why the last acquisition attempt failed, for status and CNI errors.
        self.last_error = ""
        self._assumed = False
        self.on_change: Callable[[LeaseEntry], Awaitable[None]] | None = None

    @property
    def subnet(self) -> IPNet | None:
        """The subnet the lease is stored under (IPv4 when the node has one)."""
        return self.current.record.key_subnet if self.current else None

    @property
    def subnets(self) -> tuple[IPNet, ...]:
        return self.current.record.subnets if self.current else ()

    def describe(self) -> str:
        return " and ".join(map(str, self.subnets)) or "-"

    async def acquire(self, retry_max: float | None = None) -> LeaseEntry:
        """Hold a subnet lease, retrying (with backoff up to `retry_max`) until etcd gives one."""
        backoff = Backoff(0.2, self.retry_max if retry_max is None else retry_max, self.rng)
        said = Once()
        while True:
            try:
                entry = await self._try_acquire()
                self.last_error = ""
                self.current = entry
                self._assumed = False
                self.preferred = entry.record.subnets
                self.healthy = True
                self.last_renewal = time.monotonic()
                return entry
            except TemporaryError as exc:
                msg = str(exc)
                self.last_error = msg
                if said.changed(msg):
                    log.warning("cannot lease a subnet yet: %s; retrying", msg)
                self.healthy = False
            await asyncio.sleep(backoff.next())

    def _fits(self, rec: NodeRecord) -> bool:
        """`rec` has a subnet of exactly the config's families, each one it may keep."""
        return (tuple(s.version for s in rec.subnets) == self.cfg.families
                and all(subnets.keeps(self.cfg, s) for s in rec.subnets))

    async def _try_acquire(self) -> LeaseEntry:
        snap = await self.store.list_leases()
        me = self.template.node
        pref = set(self.preferred)
        mine = sorted(
            (e for e in snap.entries.values() if e.record.node == me),
            key=lambda e: (not self._fits(e.record), e.record.key_subnet not in pref,
                           e.record.key_subnet.version, str(e.record.key_subnet)),
        )
        # Every key of ours, with its revision: taken over, or dropped in the same write.
        own: dict[IPNet, int] = {k: e.mod_revision for k, e in snap.claims.items()
                                 if e.record.node == me}
        for e in mine:
            own[e.record.key_subnet] = e.mod_revision
        self.lease_id = await self.store.grant(self.ttl)
        if mine and self._fits(mine[0].record):
            keep = mine[0]
            # A claim another node holds is not ours to take over (it was deleted
            # by hand and taken meanwhile): then this node moves, below.
            if all(k in own or k not in snap.claims for k in keep.record.lease_keys):
                rec = self.template.record(*keep.record.subnets)
                expect = {k: own.get(k, 0) for k in rec.lease_keys}
                drop = {k: m for k, m in own.items() if k not in expect}
                mod = await self.store.replace_lease(rec, self.lease_id, expect, drop)
                if mod is None:
                    raise TemporaryError(f"lease {keep.record.key_subnet} changed while taking "
                                         "it over")
                # The last run's etcd lease (its restart grace, or a crashed run's TTL):
                # no key is on it any more; gone now rather than when it runs out.
                for old in {e.lease_id for e in (*mine, *snap.claims.values())
                            if e.record.node == me} - {0, self.lease_id}:
                    with contextlib.suppress(TemporaryError):
                        await self.store.revoke(old)
                for e in mine[1:]:
                    log.warning("removed duplicate lease %s also held by node %s",
                                e.record.key_subnet, e.record.node)
                what = "still held" if rec == keep.record else "taken over with new details"
                log.info("subnet %s: this node's lease was %s (etcd lease %x)",
                         " and ".join(map(str, rec.subnets)), what, self.lease_id)
                return LeaseEntry(rec, mod, self.lease_id)

        taken = snap.taken() - set(own)
        prefs: list[IPNet] = []
        for p in (*self.preferred, *(s for e in mine for s in e.record.subnets)):
            if p in prefs:
                continue
            if p in taken:
                owner = _owner(snap, p)
                log.warning("subnet %s, which this node held before, now belongs to node %s: "
                            "moving to another subnet; pods on the old one must be restarted",
                            p, owner)
                continue
            if not subnets.keeps(self.cfg, p):
                log.warning("subnet %s, which this node held before, is not in the cluster "
                            "network %s any more", p, " and ".join(map(str, self.cfg.networks)))
                continue
            prefs.append(p)
        for cand in subnets.pairs(self.cfg, taken, prefs, self.rng):
            rec = self.template.record(*cand)
            expect = {k: own.get(k, 0) for k in rec.lease_keys}
            drop = {k: m for k, m in own.items() if k not in expect}
            mod = await self.store.replace_lease(rec, self.lease_id, expect, drop)
            if mod is not None:
                log.info("subnet %s: leased for node %s (etcd lease %x, ttl %ds)",
                         " and ".join(map(str, cand)), rec.node, self.lease_id, self.ttl)
                return LeaseEntry(rec, mod, self.lease_id)
            log.info("subnet %s was taken by another node at the same moment; "
                     "trying another", " and ".join(map(str, cand)))
        await self._revoke_quietly()
        for pool in self.cfg.pools():
            if subnets.free_count(pool, taken) <= 0:
                raise SubnetsExhausted(
                    f"no free subnet in {pool.network}: all {len(pool.range_indexes)} "
                    f"/{pool.subnet_len} subnets are leased; waiting for one to be released"
                )
        raise TemporaryError("every candidate subnet was taken concurrently")

    async def _revoke_quietly(self) -> None:
        if self.lease_id:
            with contextlib.suppress(TemporaryError):
                await self.store.revoke(self.lease_id)
            self.lease_id = 0

    @property
    def assumed(self) -> bool:
        """True while the lease is only the one saved on disk (etcd not reached yet)."""
        return self.current is not None and self._assumed

    def assume(self, entry: LeaseEntry) -> None:
        """Start from the lease saved on disk because etcd is unreachable (degraded start).

        `acquire()` later takes the key over in place (it is found by node name) or,
        if it expired meanwhile, asks for the same subnet first.
        """
        self.current = entry
        self.preferred = entry.record.subnets
        self.lease_id = 0
        self.healthy = False
        self._assumed = True

    def lost(self, why: str) -> None:
        """Called by the watcher when our key disappears or changes owner."""
        log.warning("lease for %s lost: %s", self.subnet, why)
        self._lost.set()

    async def keep_alive(self) -> None:
        """Renew forever; win the lease back when it is lost. Never returns."""
        assert self.current is not None, "acquire() first"
        outage_since: float | None = None
        while True:
            interval = max(1.0, self.ttl / 4) if self.healthy else 1.0
            if await wait(self._lost, interval):
                self._lost.clear()
                await self._reacquire("its key was deleted or changed")
                continue
            try:
                left = await self.store.keepalive(self.lease_id)
            except TemporaryError as exc:
                self.failures += 1
                metrics.LEASE_RENEWALS.labels(result="error").inc()
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning("cannot renew lease for %s: %s (the kernel state is kept; "
                                "retrying)", self.subnet, exc)
                self.healthy = False
                continue
            if left <= 0:
                self.failures += 1
                metrics.LEASE_RENEWALS.labels(result="expired").inc()
                await self._reacquire("it expired (etcd was unreachable for longer than "
                                      f"the {self.ttl}s TTL?)")
                outage_since = None
                continue
            if outage_since is not None:
                log.info("lease for %s renewed again after %.1fs", self.subnet,
                         time.monotonic() - outage_since)
                outage_since = None
            self.renewals += 1
            metrics.LEASE_RENEWALS.labels(result="ok").inc()
            self.healthy = True
            self.last_renewal = time.monotonic()

    async def _reacquire(self, why: str) -> None:
        old = self.current
        log.warning("lease for %s lost because %s; acquiring again", self.subnet, why)
        self.healthy = False
        entry = await self.acquire()
        if old is not None and entry.record.subnets != old.record.subnets:
            log.warning("node %s moved from subnet %s to %s", entry.record.node,
                        " and ".join(map(str, old.record.subnets)),
                        " and ".join(map(str, entry.record.subnets)))
        if self.on_change is not None:
            await self.on_change(entry)

    async def keep_for_restart(self, grace: int) -> LeaseEntry | None:
        """On a stop that is not a leave: move our keys to a new etcd lease of `grace`
        seconds that nobody renews, so the subnet stays this node's (and programmed on
        every peer) for that long instead of the TTL. The next start takes them over.

        None when there is nothing to keep (no lease held in etcd, or `grace` is not
        longer than the TTL) or the key changed meanwhile; TemporaryError when etcd does
        not answer. Either way the key then expires after the TTL, as after a crash.
        """
        cur = self.current
        if cur is None or self._assumed or not self.lease_id or grace <= self.ttl:
            return None
        grace_id = await self.store.grant(grace)
        try:
            # Every key of the record (a dual-stack node's IPv6 claim too), written in one
            # transaction with it: all at its revision.
            mod = await self.store.replace_lease(
                cur.record, grace_id, dict.fromkeys(cur.record.lease_keys, cur.mod_revision))
            if mod is None:
                # The TTL ran out while the tasks stopped (a short --lease-ttl on a busy
                # host): the keys are gone, not taken; written again if still free.
                mod = await self.store.create_lease(cur.record, grace_id)
        except TemporaryError:
            with contextlib.suppress(TemporaryError):
                await self.store.revoke(grace_id)
            raise
        if mod is None:
            with contextlib.suppress(TemporaryError):
                await self.store.revoke(grace_id)
            return None
        await self._revoke_quietly()  # the TTL lease: no key on it any more
        self.current = LeaseEntry(cur.record, mod, grace_id)
        return self.current

    async def release(self) -> None:
        """Graceful leave: give the subnet back now instead of after the TTL."""
        if self.current is None:
            return
        try:
            await self.store.delete_lease(self.current.record, None)
        finally:
            await self._revoke_quietly()
            self.current = None


def _owner(snap: LeaseSnapshot, subnet: IPNet) -> str:
    e = snap.entries.get(subnet) or snap.claims.get(subnet)
    if e is None:
        e = next((x for x in snap.entries.values() if subnet in x.record.subnets), None)
    return e.record.node if e is not None else "?"
