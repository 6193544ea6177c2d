import asyncio
import random
from ipaddress import IPv4Network, IPv6Network

import pytest

from overlay.agent.lease import LeaseManager, SubnetsExhausted, Template
from overlay.errors import TemporaryError
from overlay.model import LeaseEntry, LeaseSnapshot, NetworkConfig, key_role


class FakeStore:
    """An etcd of lease keys in memory (a dual-stack lease is two keys, see
    overlay.model); can make others win the race or fail."""

    def __init__(self):
        self.kv: dict = {}  # subnet -> LeaseEntry (the record's key and its IPv6 claim)
        self.rev = 0
        self.next_lease = 100
        self.alive: set[int] = set()
        self.ttls: dict[int, int] = {}
        self.steal_next = 0  # another node takes the subnets we try, just before us
        self.down = False

    @property
    def keys(self):
        return {k: e for k, e in self.kv.items() if key_role(k, e.record) == "record"}

    def _check(self):
        if self.down:
            raise TemporaryError("etcd unreachable")

    async def list_leases(self):
        self._check()
        claims = {k: e for k, e in self.kv.items() if key_role(k, e.record) == "claim"}
        return LeaseSnapshot(self.rev, dict(self.keys), [], claims)

    async def grant(self, ttl):
        self._check()
        self.next_lease += 1
        self.alive.add(self.next_lease)
        self.ttls[self.next_lease] = ttl
        return self.next_lease

    async def keepalive(self, lease_id):
        self._check()
        return 30 if lease_id in self.alive else 0

    def _put(self, record, lease_id):
        self.rev += 1
        for k in record.lease_keys:
            self.kv[k] = LeaseEntry(record, self.rev, lease_id)
        return self.rev

    async def create_lease(self, record, lease_id):
        return await self.replace_lease(record, lease_id, dict.fromkeys(record.lease_keys, 0))

    async def replace_lease(self, record, lease_id, expect_mod, drop=None):
        self._check()
        expect = {record.key_subnet: expect_mod} if isinstance(expect_mod, int) \
            else dict(expect_mod)
        if self.steal_next and all(m == 0 for m in expect.values()):
            self.steal_next -= 1
            self._put(Template("thief", "172.30.9.9", "02:00:00:00:99:99", "").record(
                *record.subnets), 1)
        for k in record.lease_keys:
            cur = self.kv.get(k)
            if (cur.mod_revision if cur else 0) != expect.get(k, 0):
                return None
        for k, m in (drop or {}).items():
            if m and (k not in self.kv or self.kv[k].mod_revision != m):
                return None
        for k in drop or {}:
            self.kv.pop(k, None)
        return self._put(record, lease_id)

    async def delete_lease(self, subnet, expect_mod=None):
        keys = subnet.lease_keys if hasattr(subnet, "lease_keys") else (subnet,)
        return any([self.kv.pop(k, None) is not None for k in keys])

    async def revoke(self, lease_id):
        self._check()
        self.expire(lease_id)

    def expire(self, lease_id):
        self.alive.discard(lease_id)
        for s, e in list(self.kv.items()):
            if e.lease_id == lease_id:
                del self.kv[s]


CFG = NetworkConfig(network=IPv4Network("10.244.0.0/22"), subnet_len=24)  # 3 subnets (1-3)


def tpl(name="n1", mac="02:00:00:00:00:01"):
    return Template(name, "172.30.1.11", mac, "172.30.1.11:7946")


def mgr(store, name="n1", preferred=None, **kw):
    return LeaseManager(store, CFG, tpl(name), ttl=30, preferred=preferred,
                        rng=random.Random(1), retry_max=0.01, **kw)


def run(c):
    return asyncio.run(c)


def test_lost_race_moves_on_instead_of_exiting():
    store = FakeStore()
    store.steal_next = 2
    e = run(mgr(store).acquire())
    assert e.record.node == "n1"
    assert sum(1 for x in store.keys.values() if x.record.node == "thief") == 2


def test_restart_takes_over_own_key_in_place_with_new_details():
    store = FakeStore()
    first = run(mgr(store).acquire())
    m2 = LeaseManager(store, CFG, tpl(mac="02:00:00:00:00:42"), ttl=30, rng=random.Random(9))
    again = run(m2.acquire())
    assert again.record.subnet == first.record.subnet
    assert again.record.vtep_mac == "02:00:00:00:00:42"
    assert len(store.keys) == 1


def test_preferred_subnet_comes_back_after_expiry_if_free():
    store = FakeStore()
    m = mgr(store)
    first = run(m.acquire())
    store.expire(first.lease_id)
    again = run(mgr(store, preferred=first.record.subnet).acquire())
    assert again.record.subnet == first.record.subnet


