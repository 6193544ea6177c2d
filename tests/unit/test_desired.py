from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import given
from hypothesis import strategies as st

from overlay.dataplane.desired import (
    Entries,
    Fdb,
    Neigh,
    Op,
    Route,
    UnderlayView,
    apply_ops,
    desired,
    explain,
    plan,
)
from overlay.model import NodeRecord

CLUSTER = IPv4Network("10.244.0.0/16")


def rec(name, third, ip_last, mac_last):
    return NodeRecord(name, IPv4Network(f"10.244.{third}.0/24"),
                      IPv4Address(f"172.30.1.{ip_last}"), f"02:00:00:00:00:{mac_last:02x}")


N1, N2, N3 = rec("n1", 1, 11, 1), rec("n2", 2, 12, 2), rec("n3", 3, 13, 3)


def entries_for(*recs):
    return Entries(
        frozenset(Route(r.subnet, r.vtep_ip) for r in recs),
        frozenset(Neigh(r.vtep_ip, r.vtep_mac) for r in recs),
        frozenset(Fdb(r.vtep_mac, r.underlay_ip) for r in recs),
    )


def test_desired_excludes_self_and_holds_three_entries_per_peer():
    d = desired([N1, N2, N3], "n1", CLUSTER)
    assert Entries(d.routes, d.neighs, d.fdbs) == entries_for(N2, N3)
    assert d.owner[Route(N2.subnet, N2.vtep_ip)] == "n2"


def test_desired_rejects_foreign_subnet_and_duplicate_mac():
    foreign = NodeRecord("x", IPv4Network("10.9.0.0/24"), IPv4Address("1.1.1.1"),
                         "02:00:00:00:00:09")
    clone = rec("n4", 4, 14, 2)  # same MAC as n2 (a cloned VM)
    d = desired([N2, foreign, clone], "n1", CLUSTER)
    assert Entries(d.routes, d.neighs, d.fdbs) == entries_for(N2)
    assert {name for name, _ in d.rejected} == {"x", "n4"}


def test_plan_from_empty_adds_fdb_then_neigh_then_route():
    ops = plan(desired([N2], "n1"), Entries())
    assert [(o.action, o.kind) for o in ops] == [("add", "fdb"), ("add", "neigh"), ("add", "route")]


def test_plan_is_empty_when_kernel_matches():
    assert plan(desired([N2, N3], "n1"), entries_for(N2, N3)) == []


def test_removed_peer_is_removed_route_first():
    ops = plan(desired([N2], "n1"), entries_for(N2, N3))
    assert [(o.action, o.kind) for o in ops] == [("del", "route"), ("del", "neigh"), ("del", "fdb")]
    assert all(o.entry in entries_for(N3).all() for o in ops)


def test_changed_vtep_mac_replaces_neigh_and_fdb_leaving_nothing_stale():
    moved = rec("n2", 2, 12, 0x42)
    have = entries_for(N2)
    ops = plan(desired([moved], "n1"), have)
    after = apply_ops(have, ops)
    assert after == entries_for(moved)
    # the neighbour is replaced in one op (keyed by IP): no delete of the new entry
    assert Op("del", Neigh(N2.vtep_ip, N2.vtep_mac)) not in ops
    assert Op("del", Fdb(N2.vtep_mac, N2.underlay_ip)) in ops


def test_changed_underlay_ip_moves_the_fdb_entry():
    moved = rec("n2", 2, 99, 2)
    ops = plan(desired([moved], "n1"), entries_for(N2))
    assert ops == [Op("add", Fdb(N2.vtep_mac, IPv4Address("172.30.1.99"))),
                   Op("del", Fdb(N2.vtep_mac, N2.underlay_ip))]


def test_non_permanent_neighbour_is_made_permanent_and_kernel_entries_are_left_alone():
    have = Entries(neighs=frozenset({Neigh(N2.vtep_ip, N2.vtep_mac, permanent=False),
                                     Neigh(IPv4Address("10.244.9.0"), "02:00:00:00:00:99",
                                           permanent=False)}))
    ops = plan(Entries(neighs=frozenset({Neigh(N2.vtep_ip, N2.vtep_mac)})), have)
    assert ops == [Op("add", Neigh(N2.vtep_ip, N2.vtep_mac))]


