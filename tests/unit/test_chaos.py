"""The chaos schedule, the invariants and the reports: pure, no root needed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from overlay.ctl.lab_cmd import bit_rate
from overlay.ctl.render import watch_frame
from overlay.devnames import host_veth_name
from overlay.sandbox.chaos import (
    ETCD_KINDS,
    KINDS,
    NODE_KINDS,
    Topology,
    applicable,
    heal_summary,
    markdown,
    plan,
)
from overlay.sandbox.invariants import (
    INVARIANTS,
    Lease,
    NodeView,
    Observation,
    PodView,
    violations,
)
from overlay.sandbox.nemesis import lease_ttl

TOPO = Topology(("n1", "n2", "n3"), ("etcd1", "etcd2", "etcd3"), lease_ttl=6)


# --- the schedule --------------------------------------------------------------------


def test_the_same_seed_gives_the_same_rounds_and_another_seed_others():
    assert plan(16, TOPO, 2, 50) == plan(16, TOPO, 2, 50)
    assert plan(16, TOPO, 2, 50) != plan(17, TOPO, 2, 50)
    # A longer run starts with the rounds of a shorter one: reproducible whatever fits.
    assert plan(16, TOPO, 2, 80)[:50] == plan(16, TOPO, 2, 50)


@pytest.mark.parametrize("overlap", [1, 2, 3, 5])
def test_a_round_has_at_most_overlap_faults_each_on_a_target_of_its_own(overlap):
    for seed in range(20):
        for faults in plan(seed, TOPO, overlap, 40):
            assert 1 <= len(faults) <= overlap
            nodes = [f.target for f in faults if f.kind in NODE_KINDS]
            assert len(nodes) == len(set(nodes)), faults
            assert sum(f.kind in ETCD_KINDS for f in faults) <= 1
            assert sum(f.kind == "loss" for f in faults) <= 1
            assert faults[0].start == 0 and all(0 <= f.start <= 2 for f in faults)


def test_every_kind_comes_up_within_one_deck_and_partitions_outlast_the_lease_ttl():
    rounds = plan(3, TOPO, 1, len(KINDS))
    assert sorted(f.kind for r in rounds for f in r) == sorted(KINDS)
    for r in plan(3, TOPO, 3, 200):
        for f in r:
            if f.kind == "partition":
                assert f.seconds > TOPO.lease_ttl + 1
            if f.kind == "etcd-quorum":
                assert len(f.target.split(",")) == 2  # a majority of 3
            if f.kind in ("kernel-entries", "device-delete"):
                assert f.seconds == 0  # one-off changes the agent must repair
            else:
                assert f.seconds > 0


def test_the_kinds_fit_the_topology():
    one = Topology(("n1",), ("etcd1",))
    kinds = applicable(one)
    assert "etcd-member" not in kinds and "partition" not in kinds and "etcd-quorum" in kinds
    quorum = [f for r in plan(1, one, 1, 40) for f in r if f.kind == "etcd-quorum"]
    assert quorum and all(f.target == "etcd1" for f in quorum)
    assert not any(f.kind in NODE_KINDS for r in plan(1, Topology((), ("etcd1",)), 2, 20)
                   for f in r)
    with pytest.raises(ValueError):
        plan(1, TOPO, 0)


def test_spared_processes_are_never_killed_stopped_or_rebooted_but_get_the_rest():
    topo = Topology(TOPO.nodes, TOPO.etcd, 6, spared=("n1", "etcd1"))
    faults = [f for r in plan(9, topo, 3, 300) for f in r]
    on_n1 = {f.kind for f in faults if f.target == "n1"}
    assert on_n1 and not on_n1 & {"agent-kill", "agent-term", "agent-stop", "node-reboot"}
    assert {"partition", "pod-churn"} <= on_n1
    etcd = [f.target for f in faults if f.kind in ETCD_KINDS]
    assert etcd and all("etcd1" not in t.split(",") for t in etcd)
    assert "etcd2,etcd3" in etcd  # quorum is still lost, with the other two
    alone = Topology(("n1",), ("etcd1",), spared=("n1", "etcd1"))
    assert set(applicable(alone)) == {"pod-churn", "kernel-entries", "device-delete",
                                      "bandwidth", "loss"}


def test_the_lease_ttl_comes_from_the_agents_arguments():
    assert lease_ttl([]) == 60
    assert lease_ttl(["--lease-ttl", "6"]) == 6
    assert lease_ttl(["--foo", "--lease-ttl=9"]) == 9


def test_heal_summary():
    assert heal_summary([]) == {"n": 0}
    s = heal_summary([0.5, 3.0, 1.0, 2.0])
    assert s["n"] == 4 and s["median_s"] == 1.5 and s["max_s"] == 3.0 and s["p90_s"] == 3.0


# --- the invariants ------------------------------------------------------------------


def lease(node, third, mac="02:00:00:00:00:0", lease_id=7):
    return Lease(f"/overlay/subnets/10.244.{third}.0-24", node, f"10.244.{third}.0/24",
                 f"172.30.1.{10 + third}", f"{mac}{third}", lease_id)


def pod(name, node, third, host):
    return PodView(name, node, f"sandbox-{name}", "eth0", (f"10.244.{third}.{host}",),
                   (f"10.244.{third}.{host}/24",))


def node(name, third, others):
    pods = [(f"sandbox-{name}-p1", f"10.244.{third}.2")]
    return NodeView(
        name, "running", bridge_addrs=(f"10.244.{third}.1/24",),
        vxlan_addrs=(f"10.244.{third}.0/32",),
        veths=tuple((host_veth_name(cid, "eth0"), "cni0") for cid, _ in pods),
        allocations=tuple((ip, cid) for cid, ip in pods),
        routes=tuple(f"10.244.{o}.0/24" for o in others),
        neighs=tuple((f"10.244.{o}.0", f"02:00:00:00:00:0{o}") for o in others),
        fdb=tuple((f"02:00:00:00:00:0{o}", f"172.30.1.{10 + o}") for o in others))


def whole() -> Observation:
    return Observation(
        leases=(lease("n1", 1), lease("n2", 2)),
        nodes=(node("n1", 1, [2]), node("n2", 2, [1])),
        pods=(pod("n1-p1", "n1", 1, 2), pod("n2-p1", "n2", 2, 2)),
        unreachable=(), probed=2)


def broken(obs: Observation) -> set[tuple[str, str]]:
    return {(v.invariant, v.subject) for v in violations(obs)}


def test_a_whole_cluster_has_no_violation():
    assert violations(whole()) == []


def test_leases_one_per_node_none_foreign_none_overlapping():
    o = whole()
    # n2 without a lease: and n1 still has entries for a subnet nobody holds.
    assert broken(replace(o, leases=(lease("n1", 1),))) == {("one-lease-per-node", "n2"),
                                                            ("peers-programmed", "n1")}
    two = replace(o, leases=(*o.leases, lease("n2", 3)))
    assert ("one-lease-per-node", "n2") in broken(two)
    ghost = replace(o, leases=(*o.leases, lease("n9", 9)))
    assert ("one-lease-per-node", "n9") in broken(ghost)
    wide = Lease("/overlay/subnets/10.244.0.0-16", "n9", "10.244.0.0/16")
    assert any(v.invariant == "no-subnet-twice" and "overlap" in v.message
               for v in violations(replace(o, leases=(*o.leases, wide))))
    bad = Lease("/overlay/subnets/x", "", "", error="ValueError: b'garbage'")
    assert ("one-lease-per-node", "/overlay/subnets/x") in broken(
        replace(o, leases=(*o.leases, bad)))


def test_a_bridge_on_someone_elses_subnet_is_caught():
    o = whole()
    n2 = replace(o.nodes[1], bridge_addrs=("10.244.1.1/24",))
    got = violations(replace(o, nodes=(o.nodes[0], n2)))
    msgs = [v.message for v in got if v.invariant == "no-subnet-twice"]
    assert any("lease is 10.244.2.0/24" in m for m in msgs)
    assert any("bridge of 2 nodes" in m for m in msgs)


def test_pod_addresses_distinct_recorded_and_inside_the_node_subnet():
    o = whole()
    outside = replace(o.pods[1], recorded=("10.244.1.9",), addrs=("10.244.1.9/24",))
    got = violations(replace(o, pods=(o.pods[0], outside)))
    assert any("outside 10.244.2.0/24" in v.message for v in got)
    twin = replace(o.pods[1], recorded=("10.244.1.2",), addrs=("10.244.1.2/24",))
    assert any("address of 2 pods" in v.message for v in violations(
        replace(o, pods=(o.pods[0], twin))))
    lost = replace(o.pods[0], addrs=())
    assert ("pod-addresses", "n1-p1") in broken(replace(o, pods=(lost, o.pods[1])))
    gone = replace(o.pods[0], error="Cannot find device")
    assert ("pod-addresses", "n1-p1") in broken(replace(o, pods=(gone, o.pods[1])))


def test_leaked_veths_allocations_and_addresses_are_caught_with_evidence():
    o = whole()
    n1 = o.nodes[0]
    extra_veth = replace(n1, veths=(*n1.veths, ("veth0123456789a", "cni0")))
    v = next(v for v in violations(replace(o, nodes=(extra_veth, o.nodes[1])))
             if v.invariant == "no-leaks")
    assert v.evidence["leaked"] == ["veth0123456789a"]
    loose = replace(n1, veths=((n1.veths[0][0], ""),))
    v = next(v for v in violations(replace(o, nodes=(loose, o.nodes[1])))
             if v.invariant == "no-leaks")
    assert v.evidence["not on the bridge"] == [n1.veths[0][0]]
    alloc = replace(n1, allocations=(*n1.allocations, ("10.244.1.7", "gone")))
    v = next(v for v in violations(replace(o, nodes=(alloc, o.nodes[1])))
             if v.invariant == "no-leaks")
    assert v.evidence["leaked"] == ["10.244.1.7 (gone)"]
    addr = replace(n1, bridge_addrs=(*n1.bridge_addrs, "10.244.1.50/24"))
    assert ("no-leaks", "n1") in broken(replace(o, nodes=(addr, o.nodes[1])))
    vx = replace(n1, vxlan_addrs=())
    assert ("no-leaks", "n1") in broken(replace(o, nodes=(vx, o.nodes[1])))


def test_missing_and_stale_entries_are_named():
    o = whole()
    n1 = replace(o.nodes[0], routes=(), fdb=(*o.nodes[0].fdb, ("02:00:00:00:00:09",
                                                                "172.30.1.19")))
    v = next(v for v in violations(replace(o, nodes=(n1, o.nodes[1]))))
    assert v.invariant == "peers-programmed" and v.subject == "n1"
    assert v.evidence == {"route missing": ["10.244.2.0/24"],
                          "fdb stale": ["('02:00:00:00:00:09', '172.30.1.19')"]}


def test_processes_etcd_and_reachability():
    o = whole()
    stopped = replace(o.nodes[1], agent="stopped")
    assert broken(replace(o, nodes=(o.nodes[0], stopped))) == {("agents", "n2")}
    down = violations(replace(o, etcd_error="context deadline exceeded"))
    assert [v.invariant for v in down] == ["etcd"]  # nothing judged on leases it cannot read
    cut = violations(replace(o, unreachable=(("n1-p1", "n2-p1", "10.244.2.2"),)))
    assert cut[0].invariant == "reachability"
    assert cut[0].evidence == {"unreachable": ["n1-p1 -> n2-p1 (10.244.2.2)"]}
    assert set(INVARIANTS) >= {v.invariant for v in violations(replace(
        o, unreachable=(("a", "b", "c"),), etcd_error="x"))}


# --- the reports ---------------------------------------------------------------------


def test_the_markdown_report_lists_faults_heal_times_and_violations_with_evidence():
    doc = {
        "sandbox": "demo", "seed": 5, "seconds": 60, "overlap": 2, "heal_bound_s": 60,
        "lease_ttl_s": 6, "duration_s": 64.2, "result": "fail", "interrupted": False,
        "stopped": "round 2 did not heal within 60s",
        "topology": {"nodes": ["n1", "n2"], "etcd": ["etcd1"], "pods": 4},
        "rounds": [{"index": 1}, {"index": 2}],
        "faults": [{"round": 1, "what": "partition n2 for 8.0s", "injected_at": 0.5,
                    "undone_at": 8.5, "healed_at": 9.7, "heal_s": 1.2, "note": ""},
                   {"round": 2, "what": "agent-kill n1 for 2.0s", "injected_at": 10,
                    "undone_at": 12, "healed_at": None, "heal_s": None, "note": "pid 42"}],
        "violations": [{"round": 2, "invariant": "reachability", "subject": "pods",
                        "message": "1 of 12 pod pairs do not reach each other",
                        "evidence": {"unreachable": ["n1-p1 -> n2-p1 (10.244.2.2)"]}}],
        "heal": heal_summary([1.2]), "invariants": INVARIANTS,
    }
    md = markdown(doc)
    assert md.startswith("# Chaos run on sandbox demo: FAIL")
    assert "| 1 | partition n2 for 8.0s | 0.5 | 8.5 | 9.7 | 1.20 s |" in md
    assert "agent-kill n1 for 2.0s (pid 42)" in md
    assert "**reachability** (pods)" in md and "n1-p1 -> n2-p1 (10.244.2.2)" in md
    assert "Stopped early: round 2 did not heal" in md


def test_the_watch_frame_shows_each_nodes_view_of_each_peer():
    doc = {"name": "demo", "time": 0, "etcd": {"running": 2, "members": 3, "down": ["etcd3"]},
           "faults": {"lossPercent": 20, "partitioned": ["n2"], "bandwidth": {"n1": "1mbit"},
                      "poweredOff": []},
           "nodes": [
               {"name": "n1", "process": "running", "ready": True, "subnet": "10.244.1.0/24",
                "error": None, "peers": {"n2": {"state": "suspect", "programmed": False}}},
               {"name": "n2", "process": "stopped", "ready": False, "subnet": None,
                "error": None, "peers": {}},
               {"name": "n3", "process": "running", "ready": True, "subnet": "10.244.3.0/24",
                "error": None, "peers": {"n1": {"state": "alive", "programmed": True},
                                         "n2": {"state": "dead", "programmed": True}}}]}
    lines = watch_frame(doc).splitlines()
    assert "etcd 2/3 up (down: etcd3)" in lines[0]
    assert "partition n2; 20% loss; 1mbit on n1" in lines[0]
    assert lines[1].split() == ["NODE", "AGENT", "READY", "SUBNET", "n1", "n2", "n3"]
    assert lines[2].split() == ["n1", "running", "yes", "10.244.1.0/24", "-", "suspect*",
                                "absent"]
    assert lines[3].split() == ["n2", "stopped", "-", "-", "?", "-", "?"]
    assert lines[4].split() == ["n3", "running", "yes", "10.244.3.0/24", "alive", "dead", "-"]


def test_iperf_rates_are_read_in_the_unit_that_fits():
    # A capped or lossy link (sandbox fault loss/bandwidth) must not read "0.00 Gbit/s".
    assert bit_rate(11.27e9) == "11.3 Gbit/s" and bit_rate(2.345e9) == "2.35 Gbit/s"
    assert bit_rate(812.4e6) == "812 Mbit/s" and bit_rate(3.1e6) == "3.1 Mbit/s"
    assert bit_rate(96_400) == "96.4 kbit/s" and bit_rate(12) == "12 bit/s"


def test_a_dual_stack_record_is_one_lease_per_family_read_from_its_keys():
    from overlay.sandbox.observe import key_subnet

    rec = {"node": "n1", "subnet": "10.244.7.0/24", "ipv6Subnet": "fd00:0:0:7::/64"}
    assert key_subnet("/overlay/subnets/10.244.7.0-24", rec) == "10.244.7.0/24"
    assert key_subnet("/overlay/subnets/fd00:0:0:7::-64", rec) == "fd00:0:0:7::/64"
    v6only = {"node": "n2", "ipv6Subnet": "fd00:0:0:9::/64"}
    assert key_subnet("/overlay/subnets/fd00:0:0:9::-64", v6only) == "fd00:0:0:9::/64"
    with pytest.raises(ValueError, match=r"the value names 10\.244\.7\.0/24, fd00:0:0:7::/64"):
        key_subnet("/overlay/subnets/10.244.8.0-24", rec)  # a record under another's key
    with pytest.raises(ValueError):
        key_subnet("/overlay/subnets/garbage", rec)
