import random
from ipaddress import IPv4Network, IPv6Network

from hypothesis import given
from hypothesis import strategies as st

from overlay import subnets
from overlay.model import NetworkConfig


def cfg(net="10.244.0.0/16", length=24):
    return NetworkConfig(network=IPv4Network(net), subnet_len=length)


def test_preferred_subnet_first_when_free():
    c = cfg()
    pref = IPv4Network("10.244.77.0/24")
    out = subnets.candidates(c, set(), pref, random.Random(1))
    assert out[0] == pref
    assert len(out) == 16 and len(set(out)) == 16


def test_preferred_subnet_skipped_when_taken_or_foreign():
    c = cfg()
    pref = IPv4Network("10.244.77.0/24")
    assert pref not in subnets.candidates(c, {pref}, pref, random.Random(1))
    foreign = IPv4Network("10.9.0.0/24")
    assert foreign not in subnets.candidates(c, set(), foreign, random.Random(1))


def test_never_offers_a_taken_subnet_and_finds_the_last_free_one():
    c = cfg("10.244.0.0/22", 24)  # room for 3 (the first is skipped, as in flannel)
    taken = {IPv4Network(f"10.244.{i}.0/24") for i in (1, 3)}
    assert subnets.candidates(c, taken, None, random.Random(5)) == [
        IPv4Network("10.244.2.0/24")]
    assert subnets.free_count(c, taken) == 1
    taken.add(IPv4Network("10.244.2.0/24"))
    assert subnets.candidates(c, taken) == []
    assert subnets.free_count(c, taken) == 0


def test_random_order_spreads_simultaneous_starters():
    c = cfg()
    firsts = {subnets.candidates(c, set(), None, random.Random(seed))[0] for seed in range(20)}
    assert len(firsts) > 15


def test_huge_cluster_is_sampled_not_listed():
    c = cfg("10.0.0.0/8", 29)  # 2 million subnets
    out = subnets.candidates(c, set(), None, random.Random(3), limit=8)
    assert len(set(out)) == 8 and all(subnets.belongs(c, s) for s in out)


def dual(net6="fd00:10:244::/56", **kw):
    return NetworkConfig(network=IPv4Network("10.244.0.0/16"), ipv6_network=IPv6Network(net6),
                         **kw)


def test_first_subnet_is_not_handed_out_by_default_but_kept_by_its_node():
    c = cfg("10.244.0.0/22", 24)  # 0 is skipped: 1, 2, 3
    assert sorted(subnets.candidates(c, set(), None, random.Random(1))) == [
        IPv4Network(f"10.244.{i}.0/24") for i in (1, 2, 3)]
    held = IPv4Network("10.244.0.0/24")
    assert subnets.candidates(c, set(), held, random.Random(1))[0] == held


def test_subnet_min_and_max_bound_the_candidates():
    c = NetworkConfig.from_json('{"Network": "10.0.0.0/8", "SubnetLen": 20, '
                                '"SubnetMin": "10.10.0.0", "SubnetMax": "10.10.48.0"}')
    out = subnets.candidates(c, set(), IPv4Network("10.9.0.0/20"), random.Random(2))
    assert sorted(out) == [IPv4Network(f"10.10.{i}.0/20") for i in (0, 16, 32, 48)]
    assert subnets.free_count(c, {IPv4Network("10.10.16.0/20")}) == 3


def test_ipv6_only_candidates_come_from_the_ipv6_range():
    c = NetworkConfig(network=None, ipv6_network=IPv6Network("fd00::/62"), ipv6_subnet_len=64)
    out = subnets.candidates(c, {IPv6Network("fd00:0:0:2::/64")}, None, random.Random(3))
    assert sorted(out) == [IPv6Network("fd00:0:0:1::/64"), IPv6Network("fd00:0:0:3::/64")]


def test_huge_ipv6_range_is_sampled():
    c = NetworkConfig(network=None, ipv6_network=IPv6Network("fd00::/8"), ipv6_subnet_len=64)
    out = subnets.candidates(c, set(), None, random.Random(4), limit=8)
    assert len(set(out)) == 8 and all(subnets.belongs(c, s) for s in out)


def test_dual_stack_pairs_subnets_of_the_same_index_when_free():
    c = dual()
    got = subnets.pairs(c, set(), (), random.Random(5), limit=4)
    assert len(got) == 4
    for v4, v6 in got:
        assert v4.version == 4 and v6.version == 6
        assert c.pool(4).index(v4) == c.pool(6).index(v6)
    taken = {IPv6Network(f"fd00:10:244:{i:x}::/64") for i in range(1, 256) if i != 77}
    got = subnets.pairs(c, taken, (), random.Random(5), limit=4)
    assert [str(v6) for _, v6 in got] == ["fd00:10:244:4d::/64"]  # the one free IPv6 subnet


def test_dual_stack_node_gets_both_of_its_subnets_back():
    c = dual()
    pref = (IPv4Network("10.244.9.0/24"), IPv6Network("fd00:10:244:33::/64"))
    got = subnets.pairs(c, set(), pref, random.Random(6), limit=3)
    assert got[0] == pref
    assert all(pref[1] not in pair for pair in got[1:])


@given(st.sets(st.integers(1, 15), max_size=15), st.sets(st.integers(1, 15), max_size=15),
       st.integers(0, 2**32))
def test_pairs_never_offer_a_taken_subnet_nor_one_twice(t4, t6, seed):
    c = NetworkConfig(network=IPv4Network("10.244.0.0/20"), ipv6_network=IPv6Network(
        "fd00::/60"), ipv6_subnet_len=64)
    taken = {c.pool(4).at(i) for i in t4} | {c.pool(6).at(i) for i in t6}
    got = subnets.pairs(c, taken, (), random.Random(seed), limit=16)
    assert len(got) == min(15 - len(t4), 15 - len(t6), 16)
    for fam in (0, 1):
        picked = [p[fam] for p in got]
        assert len(set(picked)) == len(picked) and not set(picked) & taken
