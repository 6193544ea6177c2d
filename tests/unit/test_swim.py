"""The SWIM core with a fake clock: probing order, suspicion, refutation, merge rules,
dissemination and the member table's life cycle."""

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from overlay.errors import ConfigError
from overlay.membership.swim import Member, Record, State, Swim, SwimConfig, Update
from overlay.model import NodeRecord

CFG = SwimConfig()
LONE = CFG.suspect_timeout_max  # a suspicion nobody confirms


def rec(i, mac_last=None, rev=1):
    mac_last = i if mac_last is None else mac_last
    node = NodeRecord(f"n{i}", IPv4Network(f"10.244.{i}.0/24"), IPv4Address(f"172.30.1.{10 + i}"),
                      f"02:00:00:00:00:{mac_last:02x}", f"172.30.1.{10 + i}:7946")
    return Record(node, rev)


def swim(n_peers=0, cfg=CFG, seed=1):
    s = Swim(rec(1), 100, cfg, random.Random(seed))
    for i in range(2, 2 + n_peers):
        s.merge([Update(rec(i), State.ALIVE, 10, f"n{i}")], 0.0)
    drain(s)  # the join news
    return s


def drain(s):
    """Every distinct queued update, in the order first sent."""
    out = []
    while s.pending():
        out += s.piggyback(limit=1000)
    return list(dict.fromkeys(out))


def test_round_robin_probes_every_member_once_per_round():
    s = swim(9)
    for _ in range(3):
        seen = [s.next_probe().name for _ in range(9)]
        assert sorted(seen) == sorted(f"n{i}" for i in range(2, 11))


def test_a_new_member_is_probed_within_the_current_round():
    s = swim(5)
    first = [s.next_probe().name for _ in range(2)]
    s.merge([Update(rec(20), State.ALIVE, 5, "n20")], 1.0)
    rest = [s.next_probe().name for _ in range(4)]
    assert sorted(first + rest) == sorted([f"n{i}" for i in range(2, 7)] + ["n20"])


def test_left_members_and_members_without_address_are_not_probed():
    s = swim(3)
    s.merge([Update(rec(2), State.LEFT, 11, "n2")], 1.0)
    s.sync_etcd({"n9": Record(rec(9).node.with_(grpc_addr=""), 5)}, 1.0)
    names = {s.next_probe().name for _ in range(10)}
    assert names == {"n3", "n4"}


def test_no_member_no_target():
    assert swim(0).next_probe() is None
    assert swim(0).push_pull_target() is None


def test_failed_probe_suspects_then_dead_after_the_timeout():
    s = swim(3)
    ch = s.probe_failed("n2", 10.0)
    assert [(c.name, c.old, c.new) for c in ch] == [("n2", State.ALIVE, State.SUSPECT)]
    assert s.tick(10.0 + LONE - 0.01) == []
    ch = s.tick(10.0 + LONE)
    assert [(c.name, c.old, c.new) for c in ch] == [("n2", State.SUSPECT, State.DEAD)]
    assert s.members["n2"].since == 10.0 + LONE
    # the suspicion and the death are both queued for dissemination
    assert [(u.name, u.state) for u in drain(s)] == [("n2", State.DEAD)]


def test_refutation_with_a_higher_incarnation_clears_the_suspicion():
    s = swim(3)
    s.probe_failed("n2", 10.0)
    ch = s.merge([Update(rec(2), State.ALIVE, 11, "n2")], 10.5)
    assert [(c.old, c.new) for c in ch] == [(State.SUSPECT, State.ALIVE)]
    assert s.tick(20.0) == []
    assert s.members["n2"].state == State.ALIVE


def test_alive_at_the_same_incarnation_does_not_refute():
    s = swim(3)
    s.probe_failed("n2", 10.0)
    assert s.merge([Update(rec(2), State.ALIVE, 10, "n3")], 10.1) == []
    assert s.tick(10.0 + LONE)[0].new == State.DEAD


