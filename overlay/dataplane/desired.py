"""Desired kernel state from the leases, and the diff against the kernel.

Pure functions over frozen records: no netlink, no etcd. The shell gathers
what the kernel has (`Observed`), calls `plan`, applies the ops, and only
then records what is programmed.

Per peer node and per pod address family (IPv4, IPv6) the VXLAN device has
  route   <peer subnet> via <peer VTEP IP> dev overlay.<vni> onlink
  neigh   <peer VTEP IP> lladdr <peer VTEP MAC> nud permanent   (ARP or NDP)
and one FDB entry, whichever the families:
  fdb     <peer VTEP MAC> dst <peer underlay IP> self permanent

One VXLAN device carries both families: the inner frame's family does not
depend on the outer one, so IPv6 pods work over an IPv4 underlay and the
other way round; see the README for why not a device per family.

With DirectRouting (flannel's `Backend.DirectRouting`), a peer whose
underlay address is on this node's own underlay subnet gets, for the pod
family of the underlay, a plain route instead:
  route   <peer subnet> via <peer underlay IP> dev <underlay device>
A peer that moves between segments changes its route in one replace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from overlay.model import IPAddr, IPNet, NodeRecord, vtep_address, within


@dataclass(frozen=True)
class Route:
    dst: IPNet
    via: IPAddr
    # True: via the underlay device, unencapsulated (DirectRouting); else onlink on VXLAN.
    direct: bool = False

    def _key(self) -> tuple[int, int, int, int, bool]:
        return (self.dst.version, int(self.dst.network_address), self.dst.prefixlen,
                int(self.via), self.direct)

    def __lt__(self, other: Route) -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        if self.direct:
            return f"route {self.dst} via {self.via} (direct, underlay)"
        return f"route {self.dst} via {self.via} onlink"


@dataclass(frozen=True)
class Neigh:
    ip: IPAddr
    mac: str
    permanent: bool = True

    def _key(self) -> tuple[int, int, str, bool]:
        return (self.ip.version, int(self.ip), self.mac, self.permanent)

    def __lt__(self, other: Neigh) -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        return f"neigh {self.ip} lladdr {self.mac}"


@dataclass(frozen=True)
class Fdb:
    mac: str
    dst: IPAddr

    def _key(self) -> tuple[str, int, int]:
        return (self.mac, self.dst.version, int(self.dst))

    def __lt__(self, other: Fdb) -> bool:
        return self._key() < other._key()

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

    def __contains__(self, entry: object) -> bool:
        return entry in self.routes or entry in self.neighs or entry in self.fdbs


@dataclass(frozen=True)
class Desired(Entries):
    # Which node each entry is for, to explain changes in logs.
    owner: Mapping[Entry, str] = field(default_factory=dict, compare=False, hash=False)
    # Records left out, with why (duplicate VTEP MAC, subnet outside the cluster...).
    rejected: tuple[tuple[str, str], ...] = ()
    # Peers reached by a direct route (DirectRouting), at least for one family.
    direct: frozenset[str] = frozenset()


Observed = Entries


@dataclass(frozen=True)
class UnderlayView:
    """What `desired` needs to know about this node's underlay."""

    family: int  # 4 or 6: the family of the VXLAN device's local address
    network: IPNet | None = None  # this node's underlay subnet
    direct_routing: bool = False

    def is_direct(self, peer: IPAddr) -> bool:
        return (self.direct_routing and self.network is not None
                and peer.version == self.network.version and peer in self.network)


@dataclass(frozen=True)
class Op:
    action: Literal["add", "del"]
    entry: Entry

    @property
    def kind(self) -> Kind:
        return kind_of(self.entry)

    def __str__(self) -> str:
        return f"{self.action} {self.entry}"


def _clusters(cluster: IPNet | Iterable[IPNet] | None) -> tuple[IPNet, ...] | None:
    if cluster is None:
        return None
    if isinstance(cluster, IPv4Network | IPv6Network):
        return (cluster,)
    return tuple(cluster)


def peer_entries(rec: NodeRecord, families: Iterable[int] = (4, 6),
                 underlay: UnderlayView | None = None) -> list[Entry]:
    """The entries that program one peer, for the pod families `families`."""
    out: list[Entry] = []
    vxlan = False
    for subnet in rec.subnets:
        if subnet.version not in families:
            continue
        if underlay is not None and underlay.is_direct(rec.underlay_ip) \
                and subnet.version == rec.underlay_ip.version:
            out.append(Route(subnet, rec.underlay_ip, direct=True))
            continue
        vtep = vtep_address(subnet)
        out += [Route(subnet, vtep), Neigh(vtep, rec.vtep_mac)]
        vxlan = True
    if vxlan:
        out.append(Fdb(rec.vtep_mac, rec.underlay_ip))
    return out


