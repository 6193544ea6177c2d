"""Desired kernel state from the leases, and the diff against the kernel.

Pure functions over frozen records: no netlink, no etcd. The shell gathers
what the kernel has (`Observed`), calls `plan`, applies the ops, and only
then records what is programmed.

Per peer node three entries live on our VXLAN device:
  route   <peer subnet> via <peer VTEP IP> dev overlay.<vni> onlink
  neigh   <peer VTEP IP> lladdr <peer VTEP MAC> nud permanent
  fdb     <peer VTEP MAC> dst <peer underlay IP> self permanent
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from overlay.model import NodeRecord


@dataclass(frozen=True, order=True)
class Route:
    dst: IPv4Network
    via: IPv4Address

    def __str__(self) -> str:
        return f"route {self.dst} via {self.via} onlink"


@dataclass(frozen=True, order=True)
class Neigh:
    ip: IPv4Address
    mac: str
    permanent: bool = True

    def __str__(self) -> str:
        return f"neigh {self.ip} lladdr {self.mac}"


@dataclass(frozen=True, order=True)
class Fdb:
    mac: str
    dst: IPv4Address

    def __str__(self) -> str:
        return f"fdb {self.mac} dst {self.dst}"


Entry = Route | Neigh | Fdb
Kind = Literal["route", "neigh", "fdb"]


def kind_of(entry: Entry) -> Kind:
    if isinstance(entry, Route):
        return "route"
    if isinstance(entry, Neigh):
        return "neigh"
    return "fdb"


@dataclass(frozen=True)
class Entries:
    routes: frozenset[Route] = frozenset()
    neighs: frozenset[Neigh] = frozenset()
    fdbs: frozenset[Fdb] = frozenset()

    def __len__(self) -> int:
        return len(self.routes) + len(self.neighs) + len(self.fdbs)

    def all(self) -> list[Entry]:
        return [*sorted(self.routes), *sorted(self.neighs), *sorted(self.fdbs)]


@dataclass(frozen=True)
class Desired(Entries):
    # Which node each entry is for, to explain changes in logs.
    owner: Mapping[Entry, str] = field(default_factory=dict, compare=False, hash=False)
    # Records left out, with why (duplicate VTEP MAC, subnet outside the cluster...).
    rejected: tuple[tuple[str, str], ...] = ()


Observed = Entries


@dataclass(frozen=True)
class Op:
    action: Literal["add", "del"]
    entry: Entry

    @property
    def kind(self) -> Kind:
        return kind_of(self.entry)

    def __str__(self) -> str:
        return f"{self.action} {self.entry}"


def desired(
    peers: Iterable[NodeRecord],
    me: str,
    cluster: IPv4Network | None = None,
) -> Desired:
    """Entries for every peer other than `me`.

    A record whose subnet lies outside the cluster network, or whose VTEP MAC
    another node already uses, is left out (reported in `rejected`) rather
    than programmed half-way.
    """
    routes: set[Route] = set()
    neighs: set[Neigh] = set()
    fdbs: set[Fdb] = set()
    owner: dict[Entry, str] = {}
    rejected: list[tuple[str, str]] = []
    mac_owner: dict[str, str] = {}
    for rec in sorted(peers, key=lambda r: (r.node, str(r.subnet))):
        if rec.node == me:
            continue
        if cluster is not None and not rec.subnet.subnet_of(cluster):
            rejected.append((rec.node, f"subnet {rec.subnet} is outside {cluster}"))
            continue
        if rec.vtep_mac in mac_owner and mac_owner[rec.vtep_mac] != rec.node:
            rejected.append(
                (rec.node, f"VTEP MAC {rec.vtep_mac} is already used by {mac_owner[rec.vtep_mac]}")
            )
            continue
        mac_owner[rec.vtep_mac] = rec.node
        r = Route(rec.subnet, rec.vtep_ip)
        n = Neigh(rec.vtep_ip, rec.vtep_mac)
        f = Fdb(rec.vtep_mac, rec.underlay_ip)
        routes.add(r)
        neighs.add(n)
        fdbs.add(f)
        owner[r] = owner[n] = owner[f] = rec.node
    return Desired(frozenset(routes), frozenset(neighs), frozenset(fdbs), owner, tuple(rejected))


def plan(want: Entries, have: Entries) -> list[Op]:
    """The ops that turn `have` into `want`, in a safe order.

    New forwarding state goes in before the route that uses it, and a route
    goes away before the entries under it: fdb, neigh, route adds; then
    route, neigh, fdb deletes. Neighbours and routes are keyed by IP and
    destination, so a changed MAC or gateway is one replace, not a delete
    racing an add.
    """
    # Only the differences are sorted: with thousands of peers and nothing
    # to change, sorting every entry would be most of a periodic pass.
    ops: list[Op] = [Op("add", f) for f in sorted(want.fdbs - have.fdbs)]

    have_neigh = {n.ip: n for n in have.neighs}
    neighs = []
    for n in want.neighs - have.neighs:
        cur = have_neigh.get(n.ip)
        if cur is None or cur.mac != n.mac or not cur.permanent:
            neighs.append(n)
    ops += [Op("add", n) for n in sorted(neighs)]

    have_route = {r.dst: r for r in have.routes}
    routes = []
    for r in want.routes - have.routes:
        cur_r = have_route.get(r.dst)
        if cur_r is None or cur_r.via != r.via:
            routes.append(r)
    ops += [Op("add", r) for r in sorted(routes)]

    want_dst = {r.dst for r in want.routes}
    ops += [Op("del", r) for r in sorted(
        r for r in have.routes - want.routes if r.dst not in want_dst)]

    # Entries the kernel made itself (incomplete, stale) are its business.
    want_ip = {n.ip for n in want.neighs}
    ops += [Op("del", n) for n in sorted(
        n for n in have.neighs - want.neighs if n.permanent and n.ip not in want_ip)]

    ops += [Op("del", f) for f in sorted(have.fdbs - want.fdbs)]
    return ops


def explain(op: Op, want: Desired, programmed: Entries) -> str:
    """Why an op is needed, for the one info-level log line per kernel change.

    `programmed` is what the agent last applied successfully: an entry it had
    programmed that is now missing was removed behind its back.
    """
    node = want.owner.get(op.entry)
    if op.action == "add":
        if _programmed(op.entry, programmed):
            return f"repair: removed from the kernel outside overlayd (peer {node})"
        if isinstance(op.entry, Neigh | Route) and _same_key_programmed(op.entry, programmed):
            return f"peer {node} changed its VTEP"
        return f"peer {node} is a member"
    if _wanted_key(op.entry, want):
        return "replaced by the peer's new VTEP"
    if _programmed(op.entry, programmed):
        return "peer is no longer a member"
    return "stale: no current member needs it"


def _programmed(entry: Entry, programmed: Entries) -> bool:
    return entry in programmed.routes or entry in programmed.neighs or entry in programmed.fdbs


def _same_key_programmed(entry: Neigh | Route, programmed: Entries) -> bool:
    if isinstance(entry, Neigh):
        return any(n.ip == entry.ip for n in programmed.neighs)
    return any(r.dst == entry.dst for r in programmed.routes)


def _wanted_key(entry: Entry, want: Entries) -> bool:
    if isinstance(entry, Fdb):
        return any(f.dst == entry.dst for f in want.fdbs)
    return False


def apply_ops(have: Entries, ops: Iterable[Op]) -> Entries:
    """What the kernel holds after `ops` succeed: the shell's bookkeeping."""
    routes = {r.dst: r for r in have.routes}
    neighs = {n.ip: n for n in have.neighs}
    fdbs = set(have.fdbs)
    for op in ops:
        e = op.entry
        if isinstance(e, Route):
            if op.action == "add":
                routes[e.dst] = e
            else:
                routes.pop(e.dst, None)
        elif isinstance(e, Neigh):
            if op.action == "add":
                neighs[e.ip] = e
            else:
                neighs.pop(e.ip, None)
        elif op.action == "add":
            fdbs.add(e)
        else:
            fdbs.discard(e)
    return Entries(frozenset(routes.values()), frozenset(neighs.values()), frozenset(fdbs))