def test_probe_failure_of_a_member_not_alive_changes_nothing():
    s = swim(3)
    s.probe_failed("n2", 1.0)
    assert s.probe_failed("n2", 1.1) == []
    assert s.probe_failed("nobody", 1.1) == []


@pytest.mark.parametrize("local,incoming,accepted", [
    ((State.ALIVE, 5), (State.ALIVE, 6), True),
    ((State.ALIVE, 5), (State.ALIVE, 5), False),
    ((State.ALIVE, 5), (State.SUSPECT, 5), True),
    ((State.ALIVE, 5), (State.SUSPECT, 4), False),
    ((State.SUSPECT, 5), (State.ALIVE, 5), False),
    ((State.SUSPECT, 5), (State.ALIVE, 6), True),
    ((State.SUSPECT, 5), (State.DEAD, 5), True),
    ((State.DEAD, 5), (State.SUSPECT, 5), False),
    ((State.DEAD, 5), (State.ALIVE, 5), False),
    ((State.DEAD, 5), (State.ALIVE, 6), True),
    ((State.DEAD, 5), (State.LEFT, 5), True),
    ((State.LEFT, 5), (State.DEAD, 5), False),
    ((State.LEFT, 5), (State.ALIVE, 5), False),   # LEFT is final for an incarnation
    ((State.LEFT, 5), (State.SUSPECT, 6), True),  # ... a new life can be suspected
    ((State.LEFT, 5), (State.ALIVE, 6), True),    # ... or rejoin
    ((State.ALIVE, 5), (State.LEFT, 4), False),
])
def test_merge_precedence(local, incoming, accepted):
    s = swim(0)
    s.merge([Update(rec(2), local[0], local[1], "x")], 0.0)
    ch = s.merge([Update(rec(2), incoming[0], incoming[1], "y")], 1.0)
    assert bool(ch) == accepted
    m = s.members["n2"]
    assert (m.state, m.incarnation) == (incoming if accepted else local)


def test_a_newer_incarnation_brings_its_record():
    s = swim(1)
    ch = s.merge([Update(rec(2, mac_last=0x42), State.ALIVE, 11, "n2")], 1.0)
    assert ch[0].record_changed
    assert s.members["n2"].record.node.vtep_mac == "02:00:00:00:00:42"


def test_unknown_member_learned_from_gossip_is_added_and_scheduled():
    s = swim(0)
    ch = s.merge([Update(rec(5), State.SUSPECT, 3, "n7")], 2.0)
    assert [(c.name, c.old, c.new) for c in ch] == [("n5", None, State.SUSPECT)]
    # we and n5 are all we know: no other member can confirm, so the short timeout
    assert s.members["n5"].suspect_deadline == 2.0 + CFG.suspect_timeout
    assert s.next_probe().name == "n5"


def test_being_suspected_is_refuted_with_a_higher_incarnation():
    s = swim(1)
    s.merge([Update(rec(1), State.SUSPECT, 100, "n2")], 1.0)
    assert s.incarnation == 101 and s.refutations == 1
    news = drain(s)
    assert [(u.name, u.state, u.incarnation) for u in news] == [("n1", State.ALIVE, 101)]


def test_being_declared_dead_or_left_is_refuted_too():
    for state in (State.DEAD, State.LEFT):
        s = swim(1)
        s.merge([Update(rec(1), state, 100, "n2")], 1.0)
        assert s.incarnation == 101


def test_stale_news_about_me_is_ignored():
    s = swim(1)
    s.merge([Update(rec(1), State.SUSPECT, 99, "n2"), Update(rec(1), State.ALIVE, 100, "n2")],
            1.0)
    assert s.incarnation == 100 and not s.pending()


def test_a_higher_incarnation_of_a_previous_life_is_overtaken():
    s = swim(1)
    s.merge([Update(rec(1), State.ALIVE, 500, "n2")], 1.0)
    assert s.incarnation == 501