def test_explain_tells_repair_from_join_and_leave():
    want = desired([N2], "n1")
    programmed = entries_for(N2)
    add_route = Op("add", Route(N2.subnet, N2.vtep_ip))
    assert explain(add_route, want, programmed).startswith("repair")
    assert "member" in explain(add_route, want, Entries())
    gone = Op("del", Route(N3.subnet, N3.vtep_ip))
    assert "no longer a member" in explain(gone, want, entries_for(N3))


# --- IPv6 and dual-stack -----------------------------------------------------------

CLUSTER6 = IPv6Network("fd00:10:244::/56")
DUAL = (CLUSTER, CLUSTER6)


def rec6(name, third, ip_last, mac_last, v4=True, underlay6=False):
    return NodeRecord(name, IPv4Network(f"10.244.{third}.0/24") if v4 else None,
                      IPv6Address(f"fd30::1:{ip_last}") if underlay6
                      else IPv4Address(f"172.30.1.{ip_last}"),
                      f"02:00:00:00:00:{mac_last:02x}",
                      subnet6=IPv6Network(f"fd00:10:244:{third:x}::/64"))


D2, D3 = rec6("n2", 2, 12, 2), rec6("n3", 3, 13, 3)


def test_dual_stack_peer_gets_a_route_and_neighbour_per_family_and_one_fdb():
    d = desired([D2], "n1", DUAL)
    assert sorted(map(str, d.all())) == sorted([
        "route 10.244.2.0/24 via 10.244.2.0 onlink",
        "route fd00:10:244:2::/64 via fd00:10:244:2:: onlink",
        "neigh 10.244.2.0 lladdr 02:00:00:00:00:02",
        "neigh fd00:10:244:2:: lladdr 02:00:00:00:00:02",
        "fdb 02:00:00:00:00:02 dst 172.30.1.12",
    ])
    assert set(d.owner.values()) == {"n2"}


def test_ipv6_only_over_an_ipv6_underlay():
    peer = rec6("n2", 2, 12, 2, v4=False, underlay6=True)
    d = desired([peer], "n1", CLUSTER6, UnderlayView(6, IPv6Network("fd30::/64")))
    assert sorted(map(str, d.all())) == [
        "fdb 02:00:00:00:00:02 dst fd30::1:12",
        "neigh fd00:10:244:2:: lladdr 02:00:00:00:00:02",
        "route fd00:10:244:2::/64 via fd00:10:244:2:: onlink",
    ]


def test_families_the_cluster_lacks_are_not_programmed():
    d = desired([D2], "n1", CLUSTER)  # an IPv4 cluster: the peer's IPv6 subnet is ignored
    assert {e.dst.version for e in d.routes} == {4}
    v6only = rec6("n4", 4, 14, 4, v4=False)
    d = desired([v6only], "n1", CLUSTER)
    assert not d.all() and d.rejected[0][0] == "n4" and "no IPv4 subnet" in d.rejected[0][1]


def test_peer_on_another_underlay_family_is_rejected_not_half_programmed():
    peer = rec6("n2", 2, 12, 2, underlay6=True)
    d = desired([peer, D3], "n1", DUAL, UnderlayView(4, IPv4Network("172.30.0.0/16")))
    assert d.rejected == (("n2", "its underlay address fd30::1:12 is IPv6, this node's VXLAN "
                                 "device sends over IPv4"),)
    assert {d.owner[e] for e in d.all()} == {"n3"}


def test_ipv6_subnet_outside_the_cluster_rejects_the_record():
    bad = NodeRecord("x", IPv4Network("10.244.9.0/24"), IPv4Address("172.30.1.9"),
                     "02:00:00:00:00:09", subnet6=IPv6Network("fd99::/64"))
    d = desired([bad], "n1", DUAL)
    assert not d.all() and "fd99::/64 is outside" in d.rejected[0][1]


