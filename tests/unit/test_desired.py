from ipaddress import IPv4Address, IPv4Network

from overlay.dataplane.desired import (
    Entries,
    Fdb,
    Neigh,
    Op,
    Route,
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