def test_a_leaving_node_does_not_refute():
    s = swim(1)
    u = s.leave()
    assert (u.state, u.incarnation) == (State.LEFT, 101)
    s.merge([Update(rec(1), State.DEAD, 101, "n2")], 1.0)
    assert s.incarnation == 101
    assert s.self_update().state == State.LEFT


def test_set_self_announces_a_new_record_at_a_new_incarnation():
    s = swim(1)
    assert not s.set_self(rec(1))
    assert s.set_self(rec(1, mac_last=0x77, rev=9))
    assert s.incarnation == 101
    (u,) = drain(s)
    assert u.record.lease_revision == 9 and u.incarnation == 101


def test_piggyback_retransmits_each_update_a_bounded_number_of_times():
    s = swim(9)
    s.probe_failed("n2", 1.0)
    limit = CFG.retransmit_limit(s.cluster_size())
    sent = 0
    while s.pending():
        sent += len(s.piggyback())
    assert sent == limit


def test_piggyback_prefers_news_about_the_receiver_then_least_sent():
    s = swim(5)
    s.probe_failed("n2", 1.0)
    s.piggyback()  # n2's suspicion sent once
    s.probe_failed("n3", 1.0)
    assert [u.name for u in s.piggyback(limit=1)] == ["n3"]
    assert [u.name for u in s.piggyback(about="n2", limit=1)] == ["n2"]


def test_newer_news_about_a_member_replaces_older_news_in_the_queue():
    s = swim(3)
    s.probe_failed("n2", 1.0)
    s.merge([Update(rec(2), State.ALIVE, 11, "n2")], 1.1)
    assert [(u.name, u.state) for u in drain(s)] == [("n2", State.ALIVE)]


def test_full_state_has_me_and_members_heard_from():
    s = swim(2)
    s.sync_etcd({"n7": rec(7, rev=3)}, 1.0)
    names = [u.name for u in s.full_state()]
    assert names == ["n1", "n2", "n3"]  # n7 is known from etcd only: nothing to tell


def test_sync_etcd_seeds_members_never_heard_from():
    s = swim(0)
    ch = s.sync_etcd({"n2": rec(2, rev=4), "n1": rec(1)}, 1.0)
    assert [(c.name, c.new) for c in ch] == [("n2", State.ALIVE)]
    m = s.members["n2"]
    assert not m.heard and m.incarnation == 0 and m.etcd == rec(2, rev=4)
    assert m.addr == "172.30.1.12:7946"
    # the node itself then tells its real incarnation
    s.merge([Update(rec(2, rev=4), State.ALIVE, 7, "n2")], 2.0)
    assert s.members["n2"].heard


def test_address_follows_the_newer_of_etcd_and_the_node():
    s = swim(0)
    moved = Record(rec(2).node.with_(grpc_addr="172.30.9.9:7946"), 8)
    s.merge([Update(rec(2, rev=5), State.ALIVE, 7, "n2")], 0.0)
    s.sync_etcd({"n2": moved}, 1.0)
    assert s.members["n2"].addr == "172.30.9.9:7946"
    s.merge([Update(Record(rec(2).node, 8), State.ALIVE, 8, "n2")], 2.0)
    assert s.members["n2"].addr == "172.30.1.12:7946"  # same revision: the node's own word


def test_lease_gone_forgets_never_heard_and_dead_members_at_once():
    s = swim(0)
    s.sync_etcd({"n2": rec(2), "n3": rec(3), "n4": rec(4)}, 0.0)
    s.merge([Update(rec(3), State.DEAD, 5, "x"), Update(rec(4), State.ALIVE, 5, "n4")], 0.0)
    ch = s.sync_etcd({}, 1.0)
    assert sorted((c.name, c.new) for c in ch) == [("n2", None), ("n3", None), ("n4", State.ALIVE)]
    assert set(s.members) == {"n4"}  # alive and heard from: kept, known by gossip only


