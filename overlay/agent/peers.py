"""Who the peers are, according to etcd (the source of truth for ownership).

Kept as the full map subnet -> lease entry, replaced wholesale on a relist
(resync from a snapshot) and patched by watch events in between. Listeners
(the membership) are told after every change; what is programmed is this
view corrected by membership (`overlay.membership.effective`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from overlay.model import IPNet, LeaseEntry, LeaseEvent, LeaseSnapshot, NodeRecord

log = logging.getLogger(__name__)


class PeerTable:
    def __init__(self, me: str) -> None:
        self.me = me
        self.entries: dict[IPNet, LeaseEntry] = {}
        # The IPv6 claim keys of dual-stack leases (who holds which IPv6 subnet).
        self.claims: dict[IPNet, LeaseEntry] = {}
        self.revision = 0
        self.synced = False
        self.listeners: list[Callable[[], None]] = []

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def reset(self, snap: LeaseSnapshot) -> bool:
        """Replace everything with a fresh listing; True if anything changed."""
        changed = False
        for subnet in sorted(set(self.entries) - set(snap.entries)):
            self._log_change(self.entries[subnet], None)
            changed = True
        for subnet, entry in sorted(snap.entries.items()):
            old = self.entries.get(subnet)
            if old is None or old.record != entry.record:
                self._log_change(old, entry)
                changed = True
        for key, why in snap.invalid:
            log.warning("ignoring invalid lease %s: %s", key, why)
        moved = snap.entries != self.entries  # records or revisions
        self.entries = dict(snap.entries)
        self.claims = dict(snap.claims)
        self.revision = snap.revision
        self.synced = True
        if moved:
            self._notify()
        return changed

    def apply(self, events: Iterable[LeaseEvent]) -> bool:
        changed = moved = False
        for ev in events:
            if ev.claim or (ev.entry is None and ev.subnet in self.claims):
                if ev.entry is None:
                    self.claims.pop(ev.subnet, None)
                else:
                    self.claims[ev.subnet] = ev.entry
                self.revision = max(self.revision, ev.revision)
                continue
            old = self.entries.get(ev.subnet)
            moved = moved or old != ev.entry
            if ev.entry is None:
                if old is not None:
                    del self.entries[ev.subnet]
                    self._log_change(old, None)
                    changed = True
            else:
                self.entries[ev.subnet] = ev.entry
                if old is None or old.record != ev.entry.record:
                    self._log_change(old, ev.entry)
                    changed = True
            self.revision = max(self.revision, ev.revision)
        if moved:
            self._notify()
        return changed

    def snapshot(self) -> LeaseSnapshot:
        return LeaseSnapshot(self.revision, dict(self.entries), [], dict(self.claims))

    def records(self) -> list[NodeRecord]:
        return [e.record for e in self.entries.values()]

    def peer_records(self) -> list[NodeRecord]:
        return [e.record for e in self.entries.values() if e.record.node != self.me]

    def _log_change(self, old: LeaseEntry | None, new: LeaseEntry | None) -> None:
        rec = (new or old).record  # type: ignore[union-attr]
        if rec.node == self.me:
            return
        if old is None:
            log.info("peer %s joined: subnet %s, underlay %s, VTEP %s", rec.node, rec.subnet,
                     rec.underlay_ip, rec.vtep_mac)
        elif new is None:
            log.info("peer %s left: its lease for %s is gone", rec.node, rec.subnet)
        else:
            o, n = old.record, new.record
            diffs = [f"{what} {a} -> {b}" for what, a, b in (
                ("node", o.node, n.node), ("underlay", o.underlay_ip, n.underlay_ip),
                ("VTEP MAC", o.vtep_mac, n.vtep_mac), ("gRPC", o.grpc_addr, n.grpc_addr))
                if a != b]
            log.info("peer %s changed: %s", rec.node, ", ".join(diffs) or "lease renewed")