def _reject_why(rec: NodeRecord, clusters: tuple[IPNet, ...] | None,
                underlay: UnderlayView | None) -> str:
    if clusters is not None:
        families = {c.version for c in clusters}
        mine = [s for s in rec.subnets if s.version in families]
        if not mine:
            want = " and ".join(f"IPv{f}" for f in sorted(families))
            return f"it has no {want} subnet (subnets: {', '.join(map(str, rec.subnets))})"
        for s in mine:
            if not any(within(s, c) for c in clusters):
                return f"subnet {s} is outside {' and '.join(map(str, clusters))}"
    if underlay is not None and rec.underlay_ip.version != underlay.family:
        return (f"its underlay address {rec.underlay_ip} is IPv{rec.underlay_ip.version}, "
                f"this node's VXLAN device sends over IPv{underlay.family}")
    return ""


def desired(
    peers: Iterable[NodeRecord],
    me: str,
    cluster: IPNet | Iterable[IPNet] | None = None,
    underlay: UnderlayView | None = None,
) -> Desired:
    """Entries for every peer other than `me`.

    `cluster` is the pod network(s); a peer's subnets of other families are
    not programmed. A record whose subnet lies outside the cluster network,
    whose VTEP MAC another node already uses, or whose underlay address is not
    of our underlay's family is left out (reported in `rejected`) rather than
    programmed half-way.
    """
    clusters = _clusters(cluster)
    families = {c.version for c in clusters} if clusters is not None else {4, 6}
    routes: set[Route] = set()
    neighs: set[Neigh] = set()
    fdbs: set[Fdb] = set()
    owner: dict[Entry, str] = {}
    rejected: list[tuple[str, str]] = []
    direct: set[str] = set()
    mac_owner: dict[str, str] = {}
    for rec in sorted(peers, key=lambda r: (r.node, r.key_subnet.version, str(r.key_subnet))):
        if rec.node == me:
            continue
        why = _reject_why(rec, clusters, underlay)
        if why:
            rejected.append((rec.node, why))
            continue
        if rec.vtep_mac in mac_owner and mac_owner[rec.vtep_mac] != rec.node:
            rejected.append(
                (rec.node, f"VTEP MAC {rec.vtep_mac} is already used by {mac_owner[rec.vtep_mac]}")
            )
            continue
        mac_owner[rec.vtep_mac] = rec.node
        for e in peer_entries(rec, families, underlay):
            if isinstance(e, Route):
                routes.add(e)
                if e.direct:
                    direct.add(rec.node)
            elif isinstance(e, Neigh):
                neighs.add(e)
            else:
                fdbs.add(e)
            owner[e] = rec.node
    return Desired(frozenset(routes), frozenset(neighs), frozenset(fdbs), owner,
                   tuple(rejected), frozenset(direct))


def plan(want: Entries, have: Entries) -> list[Op]:
    """The ops that turn `have` into `want`, in a safe order.

    New forwarding state goes in before the route that uses it, and a route
    goes away before the entries under it: fdb, neigh, route adds; then
    route, neigh, fdb deletes. Neighbours and routes are keyed by IP and
    destination, so a changed MAC or gateway, or a route switching between
    VXLAN and a direct path, is one replace, not a delete racing an add.
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
        if cur_r is None or cur_r.via != r.via or cur_r.direct != r.direct:
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
        if op.entry in programmed:
            return f"repair: removed from the kernel outside overlayd (peer {node})"
        if isinstance(op.entry, Route):
            was = next((r for r in programmed.routes if r.dst == op.entry.dst), None)
            if was is not None and was.direct != op.entry.direct:
                return (f"peer {node} is now on this node's underlay subnet: direct route"
                        if op.entry.direct else
                        f"peer {node} left this node's underlay subnet: through VXLAN")
            if was is not None:
                return f"peer {node} changed its VTEP"
        if isinstance(op.entry, Neigh) and any(n.ip == op.entry.ip for n in programmed.neighs):
            return f"peer {node} changed its VTEP"
        return f"peer {node} is a member"
    if _wanted_key(op.entry, want):
        return "replaced by the peer's new VTEP"
    if op.entry in programmed:
        if isinstance(op.entry, Neigh) and any(r.direct and op.entry.ip in r.dst
                                               for r in want.routes):
            return "the peer is routed directly now"
        if isinstance(op.entry, Fdb) and want.direct:
            return "the peer left, or is routed directly now"
        return "peer is no longer a member"
    return "stale: no current member needs it"


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