def test_left_members_without_lease_are_forgotten_after_reap_time():
    s = swim(1)
    s.sync_etcd({"n2": rec(2)}, 0.0)
    s.merge([Update(rec(2), State.LEFT, 11, "n2")], 1.0)
    s.sync_etcd({}, 1.5)
    assert s.members["n2"].state == State.LEFT
    assert s.tick(1.0 + CFG.reap_after - 0.1) == []
    ch = s.tick(1.0 + CFG.reap_after)
    assert [(c.name, c.new) for c in ch] == [("n2", None)]


def test_tombstone_keeps_stale_news_from_resurrecting_a_forgotten_member():
    s = swim(0)
    s.sync_etcd({"n2": rec(2)}, 0.0)
    s.merge([Update(rec(2), State.DEAD, 5, "x")], 0.0)
    s.sync_etcd({}, 1.0)
    assert s.merge([Update(rec(2), State.ALIVE, 5, "y")], 2.0) == []
    assert "n2" not in s.members
    # a new life (higher incarnation) is welcome
    assert s.merge([Update(rec(2), State.ALIVE, 6, "n2")], 3.0)
    # and after the reap time any news is
    s2 = swim(0)
    s2.sync_etcd({"n2": rec(2)}, 0.0)
    s2.merge([Update(rec(2), State.DEAD, 5, "x")], 0.0)
    s2.sync_etcd({}, 1.0)
    s2.tick(1.0 + CFG.reap_after)
    assert s2.merge([Update(rec(2), State.DEAD, 5, "y")], 1.0 + CFG.reap_after)


def test_helpers_and_gossip_and_push_pull_targets():
    s = swim(5)
    s.probe_failed("n3", 0.0)
    s.tick(LONE)                          # n3 dead
    s.probe_failed("n4", 0.0)             # n4 suspect
    s.merge([Update(rec(5), State.LEFT, 11, "n5")], 0.0)
    for _ in range(20):
        hs = {m.name for m in s.helpers("n2")}
        assert hs <= {"n6"} and len(hs) == 1
        assert {m.name for m in s.gossip_targets()} <= {"n2", "n4", "n6"}
        assert s.push_pull_target().name in {"n2", "n3", "n4", "n6"}


def test_suspicion_timeout_shrinks_with_confirmations_and_grows_with_the_cluster():
    t = [CFG.suspicion_timeout(10, c) for c in range(CFG.confirmations + 2)]
    assert t[0] == CFG.suspect_timeout_max
    assert t[0] > t[1] > t[2] > t[3] == t[4] == CFG.suspect_timeout
    assert CFG.suspicion_timeout(3, 0) == CFG.suspect_timeout_max
    # Small clusters: only n - 2 members can confirm, and none in a cluster of two.
    assert CFG.suspicion_timeout(3, 1) == CFG.suspect_timeout
    assert CFG.suspect_timeout < CFG.suspicion_timeout(4, 1) < CFG.suspect_timeout_max
    assert CFG.suspicion_timeout(2, 0) == CFG.suspect_timeout
    # Unconfirmed: log10(N), as memberlist; confirmed by three: half as fast.
    assert CFG.suspicion_timeout(100, 0) == pytest.approx(2 * CFG.suspect_timeout_max)
    assert CFG.suspicion_timeout(100, 9) == pytest.approx(CFG.suspect_timeout)
    assert CFG.suspicion_timeout(10_000, 9) == pytest.approx(2 * CFG.suspect_timeout)
    fixed = SwimConfig(confirmations=0)
    assert fixed.suspicion_timeout(10, 0) == fixed.suspect_timeout


def test_independent_confirmations_bring_the_deadline_closer():
    s = swim(6)
    s.probe_failed("n2", 10.0)                              # we suspect n2: alone
    assert s.members["n2"].suspect_deadline == 10.0 + LONE
    drain(s)
    same = Update(rec(2), State.SUSPECT, 10, "n1")
    assert s.merge([same], 10.1) == []                      # our own again: nothing
    ch = s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 10.2)
    assert [(c.old, c.new, c.reporter) for c in ch] == [(State.SUSPECT, State.SUSPECT, "n3")]
    assert s.members["n2"].suspect_deadline == pytest.approx(
        10.0 + CFG.suspicion_timeout(s.cluster_size(), 1))
    assert [u.reporter for u in drain(s)] == ["n3"]         # passed on
    s.merge([Update(rec(2), State.SUSPECT, 10, r) for r in ("n4", "n5")], 10.3)
    assert s.members["n2"].suspect_deadline == 10.0 + CFG.suspect_timeout
    assert s.tick(10.0 + CFG.suspect_timeout)[0].new == State.DEAD