def test_preferred_subnet_taken_by_another_node_moves_with_a_log_line(caplog):
    store = FakeStore()
    pref = IPv4Network("10.244.2.0/24")
    run(mgr(store, name="other", preferred=pref).acquire())
    with caplog.at_level("WARNING"):
        e = run(mgr(store, preferred=pref).acquire())
    assert e.record.subnet != pref
    assert "now belongs to node other" in caplog.text


def test_exhaustion_is_a_clear_temporary_error_and_a_freed_subnet_is_taken():
    store = FakeStore()
    held = [run(mgr(store, name=f"n{i}").acquire()) for i in range(2, 5)]
    m = mgr(store, name="n9")
    with pytest.raises(SubnetsExhausted, match="all 3 /24 subnets are leased"):
        run(m._try_acquire())

    async def go():
        task = asyncio.create_task(m.acquire())
        await asyncio.sleep(0.05)
        assert not task.done()
        store.expire(held[1].lease_id)
        return await asyncio.wait_for(task, 5)

    e = run(go())
    assert e.record.subnet == held[1].record.subnet


def test_keepalive_reacquires_after_expiry_and_reports_change():
    store = FakeStore()
    m = mgr(store)
    changes = []

    async def on_change(entry):
        changes.append(entry)

    m.on_change = on_change

    async def go():
        await m.acquire()
        m.ttl = 5  # renew every ~1.25 s; expiry is noticed on the next renewal
        store.expire(m.lease_id)
        m.lost("test")  # as the watcher would on the DELETE event
        task = asyncio.create_task(m.keep_alive())
        for _ in range(100):
            await asyncio.sleep(0.02)
            if changes:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(go())
    assert changes and changes[0].record.node == "n1"
    assert m.lease_id in store.alive


def test_etcd_down_keeps_the_lease_object_and_marks_unhealthy():
    store = FakeStore()
    m = mgr(store)

    async def go():
        await m.acquire()
        m.ttl = 4
        store.down = True
        task = asyncio.create_task(m.keep_alive())
        await asyncio.sleep(1.3)
        assert not m.healthy and m.current is not None
        store.down = False
        await asyncio.sleep(1.3)
        assert m.healthy
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(go())


# --- dual-stack and IPv6-only leases -------------------------------------------------

DUAL = NetworkConfig(network=IPv4Network("10.244.0.0/22"), subnet_len=24,
                     ipv6_network=IPv6Network("fd00::/62"), ipv6_subnet_len=64)
V6 = NetworkConfig(network=None, ipv6_network=IPv6Network("fd00::/62"), ipv6_subnet_len=64)


def mgr_for(cfg, store, name="n1", **kw):
    return LeaseManager(store, cfg, tpl(name), ttl=30, rng=random.Random(1), retry_max=0.01,
                        **kw)


def test_dual_stack_lease_is_two_keys_written_at_once_and_taken_over_whole():
    store = FakeStore()
    e = run(mgr_for(DUAL, store).acquire())
    v4, v6 = e.record.subnet, e.record.subnet6
    assert v4 is not None and v6 is not None
    assert DUAL.pool(4).index(v4) == DUAL.pool(6).index(v6)  # paired by index
    assert set(store.kv) == {v4, v6} and set(store.keys) == {v4}
    again = run(LeaseManager(store, DUAL, tpl(mac="02:00:00:00:00:42"), ttl=30).acquire())
    assert (again.record.subnet, again.record.subnet6) == (v4, v6)
    assert set(store.kv) == {v4, v6} and store.kv[v6].record.vtep_mac == "02:00:00:00:00:42"


def test_dual_stack_nodes_never_share_an_ipv6_subnet():
    store = FakeStore()
    got = [run(mgr_for(DUAL, store, name=f"n{i}").acquire()).record for i in range(1, 4)]
    assert len({r.subnet6 for r in got}) == 3 and len({r.subnet for r in got}) == 3
    with pytest.raises(SubnetsExhausted, match="all 3 /24 subnets"):
        run(mgr_for(DUAL, store, name="n9")._try_acquire())


def test_a_taken_ipv6_claim_moves_the_pair_on():
    store = FakeStore()
    # another node holds fd00:0:0:1::/64 with an IPv4 subnet this node would pair it with
    other = Template("other", "172.30.1.99", "02:00:00:00:00:99", "").record(
        IPv4Network("10.244.3.0/24"), IPv6Network("fd00:0:0:1::/64"))
    run(store.create_lease(other, 7))
    e = run(mgr_for(DUAL, store, preferred=[IPv4Network("10.244.1.0/24")]).acquire())
    assert e.record.subnet == IPv4Network("10.244.1.0/24")
    assert e.record.subnet6 in (IPv6Network("fd00:0:0:2::/64"), IPv6Network("fd00:0:0:3::/64"))


def test_lost_dual_stack_race_moves_on():
    store = FakeStore()
    store.steal_next = 1
    e = run(mgr_for(DUAL, store).acquire())
    thief = next(x.record for x in store.keys.values() if x.record.node == "thief")
    assert e.record.subnet != thief.subnet and e.record.subnet6 != thief.subnet6


