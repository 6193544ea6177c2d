import random
from ipaddress import IPv4Network

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
    c = cfg("10.244.0.0/22", 24)  # room for 4
    taken = {IPv4Network(f"10.244.{i}.0/24") for i in (0, 1, 3)}
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