def test_our_own_failed_probe_of_a_suspect_confirms_it():
    s = swim(4)
    s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 5.0)   # heard from n3
    ch = s.probe_failed("n2", 5.3)                             # and we cannot reach it
    assert ch and ch[0].reporter == "n1"
    assert s.members["n2"].suspecters == {"n3", "n1"}
    assert s.members["n2"].suspect_deadline < 5.0 + LONE


def test_a_stale_suspicion_of_an_older_incarnation_does_not_confirm():
    s = swim(3)
    s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 1.0)
    s.merge([Update(rec(2), State.ALIVE, 11, "n2")], 1.1)     # refuted
    assert s.merge([Update(rec(2), State.SUSPECT, 10, "n4")], 1.2) == []
    assert s.members["n2"].state == State.ALIVE and not s.members["n2"].suspecters


def test_about_suspect_probers_members_make_a_new_suspect_their_next_target():
    for n_peers, expect in ((3, 1.0), (60, CFG.suspect_probers / 59)):
        first = 0
        for seed in range(1500):
            s = swim(n_peers, seed=seed)
            s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 1.0)
            first += s.next_probe().name == "n2"
        # (a suspect is also the round-robin's first pick one time in n_peers)
        assert first / 1500 == pytest.approx(expect + (1 - expect) / n_peers, abs=0.03)


def test_retransmits_grow_with_the_cluster():
    assert CFG.retransmit_limit(10) == 2 * CFG.retransmit_mult
    assert CFG.retransmit_limit(1000) == 4 * CFG.retransmit_mult


def test_counts_and_member_properties():
    s = swim(2)
    s.probe_failed("n2", 0.0)
    c = s.counts()
    assert c[State.ALIVE] == 1 and c[State.SUSPECT] == 1
    m = Member(rec(3), State.LEFT, 4, 0.0)
    assert not m.probeable and m.heard and m.name == "n3"


@pytest.mark.parametrize("kw,flag", [
    ({"probe_interval": 0}, "--probe-interval"),
    ({"probe_timeout": 0.6}, "--probe-timeout"),
    ({"indirect_probes": -1}, "--indirect-probes"),
    ({"suspect_timeout": 0}, "--suspect-timeout"),
    ({"push_pull_interval": 0}, "--push-pull-interval"),
    ({"suspect_timeout_max": 0.5}, "--suspect-timeout-max"),
])
def test_invalid_timings_name_the_flag(kw, flag):
    with pytest.raises(ConfigError) as e:
        SwimConfig(**kw).validate()
    assert e.value.field == flag


def test_own_incarnation_starts_at_one():
    with pytest.raises(ValueError):
        Swim(rec(1), 0)


def test_dead_members_waiting_to_be_forgotten_are_not_counted_on_to_confirm():
    s = swim(4)                                             # n2..n5
    for i in (3, 4):
        s.merge([Update(rec(i), State.DEAD, 10, "n1")], 1.0)
    s.probe_failed("n2", 10.0)                              # only n5 could confirm
    assert s.members["n2"].suspect_deadline == 10.0 + LONE
    s.merge([Update(rec(2), State.SUSPECT, 10, "n5")], 10.2)
    assert s.members["n2"].suspect_deadline == 10.0 + CFG.suspect_timeout
    # The last survivor of a crash: nobody is left to confirm, so no long wait.
    s = swim(3)
    for i in (3, 4):
        s.merge([Update(rec(i), State.DEAD, 10, "n1")], 1.0)
    s.probe_failed("n2", 10.0)
    assert s.members["n2"].suspect_deadline == 10.0 + CFG.suspect_timeout


