"""Starting while etcd is unreachable, from what the state dir kept.

The state dir holds the node's last lease (subnet and etcd revision), the
network config and the last listing of the leases (`overlay.agent.state`).
When etcd does not answer within --etcd-startup-timeout and the last lease
is there, the agent assumes it, programs the peers it knew and gossips its
own (possibly new) record, so that peers reprogram it; it says DEGRADED
(log, `etcd` condition, status) until the lease acquisition, still running,
succeeds. While running normally, the listing is saved every few seconds
for the next such start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from overlay.agent import state
from overlay.agent.lease import LeaseManager, Template
from overlay.agent.peers import PeerTable
from overlay.agent.readiness import Readiness
from overlay.model import LeaseEntry, LeaseSnapshot

log = logging.getLogger("overlayd")


class DegradedStart:
    def __init__(self, state_dir: Path, readiness: Readiness, startup_timeout: float) -> None:
        self.state_dir = state_dir
        self.readiness = readiness
        self.startup_timeout = startup_timeout
        self.active = False
        self._pending: asyncio.Task[LeaseEntry] | None = None

    async def acquire_or_assume(self, lease: LeaseManager, ident: state.Identity,
                                template: Template, etcd_answered: bool) -> LeaseEntry:
        """Our lease from etcd; or, if etcd does not answer in time and the state dir has
        our last lease, that one (degraded), with the acquisition still running."""
        # Retry often: when etcd returns after a long outage our key may have expired,
        # and peers do not program us until we hold a lease again.
        task = asyncio.create_task(lease.acquire(retry_max=1.0), name="lease-acquire")
        if not (ident.subnets and ident.lease_revision):
            return await task
        # (no second wait when etcd already did not answer for the config)
        wait = self.startup_timeout if etcd_answered else 0.0
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            pass
        self._pending = task
        entry = LeaseEntry(template.record(*ident.subnets), ident.lease_revision, 0)
        held = " and ".join(map(str, ident.subnets))
        lease.assume(entry)
        self.active = True
        msg = (f"unreachable at start-up: running DEGRADED from the state saved in "
               f"{self.state_dir} (subnet {held}, lease revision "
               f"{ident.lease_revision}); peers learn our record by gossip; the lease is "
               "re-taken when etcd answers")
        log.warning("etcd %s", msg)
        self.readiness.set("etcd", False, msg)
        self.readiness.set("lease", True, f"assumed {held} from the saved state")
        return entry

    def saved_peers(self) -> LeaseSnapshot | None:
        return state.load_peers(self.state_dir)

    async def until_etcd(self, on_lease: Callable[[LeaseEntry], Awaitable[None]]) -> None:
        """Returns at once unless degraded; else when the lease is re-taken in etcd."""
        if self._pending is None:
            return
        entry = await self._pending
        self._pending = None
        log.info("etcd answers again: lease for %s re-taken; no longer degraded",
                 " and ".join(map(str, entry.record.subnets)))
        self.active = False
        await on_lease(entry)

    def cancel(self) -> None:
        """Stop a lease acquisition still running (the agent stops)."""
        if self._pending is not None:
            self._pending.cancel()

    async def persist_peers(self, peers: PeerTable, interval: float = 2.0) -> None:
        """Keep the last listing of the leases on disk, for a start without etcd."""
        saved = peers.revision if self.active else -1
        while True:
            await asyncio.sleep(interval)
            if peers.synced and peers.revision != saved and not self.active:
                try:
                    state.save_peers(self.state_dir, peers.snapshot())
                    saved = peers.revision
                except OSError as exc:
                    log.warning("cannot save the peers to %s: %s", self.state_dir, exc)
