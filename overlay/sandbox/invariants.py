"""What must hold in a healed cluster, decided on an observation made without the agent.

Pure: `overlay.sandbox.observe` gathers an `Observation` with etcdctl, ip,
bridge, the allocation files and ping; `violations()` says which invariants
fail, each with the evidence. Addresses are checked per family (`families`),
so an IPv6 or dual-stack cluster is checked family by family with the same
rules.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, ip_interface, ip_network
from typing import Any

from overlay.devnames import host_veth_name

INVARIANTS: dict[str, str] = {
    "etcd": "etcd answers a linearizable read of the leases (it has quorum)",
    "agents": "every node's agent process runs and is not stopped (/proc)",
    "one-lease-per-node": "every node holds exactly one lease per address family, and every "
                          "lease belongs to a node of the sandbox",
    "no-subnet-twice": "no two leases overlap, and every node's pod bridge carries the "
                       "subnet of its own lease and no other node's",
    "pod-addresses": "every pod has exactly the address its ADD returned, inside its node's "
                     "subnet, and no two pods share one",
    "no-leaks": "on every node: one host veth per pod, all on the bridge, one allocation file "
                "per pod and none else, only the gateway address on the bridge and the VTEP "
                "address on the VXLAN device",
    "peers-programmed": "on every node, a route, a permanent neighbour and an FDB entry for "
                        "every other node's lease, and none for a subnet nobody holds",
    "reachability": "every pod reaches every other pod (ping)",
}


@dataclass(frozen=True)
class Lease:
    key: str
    node: str
    subnet: str
    underlay_ip: str = ""
    vtep_mac: str = ""
    lease_id: int = 0
    error: str = ""  # the value did not parse

    @property
    def family(self) -> int:
        return ip_network(self.subnet).version if self.subnet else 0


@dataclass(frozen=True)
class NodeView:
    name: str
    agent: str = "running"  # running, stopped, not running, powered off
    bridge_addrs: tuple[str, ...] = ()  # global addresses on the pod bridge, CIDR
    vxlan_addrs: tuple[str, ...] = ()
    veths: tuple[tuple[str, str], ...] = ()  # (host veth, its master or "")
    allocations: tuple[tuple[str, str], ...] = ()  # (ip, container id) from the IPAM files
    routes: tuple[str, ...] = ()  # destinations on the VXLAN device
    neighs: tuple[tuple[str, str], ...] = ()  # permanent (ip, lladdr) on the VXLAN device
    fdb: tuple[tuple[str, str], ...] = ()  # (mac, dst) on the VXLAN device
    error: str = ""  # could not be observed


@dataclass(frozen=True)
class PodView:
    name: str
    node: str
    container_id: str
    ifname: str = "eth0"
    recorded: tuple[str, ...] = ()  # what ADD returned (addresses, no prefix)
    addrs: tuple[str, ...] = ()  # global addresses on its interface, CIDR
    error: str = ""


@dataclass(frozen=True)
class Observation:
    leases: tuple[Lease, ...] = ()
    nodes: tuple[NodeView, ...] = ()
    pods: tuple[PodView, ...] = ()
    etcd_error: str = ""
    # (source pod, destination pod, destination address) that did not answer; None: not probed
    unreachable: tuple[tuple[str, str, str], ...] | None = None
    probed: int = 0


@dataclass(frozen=True)
class Violation:
    invariant: str
    subject: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "subject": self.subject, "message": self.message,
                "evidence": self.evidence}


def violations(obs: Observation, families: Sequence[int] = (4,)) -> list[Violation]:
    """Every invariant that fails, with evidence; [] when the cluster is whole."""
    out: list[Violation] = []
    if obs.etcd_error:
        out.append(Violation("etcd", "etcd", f"etcd could not be read: {obs.etcd_error}"))
    for n in obs.nodes:
        if n.agent != "running":
            out.append(Violation("agents", n.name, f"the agent on {n.name} is {n.agent}"))
        if n.error:
            out.append(Violation("no-leaks", n.name, f"{n.name} could not be observed: "
                                 f"{n.error}"))
    for p in obs.pods:
        if p.error:
            out.append(Violation("pod-addresses", p.name, f"pod {p.name} could not be "
                                 f"observed: {p.error}"))
    if not obs.etcd_error:
        for fam in families:
            out += _leases(obs, fam)
            out += _subnets(obs, fam)
            out += _pods(obs, fam)
            out += _leaks(obs, fam)
            out += _peers(obs, fam)
        out += _veths(obs)
    if obs.unreachable:
        out.append(Violation(
            "reachability", "pods", f"{len(obs.unreachable)} of {obs.probed} pod pairs do not "
            "reach each other", {"unreachable": [f"{a} -> {b} ({ip})"
                                                 for a, b, ip in obs.unreachable]}))
    return out


def own_leases(obs: Observation, family: int) -> dict[str, Lease]:
    """Node name -> its lease of `family`, for nodes holding exactly one."""
    by: dict[str, list[Lease]] = defaultdict(list)
    for lease in obs.leases:
        if not lease.error and lease.family == family:
            by[lease.node].append(lease)
    return {n: ls[0] for n, ls in by.items() if len(ls) == 1}


def _of(addrs: Iterable[str], family: int) -> list[str]:
    return [a for a in addrs if ip_interface(a).version == family]


def _leases(obs: Observation, fam: int) -> list[Violation]:
    out = []
    nodes = {n.name for n in obs.nodes}
    count = Counter(lease.node for lease in obs.leases if not lease.error
                    and lease.family == fam)
    for lease in obs.leases:
        if lease.error:
            out.append(Violation("one-lease-per-node", lease.key, f"lease {lease.key} holds "
                                 f"no valid record: {lease.error}"))
        elif lease.family == fam and lease.node not in nodes:
            out.append(Violation("one-lease-per-node", lease.node, f"lease {lease.key} "
                                 f"belongs to {lease.node!r}, which is not a node of the "
                                 "sandbox", {"lease": lease.key}))
    for n in sorted(nodes):
        if count[n] != 1:
            keys = [lease.key for lease in obs.leases if lease.node == n
                    and lease.family == fam]
            out.append(Violation("one-lease-per-node", n, f"{n} holds {count[n]} IPv{fam} "
                                 "leases", {"leases": keys}))
    return out


def _subnets(obs: Observation, fam: int) -> list[Violation]:
    out = []
    ls = [lease for lease in obs.leases if not lease.error and lease.family == fam]
    for i, a in enumerate(ls):
        for b in ls[i + 1:]:
            if ip_network(a.subnet).overlaps(ip_network(b.subnet)):
                out.append(Violation("no-subnet-twice", f"{a.node},{b.node}",
                                     f"leases {a.subnet} ({a.node}) and {b.subnet} ({b.node}) "
                                     "overlap"))
    own = own_leases(obs, fam)
    holders: dict[str, list[str]] = defaultdict(list)
    for n in obs.nodes:
        if n.error:
            continue
        on_bridge = sorted({str(ip_interface(a).network) for a in _of(n.bridge_addrs, fam)})
        for net in on_bridge:
            holders[net].append(n.name)
        lease = own.get(n.name)
        if lease is not None and on_bridge and on_bridge != [lease.subnet]:
            out.append(Violation("no-subnet-twice", n.name, f"{n.name}'s pod bridge is on "
                                 f"{', '.join(on_bridge)} but its lease is {lease.subnet}",
                                 {"bridge": list(n.bridge_addrs), "lease": lease.key}))
    for net, who in sorted(holders.items()):
        if len(who) > 1:
            out.append(Violation("no-subnet-twice", ",".join(who), f"{net} is on the pod "
                                 f"bridge of {len(who)} nodes: {', '.join(who)}"))
    return out


def _pods(obs: Observation, fam: int) -> list[Violation]:
    out = []
    own = own_leases(obs, fam)
    seen: dict[str, list[str]] = defaultdict(list)
    for p in obs.pods:
        if p.error:
            continue
        have = _of(p.addrs, fam)
        want = [a for a in p.recorded if ip_interface(a).version == fam]
        ips = [str(ip_interface(a).ip) for a in have]
        for ip in ips:
            seen[ip].append(p.name)
        if sorted(ips) != sorted(want):
            out.append(Violation("pod-addresses", p.name, f"pod {p.name} has "
                                 f"{', '.join(have) or 'no address'} on {p.ifname}; ADD "
                                 f"returned {', '.join(want) or 'none'}",
                                 {"addresses": list(p.addrs), "recorded": list(p.recorded)}))
        lease = own.get(p.node)
        for a in have:
            if lease is not None and ip_interface(a).ip not in ip_network(lease.subnet):
                out.append(Violation("pod-addresses", p.name, f"pod {p.name} has {a}, outside "
                                     f"{lease.subnet}, the subnet of its node {p.node}",
                                     {"lease": lease.key}))
    for ip, who in sorted(seen.items()):
        if len(who) > 1:
            out.append(Violation("pod-addresses", ",".join(who), f"{ip} is the address of "
                                 f"{len(who)} pods: {', '.join(who)}"))
    return out


def _leaks(obs: Observation, fam: int) -> list[Violation]:
    from overlay.model import pod_gateway

    out = []
    own = own_leases(obs, fam)
    for n in obs.nodes:
        if n.error:
            continue
        pods = [p for p in obs.pods if p.node == n.name and not p.error]
        want_alloc = {(ip, p.container_id) for p in pods for ip in p.recorded
                      if ip_interface(ip).version == fam}
        have_alloc = {(ip, cid) for ip, cid in n.allocations if ip_interface(ip).version == fam}
        if want_alloc != have_alloc:
            out.append(Violation("no-leaks", n.name, f"allocation files on {n.name} do not "
                                 "match its pods", {
                                     "leaked": sorted(f"{ip} ({cid})"
                                                      for ip, cid in have_alloc - want_alloc),
                                     "missing": sorted(f"{ip} ({cid})"
                                                       for ip, cid in want_alloc - have_alloc)}))
        lease = own.get(n.name)
        if lease is None:
            continue
        net = ip_network(lease.subnet)
        gw = str(pod_gateway(net)) if isinstance(net, IPv4Network) else ""
        bridge = _of(n.bridge_addrs, fam)
        if gw and bridge != [gw]:
            out.append(Violation("no-leaks", n.name, f"{n.name}'s pod bridge has "
                                 f"{', '.join(bridge) or 'no address'}, not just the gateway "
                                 f"{gw}", {"bridge": list(n.bridge_addrs)}))
        vtep = f"{net.network_address}/{net.max_prefixlen}"
        vx = _of(n.vxlan_addrs, fam)
        if vx != [vtep]:
            out.append(Violation("no-leaks", n.name, f"{n.name}'s VXLAN device has "
                                 f"{', '.join(vx) or 'no address'}, not just its VTEP address "
                                 f"{vtep}", {"vxlan": list(n.vxlan_addrs)}))
    return out


def _veths(obs: Observation) -> list[Violation]:
    out = []
    for n in obs.nodes:
        if n.error:
            continue
        want = {host_veth_name(p.container_id, p.ifname) for p in obs.pods if p.node == n.name}
        have = {name for name, _ in n.veths}
        loose = sorted(name for name, master in n.veths if name in want and not master)
        if have != want or loose:
            out.append(Violation("no-leaks", n.name, f"host veths on {n.name} do not match "
                                 "its pods", {"leaked": sorted(have - want),
                                              "missing": sorted(want - have),
                                              "not on the bridge": loose}))
    return out


def _peers(obs: Observation, fam: int) -> list[Violation]:
    out = []
    own = own_leases(obs, fam)
    leases = [lease for lease in obs.leases if not lease.error and lease.family == fam]
    for n in obs.nodes:
        if n.error or n.name not in own:
            continue
        others = [lease for lease in leases if lease.node != n.name]
        want_routes = {lease.subnet for lease in others}
        have_routes = {r for r in n.routes if ip_network(r).version == fam}
        vtep = {lease.subnet: str(ip_network(lease.subnet).network_address) for lease in others}
        want_neigh = {(vtep[lease.subnet], lease.vtep_mac.lower()) for lease in others}
        have_neigh = {(ip, mac.lower()) for ip, mac in n.neighs
                      if ip_interface(ip).version == fam}
        want_fdb = {(lease.vtep_mac.lower(), lease.underlay_ip) for lease in others}
        have_fdb = {(mac.lower(), dst) for mac, dst in n.fdb}
        diff: dict[str, Any] = {}
        for kind, want, have in (("route", want_routes, have_routes),
                                 ("neigh", want_neigh, have_neigh),
                                 ("fdb", want_fdb, have_fdb)):
            if want - have:
                diff[f"{kind} missing"] = sorted(map(str, want - have))
            if have - want:
                diff[f"{kind} stale"] = sorted(map(str, have - want))
        if diff:
            out.append(Violation("peers-programmed", n.name, f"{n.name}'s VXLAN entries do not "
                                 "match the other nodes' leases", diff))
    return out