# --- probe rounds, timers, Local Health Awareness (fake clock) ----------------------

def started(n_peers=6, cfg=CFG, seed=1, now=0.0):
    s = swim(n_peers, cfg, seed)
    s.start(now)
    return s


def next_round(s, now):
    """Run the timers until a round starts; (probe, time)."""
    for _ in range(100):
        now = max(now, s.next_wake())
        due = s.on_timer(now)
        if due.probe is not None:
            return due.probe, now
    raise AssertionError("no round started")


def test_a_round_acked_directly_ends_at_once_and_the_next_starts_an_interval_later():
    s = started()
    p, t0 = next_round(s, 0.0)
    timeout, interval = s.probe_timing()
    assert (p.timeout_at, p.end_at) == (t0 + timeout, t0 + interval)
    assert p.addr == s.members[p.target].addr
    s.probe_ack(p.seq, t0 + 0.003)
    assert p.done and p.acked
    assert s.next_wake() == pytest.approx(t0 + interval)
    due = s.on_timer(s.next_wake())
    assert due.probe is not None and due.probe.target != p.target and not due.changes


def test_no_ack_asks_helpers_at_the_timeout_then_suspects_at_the_end_of_the_round():
    s = started(8)
    p, _t0 = next_round(s, 0.0)
    assert s.next_wake() == p.timeout_at
    due = s.on_timer(p.timeout_at)
    assert due.round is p and len(due.indirect) == CFG.indirect_probes
    assert p.target not in {h.name for h in due.indirect}
    assert s.next_wake() == p.end_at
    due = s.on_timer(p.end_at)
    assert [(c.name, c.new) for c in due.changes] == [(p.target, State.SUSPECT)]
    assert due.probe is not None  # and the next round starts on time


def test_an_ack_through_a_helper_is_no_suspicion():
    s = started()
    p, _t0 = next_round(s, 0.0)
    s.on_timer(p.timeout_at)
    s.probe_ack(p.seq, p.timeout_at + 0.05, direct=False)
    assert not s.on_timer(p.end_at).changes
    assert s.members[p.target].state == State.ALIVE and s.health == 0


def test_late_or_foreign_acks_change_nothing():
    s = started()
    p, _t0 = next_round(s, 0.0)
    s.on_timer(p.timeout_at)
    s.on_timer(p.end_at)                     # suspected
    s.probe_ack(p.seq, p.end_at + 0.1)       # too late
    s.probe_ack(p.seq + 99, p.end_at + 0.1)  # another round's
    assert s.members[p.target].state == State.SUSPECT


def test_health_rises_with_helpers_that_do_not_answer_and_falls_with_direct_acks():
    s = started(8)
    p, _ = next_round(s, 0.0)
    s.on_timer(p.timeout_at)
    for _ in range(CFG.indirect_probes):
        s.probe_nack(p.seq)                  # every helper hears us: the target is the problem
    p = s.on_timer(p.end_at).probe
    assert s.health == 0
    s.on_timer(p.timeout_at)
    s.probe_nack(p.seq)                      # one helper answered, four did not
    p = s.on_timer(p.end_at).probe
    assert s.health == CFG.indirect_probes - 1
    s.probe_ack(p.seq, p.started + 0.001)
    p, t = next_round(s, p.started)
    s.probe_ack(p.seq, t + 0.001)
    assert s.health == CFG.indirect_probes - 3


def test_health_is_bounded_and_scales_probing_gossip_and_our_own_verdicts():
    s = started(8)
    timeout0, interval0 = s.probe_timing()
    s._health(100)
    assert s.health == CFG.health_max
    scale = 1 + CFG.health_max
    assert s.probe_timing() == pytest.approx((timeout0 * scale, interval0 * scale))
    assert s.gossip_interval() == pytest.approx(CFG.gossip_interval * scale)
    s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 5.0)
    m = s.members["n2"]
    assert s.tick(5.0 + m.suspect_timeout) == []           # a healthy node would decide now
    assert s.tick(5.0 + m.suspect_timeout * scale)[0].new == State.DEAD