def test_enabling_ipv6_keeps_the_ipv4_subnet_and_adds_one():
    store = FakeStore()
    old = run(mgr(store).acquire())  # an IPv4-only lease from before
    e = run(mgr_for(DUAL, store).acquire())
    assert e.record.subnet == old.record.subnet and e.record.subnet6 is not None
    assert set(store.kv) == {old.record.subnet, e.record.subnet6}


def test_ipv6_only_lease_lives_under_its_ipv6_key_and_comes_back():
    store = FakeStore()
    m = mgr_for(V6, store)
    e = run(m.acquire())
    assert e.record.subnet is None and set(store.keys) == {e.record.subnet6}
    store.expire(e.lease_id)
    again = run(mgr_for(V6, store, preferred=e.record.subnets).acquire())
    assert again.record.subnet6 == e.record.subnet6
    run(m.release())


def test_release_removes_every_key():
    store = FakeStore()
    m = mgr_for(DUAL, store)
    run(m.acquire())
    run(m.release())
    assert store.kv == {}


def test_a_stop_hands_the_key_to_a_lease_of_the_restart_grace_and_the_next_start_takes_it():
    store = FakeStore()
    m = mgr(store)
    held = run(m.acquire())
    ttl_lease = m.lease_id
    kept = run(m.keep_for_restart(600))
    assert kept is not None and kept.record == held.record
    entry = store.keys[held.record.subnet]
    # The same record, now on a lease of 600 s that nobody renews; the TTL lease is gone.
    assert entry.record == held.record and store.ttls[entry.lease_id] == 600
    assert entry.lease_id in store.alive and ttl_lease not in store.alive
    # The next start takes the key over in place and revokes the grace lease.
    again = run(mgr(store).acquire())
    assert again.record.subnet == held.record.subnet and len(store.keys) == 1
    assert store.keys[held.record.subnet].lease_id == again.lease_id
    assert entry.lease_id not in store.alive


def test_nothing_is_kept_without_a_lease_in_etcd_or_with_a_grace_not_above_the_ttl():
    store = FakeStore()
    m = mgr(store)
    assert run(m.keep_for_restart(600)) is None  # nothing held yet
    held = run(m.acquire())
    assert run(m.keep_for_restart(30)) is None  # the TTL is 30: nothing to gain
    assert run(m.keep_for_restart(0)) is None
    assert store.keys[held.record.subnet].lease_id == m.lease_id
    degraded = mgr(store)
    degraded.assume(held)  # only the lease saved on disk: nothing of ours to move
    assert run(degraded.keep_for_restart(600)) is None


def test_a_key_changed_meanwhile_or_etcd_down_is_left_to_expire_after_the_ttl():
    store = FakeStore()
    m = mgr(store)
    held = run(m.acquire())
    store.rev += 1  # somebody rewrote the key since we took it
    store.kv[held.record.subnet] = LeaseEntry(held.record, store.rev, m.lease_id)
    before = set(store.alive)
    assert run(m.keep_for_restart(600)) is None
    assert store.keys[held.record.subnet].lease_id == m.lease_id
    assert store.alive == before  # the grace lease it took was given back
    store.down = True
    with pytest.raises(TemporaryError):
        run(m.keep_for_restart(600))
    store.down = False
    assert store.keys[held.record.subnet].lease_id == m.lease_id

def test_a_dual_stack_stop_keeps_both_keys_and_the_next_start_takes_both():
    store = FakeStore()
    m = mgr_for(DUAL, store)
    held = run(m.acquire())
    assert run(m.keep_for_restart(600)) is not None
    grace = {e.lease_id for e in store.kv.values()}
    assert len(store.kv) == 2 and len(grace) == 1 and store.ttls[next(iter(grace))] == 600
    again = run(mgr_for(DUAL, store).acquire())
    assert (again.record.subnet, again.record.subnet6) == (held.record.subnet,
                                                           held.record.subnet6)
    assert {e.lease_id for e in store.kv.values()} == {again.lease_id}
    assert not grace & store.alive


def test_keys_that_expired_while_stopping_are_written_again_on_the_grace_lease():
    store = FakeStore()
    m = mgr(store)
    held = run(m.acquire())
    store.expire(m.lease_id)  # the TTL ran out before the hand-over
    kept = run(m.keep_for_restart(600))
    assert kept is not None and store.keys[held.record.subnet].record == held.record
    assert store.ttls[store.keys[held.record.subnet].lease_id] == 600
    # Taken by another node meanwhile: not ours any more, nothing kept.
    m = mgr(store)
    held = run(m.acquire())
    store.expire(m.lease_id)
    other = run(mgr(store, name="n2", preferred=held.record.subnet).acquire())
    assert other.record.subnet == held.record.subnet
    alive = set(store.alive)
    assert run(m.keep_for_restart(600)) is None
    assert store.keys[held.record.subnet].record.node == "n2" and store.alive == alive
