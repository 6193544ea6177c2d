"""What the data plane programs: etcd's leases, corrected by the nodes' own newer word."""

from ipaddress import IPv4Address, IPv4Network

from overlay.membership.effective import effective_peer, effective_peers, programmable
from overlay.membership.swim import Member, Proof, Record, State
from overlay.model import LeaseEntry, NodeRecord

KEY = "ed25519:" + "A" * 43 + "="
ETCD = NodeRecord("n2", IPv4Network("10.244.2.0/24"), IPv4Address("172.30.1.12"),
                  "02:00:00:00:00:02", "172.30.1.12:7946", public_key=KEY)
ENTRY = LeaseEntry(ETCD, 40, 7)
NEW_MAC = ETCD.with_(vtep_mac="02:42:00:00:00:02", public_key="")  # as gossip carries it


def member(node=NEW_MAC, rev=40, state=State.ALIVE, inc=5, key=KEY):
    """A member as the gate admits it: with the proof it verified with `key`."""
    proof = Proof(b"statement", b"signature", key) if key is not None else None
    return Member(Record(node, rev, proof), state, inc, 0.0)


def test_no_membership_news_programs_what_etcd_says():
    p = effective_peer(ENTRY, None)
    assert (p.record, p.source) == (ETCD, "etcd")
    p = effective_peer(ENTRY, member(inc=0))  # seeded from etcd, never heard from
    assert (p.record, p.source) == (ETCD, "etcd")


def test_the_node_announcing_new_details_for_the_same_lease_wins():
    p = effective_peer(ENTRY, member())
    assert p.source == "gossip" and p.record == NEW_MAC.with_(public_key=KEY)  # etcd's key
    moved = ETCD.with_(underlay_ip=IPv4Address("172.30.1.99"), grpc_addr="172.30.1.99:7946")
    p = effective_peer(ENTRY, member(moved, rev=41))
    assert p.record.underlay_ip == IPv4Address("172.30.1.99")


def test_only_the_node_signing_with_the_key_of_its_lease_overrides_etcd():
    for m in (member(key=None), member(key="ed25519:" + "B" * 43 + "="),
              member(state=State.LEFT, key=None)):
        p = effective_peer(ENTRY, m)
        assert (p.record, p.source) == (ETCD, "etcd")
    keyless = LeaseEntry(ETCD.with_(public_key=""), 40, 7)  # an agent from before keys
    p = effective_peer(keyless, member(key=""))
    assert (p.record, p.source) == (keyless.record, "etcd")


def test_etcd_wins_when_its_lease_is_newer_than_what_the_node_said():
    p = effective_peer(ENTRY, member(rev=39))
    assert (p.record, p.source) == (ETCD, "etcd")


def test_etcd_wins_on_ownership():
    other = NEW_MAC.with_(subnet=IPv4Network("10.244.9.0/24"))
    p = effective_peer(ENTRY, member(other))
    assert (p.record, p.source) == (ETCD, "etcd")


def test_same_details_is_etcd():
    assert effective_peer(ENTRY, member(ETCD)).source == "etcd"


def test_a_dead_peer_keeps_its_entries():
    p = effective_peer(ENTRY, member(ETCD, state=State.DEAD))
    assert p.source == "etcd" and programmable([p]) == [ETCD]


def test_a_peer_that_left_is_removed_at_once():
    p = effective_peer(ENTRY, member(ETCD, state=State.LEFT))
    assert p.source == "left" and programmable([p]) == []


def test_a_leave_from_an_older_lease_does_not_remove_a_newer_one():
    p = effective_peer(ENTRY, member(ETCD, rev=30, state=State.LEFT))
    assert p.source == "etcd" and programmable([p]) == [ETCD]


def test_never_programmed_from_gossip_alone():
    gossip_only = {"n5": member(NEW_MAC.with_(node="n5", subnet=IPv4Network("10.244.5.0/24")))}
    peers = effective_peers({ETCD.subnet: ENTRY}, gossip_only, "n1")
    assert [p.record.node for p in peers] == ["n2"]


def test_self_is_not_a_peer_and_order_is_by_subnet():
    me = LeaseEntry(ETCD.with_(node="n1", subnet=IPv4Network("10.244.1.0/24")), 3, 1)
    n3 = LeaseEntry(ETCD.with_(node="n3", subnet=IPv4Network("10.244.0.0/24"),
                               vtep_mac="02:00:00:00:00:03"), 3, 1)
    entries = {e.record.subnet: e for e in (ENTRY, me, n3)}
    assert [p.record.node for p in effective_peers(entries, {}, "n1")] == ["n3", "n2"]