def test_being_suspected_worsens_our_health():
    s = swim(2)
    s.merge([Update(rec(1), State.SUSPECT, 100, "n2")], 1.0)
    assert s.health == 1


def test_the_probe_timeout_follows_observed_round_trips_within_bounds():
    from overlay.membership.swim import TIMEOUT_SHARE
    s = swim(3)
    assert s.probe_timing() == (CFG.probe_timeout, CFG.probe_interval)
    for _ in range(20):
        s.observe_rtt(0.001)                 # a LAN: the floor holds
    assert s.probe_timing() == (CFG.probe_timeout, CFG.probe_interval)
    for _ in range(40):
        s.observe_rtt(0.4)                   # a loaded machine: 400 ms round trips
    timeout, interval = s.probe_timing()
    # the timeout follows, within the share of the interval that leaves the helpers
    # time; the interval itself only moves with our health
    assert CFG.probe_timeout < timeout == TIMEOUT_SHARE * CFG.probe_interval
    assert interval == CFG.probe_interval
    s._health(3)
    timeout, interval = s.probe_timing()
    assert interval == 4 * CFG.probe_interval
    assert timeout == pytest.approx(max(4 * CFG.probe_timeout,
                                        min(CFG.probe_timeout_max, s.srtt + 4 * s.rttvar)))
    for _ in range(40):
        s.observe_rtt(30.0)                  # absurd samples: the ceiling holds
    assert s.probe_timing()[0] == max(CFG.probe_timeout_max, 4 * CFG.probe_timeout)
    fixed = swim(3, SwimConfig(adaptive_timeout=False))
    fixed.observe_rtt(0.3)
    assert fixed.probe_timing() == (CFG.probe_timeout, CFG.probe_interval)


def test_a_direct_ack_feeds_the_round_trip_estimate():
    s = started()
    p, t0 = next_round(s, 0.0)
    s.probe_ack(p.seq, t0 + 0.25)
    assert s.srtt == pytest.approx(0.25) and s.rttvar == pytest.approx(0.125)


def test_a_stall_counts_neither_against_the_target_nor_against_the_suspects():
    s = started(8)
    s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 0.0)
    deadline = s.members["n2"].suspect_deadline
    p, t0 = next_round(s, 0.0)
    # SIGSTOPped for 5 s: every timer is late when we run again
    due = s.on_timer(t0 + 5.0)
    assert due.stalled == pytest.approx(t0 + 5.0 - p.timeout_at)
    assert s.health == 1 and s.stalls == 1
    assert not due.changes                   # no suspicion from the round we slept through
    assert due.push_pull is not None         # catch up on what we missed
    assert p.done and not p.acked
    m = s.members["n2"]
    assert m.state == State.SUSPECT         # 5 s > its timeout, but we were away
    assert m.suspect_deadline == pytest.approx(deadline + due.stalled)


def test_news_arms_the_gossip_timer_and_it_stops_when_the_queue_is_empty():
    s = started(6)
    drain(s)
    while s.on_timer(s.next_wake()).gossip:
        pass
    s.on_timer(s.next_wake())
    assert s._gossip_at is None
    now = s.next_wake()
    s.merge([Update(rec(3), State.SUSPECT, 10, "n4")], now)
    assert s.next_wake() <= now + CFG.gossip_interval
    due = s.on_timer(now + CFG.gossip_interval)
    assert len(due.gossip) == CFG.gossip_fanout
    assert {m.state for m in due.gossip} <= {State.ALIVE, State.SUSPECT}


