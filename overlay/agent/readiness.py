"""Readiness: the named conditions of a node, and telling systemd about them.

A node is ready once it holds a lease, its devices are up and the kernel
matches the leases. `etcd`, `config` and `membership` are shown too but do
not block: a node keeps serving pods from its last good state while etcd is
away. The agent sets conditions as it starts; once it runs, `observe` reads
them every half second from the parts that own the facts (lease manager,
reconciler, membership). systemd (Type=notify) gets READY=1 once, and a
STATUS= line whenever the one-line summary changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from overlay import metrics
from overlay.agent.lease import LeaseManager
from overlay.agent.sdnotify import Notifier
from overlay.dataplane.reconciler import Reconciler
from overlay.retry import Once

REQUIRED = ("lease", "device", "reconciled")
# What a "not ready" answer names (etcd and membership problems have their own lines).
BLOCKING = ("config", *REQUIRED)


@dataclass(frozen=True)
class Condition:
    ok: bool = False
    message: str = "not checked yet"


class Readiness:
    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()  # systemd Type=notify ($NOTIFY_SOCKET)
        self._conditions = {k: Condition() for k in ("etcd", "config", "lease", "device",
                                                    "reconciled")}
        self._status = Once()

    def set(self, name: str, ok: bool, message: str = "") -> None:
        self._conditions[name] = Condition(ok, message or ("ok" if ok else "failing"))

    @property
    def conditions(self) -> Mapping[str, Condition]:
        return MappingProxyType(self._conditions)

    def ready(self) -> bool:
        return all(self._conditions[k].ok for k in REQUIRED)

    def not_ready_reason(self) -> str:
        bad = [f"{k}: {c.message}" for k, c in self._conditions.items()
               if not c.ok and k in BLOCKING]
        return "; ".join(bad) or "starting"

    def lease_pending(self, lease: LeaseManager | None) -> None:
        """Why there is no lease yet, read on demand (the `observe` loop starts later)."""
        if lease is not None and lease.current is None and lease.last_error:
            self.set("lease", False, f"no subnet yet: {lease.last_error}")

    def observe(self, lease: LeaseManager, rec: Reconciler,
                membership: tuple[bool, str] | None, degraded: bool) -> None:
        """Conditions from the state of the parts that run."""
        if lease.current is None:
            self.set("lease", False, "no subnet lease")
        elif lease.assumed:
            self.set("lease", True, f"assumed {lease.describe()} from the saved state (etcd "
                     "unreachable)")
        else:
            self.set("lease", True, f"holding {lease.describe()}")
        if not degraded:  # while degraded, the etcd condition says why
            self.set("etcd", lease.healthy, "reachable" if lease.healthy
                     else "cannot renew the lease")
        metrics.ETCD_UP.set(1 if lease.healthy else 0)
        if rec.last_error:
            self.set("reconciled", False, rec.last_error)
        else:
            self.set("reconciled", True, "kernel matches the leases")
        if membership is not None:
            self.set("membership", *membership)
        metrics.READY.set(1 if self.ready() else 0)

    # --- systemd ------------------------------------------------------------------

    def status(self, line: str) -> None:
        """STATUS= for `systemctl status`, sent only when it changed."""
        if self._status.changed(line):
            self.notifier.status(line)

    def started(self, line: str) -> None:
        """READY=1: units ordered after overlayd start now."""
        self._status.changed(line)
        self.notifier.ready(line)

    def stopping(self, why: str) -> None:
        self.notifier.stopping(why)

    async def follow(self, update: Callable[[], None], line: Callable[[], str],
                     interval: float = 0.5) -> None:
        """Every `interval`: `update()` the conditions, then send `line()` if it changed."""
        while True:
            await asyncio.sleep(interval)
            update()
            self.status(line())