def test_mixed_family_entries_sort_and_plan():
    have = Entries()
    ops = plan(desired([D2, D3, N2.with_(node="n4", subnet=IPv4Network("10.244.4.0/24"),
                                         vtep_mac="02:00:00:00:00:04")], "n1", DUAL), have)
    kinds = [(o.action, o.kind) for o in ops]
    assert kinds == sorted(kinds, key=lambda k: ["fdb", "neigh", "route"].index(k[1]))
    assert apply_ops(have, ops) == Entries(*(frozenset(x) for x in (
        {o.entry for o in ops if o.kind == "route"}, {o.entry for o in ops if o.kind == "neigh"},
        {o.entry for o in ops if o.kind == "fdb"})))


# --- DirectRouting -------------------------------------------------------------------

SEG1 = UnderlayView(4, IPv4Network("172.30.0.0/16"), direct_routing=True)


def test_direct_routing_routes_same_segment_peers_without_encapsulation():
    far = rec6("n3", 3, 13, 3).with_(underlay_ip=IPv4Address("172.31.1.13"))
    d = desired([D2, far], "n1", DUAL, SEG1)
    assert Route(D2.subnet, D2.underlay_ip, direct=True) in d.routes
    assert d.direct == {"n2"}
    # IPv6 pods of a same-segment peer still ride VXLAN over the IPv4 underlay
    assert Route(D2.subnet6, D2.subnet6.network_address) in d.routes
    assert Fdb(D2.vtep_mac, D2.underlay_ip) in d.fdbs
    # the far peer keeps VXLAN for both families
    assert Route(far.subnet, far.subnet.network_address) in d.routes
    assert Fdb(far.vtep_mac, far.underlay_ip) in d.fdbs


def test_direct_routing_ipv4_only_peer_needs_no_vxlan_entries():
    d = desired([N2], "n1", CLUSTER, SEG1)
    assert d.all() == [Route(N2.subnet, N2.underlay_ip, direct=True)]
    off = desired([N2], "n1", CLUSTER, UnderlayView(4, IPv4Network("172.30.0.0/16")))
    assert len(off.all()) == 3 and not off.direct


def test_peer_moving_between_segments_switches_its_route_in_one_replace():
    here = desired([N2], "n1", CLUSTER, SEG1)
    moved = N2.with_(underlay_ip=IPv4Address("172.31.1.12"))
    there = desired([moved], "n1", CLUSTER, SEG1)
    ops = plan(there, here)
    # VXLAN state first, then the route is replaced (never deleted: no gap for pods)
    assert [(o.action, o.kind) for o in ops] == [("add", "fdb"), ("add", "neigh"),
                                                ("add", "route")]
    assert apply_ops(here, ops) == Entries(there.routes, there.neighs, there.fdbs)
    assert "left this node's underlay subnet" in explain(ops[2], there, here)
    back = plan(here, Entries(there.routes, there.neighs, there.fdbs))
    assert [(o.action, o.kind) for o in back] == [("add", "route"), ("del", "neigh"),
                                                 ("del", "fdb")]
    assert "now on this node's underlay subnet" in explain(back[0], here, there)
    assert "routed directly now" in explain(back[1], here, there)


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 250), st.booleans(),
                          st.booleans()), max_size=12),
       st.lists(st.tuples(st.integers(1, 40), st.integers(1, 250), st.booleans(),
                          st.booleans()), max_size=12),
       st.booleans())
def test_plan_always_reaches_the_desired_state(a, b, direct_on):
    def recs(spec):
        out = {}
        for third, last, v4, far in spec:
            r = NodeRecord(f"p{third}", IPv4Network(f"10.244.{third}.0/24") if v4 else None,
                           IPv4Address(f"172.{31 if far else 30}.1.{last}"),
                           f"02:00:00:00:01:{third:02x}",
                           subnet6=IPv6Network(f"fd00:10:244:{third:x}::/64"))
            out[r.node] = r
        return list(out.values())

    view = UnderlayView(4, IPv4Network("172.30.0.0/16"), direct_routing=direct_on)
    before = desired(recs(a), "n1", DUAL, view)
    after = desired(recs(b), "n1", DUAL, view)
    have = Entries(before.routes, before.neighs, before.fdbs)
    got = apply_ops(have, plan(after, have))
    assert got == Entries(after.routes, after.neighs, after.fdbs)
    assert plan(after, got) == []