def test_hearing_of_suspicions_never_adds_probe_rounds():
    """The work one suspicion triggers is bounded: one round per interval, always."""
    s = started(40, seed=3)
    now, rounds = 0.0, 0
    end = 60 * CFG.probe_interval
    k = 0
    while now < end:
        now = s.next_wake()
        due = s.on_timer(now)
        if due.probe is not None:
            rounds += 1
            s.probe_ack(due.probe.seq, now + 0.001)
            k += 1
            # a storm: a new suspicion of someone at every round
            s.merge([Update(rec(2 + k % 40), State.SUSPECT, 10 + k, "n9")], now)
            s.merge([Update(rec(2 + k % 40), State.ALIVE, 11 + k, f"n{2 + k % 40}")], now)
    assert rounds <= 61


def test_a_probe_answer_from_a_newer_incarnation_asks_for_a_full_exchange():
    s = started()
    p, t0 = next_round(s, 0.0)
    s.probe_ack(p.seq, t0 + 0.001, incarnation=s.members[p.target].incarnation + 5)
    due = s.on_timer(t0 + 0.002)
    assert due.push_pull is not None and due.push_pull.name == p.target


def test_push_pull_is_rarer_in_big_clusters():
    assert [CFG.push_pull_scale(n) for n in (2, 32, 33, 64, 65, 1000, 10_000)] == \
        [1, 1, 2, 2, 3, 6, 10]


def test_what_the_data_plane_cares_about():
    from overlay.membership.swim import Change
    assert not Change("x", State.ALIVE, State.SUSPECT, False).data_plane
    assert not Change("x", State.SUSPECT, State.DEAD, False).data_plane
    assert Change("x", State.ALIVE, State.LEFT, False).data_plane
    assert Change("x", None, State.ALIVE, True).data_plane
    assert Change("x", State.DEAD, None, True).data_plane
    assert Change("x", State.ALIVE, State.ALIVE, True).data_plane


def test_nodes_sharing_a_roster_keep_their_own_views():
    from overlay.membership.swim import Roster
    roster = Roster([rec(i) for i in range(1, 21)])
    a = Swim(rec(1), 1, CFG, random.Random(1), roster)
    b = Swim(rec(2), 1, CFG, random.Random(2), roster)
    assert "n1" not in a.members and "n2" in a.members and len(a.members) == 19
    assert a.cluster_size() == 20 and a.counts()[State.ALIVE] == 19
    a.merge([Update(rec(5), State.SUSPECT, 1, "n1")], 1.0)
    assert a.members["n5"].state == State.SUSPECT and b.members["n5"].state == State.ALIVE
    assert roster.members["n5"].state == State.ALIVE
    assert {m.name for m in a.helpers("n3")}.isdisjoint({"n1", "n3", "n5"})
    assert len({a.next_probe().name for _ in range(19)}) == 19
    assert a.full_state(roster=False)[1:] == [Update(rec(5), State.SUSPECT, 1, "n1")]
    assert len(a.full_state()) == 20


def test_an_older_word_is_answered_with_the_newer_one():
    """A member that missed a refutation learns it from whoever it talks to."""
    s = swim(3)
    s.merge([Update(rec(2), State.ALIVE, 12, "n2")], 1.0)
    drain(s)
    s.merge([Update(rec(2), State.SUSPECT, 11, "n3")], 2.0)   # n3 is behind
    reply = s.news_for("n3")
    assert (reply[-1].name, reply[-1].state, reply[-1].incarnation) == ("n2", State.ALIVE, 12)
    s.merge([], 2.1)
    assert s.news_for("n4") == []                               # for that sender only


def test_a_suspicion_is_sent_out_once_more_at_half_time():
    s = started(6)
    drain(s)
    s.merge([Update(rec(2), State.SUSPECT, 10, "n3")], 1.0)
    drain(s)
    m = s.members["n2"]
    s.tick(1.0 + m.suspect_timeout * 0.4)
    assert not s.pending()
    s.tick(1.0 + m.suspect_timeout * 0.6)
    (u,) = s.piggyback()
    # the original suspecter's word, so that it confirms nothing anywhere; once
    assert (u.name, u.state, u.incarnation, u.reporter) == ("n2", State.SUSPECT, 10, "n3")
    assert not s.pending()
    s.tick(1.0 + m.suspect_timeout * 0.8)
    assert not s.pending()
