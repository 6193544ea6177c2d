"""What the data plane programs: etcd's leases, corrected by what the nodes announce.

Pure functions. etcd decides who owns which subnet: only nodes with a lease
in etcd are programmed, never a node known from gossip alone. Gossip may
only say something newer about a node etcd has a lease for: its own record,
published at or after the etcd revision of that lease (a node restarted with
a new VTEP MAC or underlay IP while etcd was unreachable), or that it left
gracefully, which removes it at once instead of after its lease is deleted.
Either counts only as the node's own word: signed with the key its lease
publishes (`admission.py` checked it; here, that it is the key of this lease).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from overlay.membership.swim import Member, State
from overlay.model import IPNet, LeaseEntry, NodeRecord

Source = Literal["etcd", "gossip", "left"]


@dataclass(frozen=True)
class Peer:
    """One etcd lease holder as the data plane sees it."""

    entry: LeaseEntry
    record: NodeRecord      # what to program (etcd's record, or the node's newer one)
    source: Source          # "left": not programmed, the node left gracefully


def effective_peer(entry: LeaseEntry, member: Member | None) -> Peer:
    rec = entry.record
    if member is None or not member.heard:
        return Peer(entry, rec, "etcd")
    said = member.record
    if said.name != rec.node or said.lease_revision < entry.mod_revision:
        return Peer(entry, rec, "etcd")  # etcd's record is newer than anything it told us
    if said.proof is None or not rec.public_key or said.proof.key != rec.public_key:
        return Peer(entry, rec, "etcd")  # not signed with the key etcd binds to the node
    if member.state == State.LEFT:
        return Peer(entry, rec, "left")
    if said.node.subnets != rec.subnets:
        return Peer(entry, rec, "etcd")  # etcd wins on ownership
    merged = rec.with_(underlay_ip=said.node.underlay_ip, vtep_mac=said.node.vtep_mac,
                       grpc_addr=said.node.grpc_addr)
    return Peer(entry, merged, "gossip" if merged != rec else "etcd")


def effective_peers(entries: Mapping[IPNet, LeaseEntry], members: Mapping[str, Member],
                    me: str) -> list[Peer]:
    """Every other node holding a lease in etcd, in subnet order (IPv4 first)."""
    return [effective_peer(e, members.get(e.record.node))
            for _, e in sorted(entries.items(), key=lambda kv: (kv[0].version, kv[0]))
            if e.record.node != me]


def programmable(peers: Iterable[Peer]) -> list[NodeRecord]:
    return [p.record for p in peers if p.source != "left"]
