"""Following etcd: the network config and the leases.

`ConfigFollower` reads the network config at start (or, when etcd does not
answer in time and the state dir has one, takes the saved one) and then
watches it: a change is reported (log, `config` condition) and applied only
by a restart, and a config that does not parse is refused, keeping the last
good one. `LeaseFollower` keeps the peer table equal to the leases in etcd:
a watch from a revision, a fresh listing whenever the watch is lost, and a
check of our own key after every change (deleted or taken: the lease
manager wins it back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from overlay.agent.lease import LeaseManager
from overlay.agent.peers import PeerTable
from overlay.agent.readiness import Readiness
from overlay.errors import ConfigError, NotFound, TemporaryError
from overlay.etcdstore import WatchLost
from overlay.model import LeaseEvent, LeaseSnapshot, NetworkConfig
from overlay.retry import Once, wait

log = logging.getLogger("overlayd")


class ConfigSource(Protocol):
    async def get_config(self) -> NetworkConfig: ...
    async def ping(self) -> int: ...
    def watch_config(self, start_revision: int) -> AsyncIterator[int]: ...


class LeaseSource(Protocol):
    async def list_leases(self) -> LeaseSnapshot: ...
    def watch_leases(self, start_revision: int) -> AsyncIterator[list[LeaseEvent]]: ...


class ConfigFollower:
    def __init__(self, store: ConfigSource, readiness: Readiness, state_dir: Path) -> None:
        self.store = store
        self.readiness = readiness
        self.state_dir = state_dir
        self.cfg: NetworkConfig | None = None
        # etcd did not answer at start: `cfg` is the one saved by the last run.
        self.from_saved = False
        self._refused = Once()  # the last refusal of the config in etcd
        self._changed = Once()  # the last "config changed, restart" warning

    async def first(self, saved: NetworkConfig | None, timeout: float) -> NetworkConfig:
        """The config to start with; waits (saying why) until etcd has a valid one, unless
        etcd does not answer within `timeout` and there is a `saved` one."""
        waiting = Once()
        first = True
        while True:
            try:
                if first and saved is not None:
                    # Do not wait long for an etcd that does not answer: there is a
                    # saved config to start from (degraded, see overlay.agent.degraded).
                    try:
                        cfg = await asyncio.wait_for(self.store.get_config(), timeout)
                    except TimeoutError:
                        raise TemporaryError(f"etcd did not answer in {timeout}s") from None
                else:
                    cfg = await self.store.get_config()
                self.readiness.set("etcd", True, "reachable")
                self.readiness.set("config", True, ", ".join(map(str, cfg.networks)))
                log.info("network config: %s", cfg.describe())
                self.cfg = cfg
                return cfg
            except NotFound as exc:
                msg = str(exc)
                self.readiness.set("config", False, msg)
            except ConfigError as exc:
                msg = f"invalid network config: {exc}"
                self.readiness.set("config", False, msg)
            except TemporaryError as exc:
                msg = str(exc)
                self.readiness.set("etcd", False, msg)
                if first and saved is not None:
                    log.warning("cannot read the network config from etcd (%s); using the "
                                "one saved in %s: %s", msg, self.state_dir, saved.to_json())
                    self.from_saved = True
                    self.readiness.set("config", True, f"{saved.network} (saved)")
                    self.cfg = saved
                    return saved
            first = False
            if waiting.changed(msg):
                log.warning("waiting for the network config: %s", msg)
                self.readiness.status(f"waiting for the network config: {msg}")
            await asyncio.sleep(1)

    async def watch(self, recheck: float = 60.0) -> None:
        """Check the config in etcd whenever it changes (a watch), and every `recheck`
        seconds in case a change slipped past a watch that was being re-established."""
        changed = asyncio.Event()

        async def follow() -> None:
            while True:
                try:
                    start = await self.store.ping() + 1
                    changed.set()  # anything before `start` is checked by this read
                    async for _ in self.store.watch_config(start):
                        changed.set()
                except (WatchLost, TemporaryError) as exc:
                    log.debug("config watch restarts: %s", exc)
                await asyncio.sleep(1)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(follow(), name="config-watch-stream")
            while True:
                await wait(changed, recheck)
                changed.clear()
                await self.check()

    async def check(self) -> None:
        try:
            cfg = await self.store.get_config()
        except (ConfigError, NotFound) as exc:
            msg = str(exc)
            if self._refused.changed(msg):
                log.error("refusing the network config now in etcd (%s); keeping the last "
                          "good one (%s)", msg, self.cfg.describe() if self.cfg else "-")
            self.readiness.set("config", False, f"refused: {msg}; using the last good one")
            return
        except TemporaryError:
            return
        self._refused.reset()
        if self.cfg is not None and cfg != self.cfg:
            msg = (f"the network config changed in etcd ({self.cfg.to_json()} -> "
                   f"{cfg.to_json()}); restart overlayd on every node to apply it")
            self.readiness.set("config", True, msg)
            if self._changed.changed(msg):
                log.warning("%s", msg)
        else:
            self.readiness.set("config", True, ", ".join(map(str, cfg.networks)))


class LeaseFollower:
    def __init__(self, store: LeaseSource, peers: PeerTable, lease: LeaseManager,
                 wake: Callable[[], None]) -> None:
        self.store = store
        self.peers = peers
        self.lease = lease
        self.wake = wake  # the reconciler: the peers changed

    async def list_until_ok(self) -> LeaseSnapshot:
        while True:
            try:
                return await self.store.list_leases()
            except TemporaryError as exc:
                log.warning("cannot list leases: %s; retrying", exc)
                await asyncio.sleep(1)

    async def run(self, revision: int | None) -> None:
        """Follow the leases from `revision` on (None: list them first). Never returns."""
        peers = self.peers
        said = Once()
        while True:
            if revision is not None:
                try:
                    async for batch in self.store.watch_leases(revision + 1):
                        if peers.apply(batch):
                            self.wake()
                        revision = max(revision, peers.revision)
                        self.check_own_lease()
                except WatchLost as exc:
                    log.info("lease watch restarts from a fresh listing: %s", exc)
                except TemporaryError as exc:
                    log.warning("lease watch failed: %s; relisting", exc)
                    await asyncio.sleep(1)
            try:
                snap = await self.store.list_leases()
            except TemporaryError as exc:
                if said.changed(str(exc)):
                    log.warning("cannot list leases: %s; retrying", exc)
                await asyncio.sleep(1)
                continue
            said.reset()
            if peers.reset(snap):
                self.wake()
            revision = snap.revision
            self.check_own_lease()

    def check_own_lease(self) -> None:
        lease, peers = self.lease, self.peers
        if lease.current is None or lease.assumed:
            return
        if peers.revision < lease.current.mod_revision:
            return  # the watch has not reached our own last write yet: old news
        mine = lease.current.record
        e = peers.entries.get(mine.key_subnet)
        if e is None:
            lease.lost("its key was deleted from etcd")
        elif e.record.node != lease.template.node:
            lease.lost(f"node {e.record.node} now holds it")
        else:
            for k in mine.lease_keys[1:]:  # the IPv6 claim of a dual-stack lease
                c = peers.claims.get(k)
                if c is None or c.record.node != lease.template.node:
                    lease.lost(f"its IPv6 claim {k} was deleted or taken")
