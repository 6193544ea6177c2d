import asyncio
import random
from ipaddress import IPv4Network

import pytest

from overlay.agent.lease import LeaseManager, SubnetsExhausted, Template
from overlay.errors import TemporaryError
from overlay.model import LeaseEntry, LeaseSnapshot, NetworkConfig


class FakeStore:
    """An etcd of leases in memory; can make others win the race or fail."""

    def __init__(self):
        self.keys: dict[IPv4Network, LeaseEntry] = {}
        self.rev = 0
        self.next_lease = 100
        self.alive: set[int] = set()
        self.steal_next = 0  # another node takes the subnet we try, just before us
        self.down = False

    def _check(self):
        if self.down:
            raise TemporaryError("etcd unreachable")

    async def list_leases(self):
        self._check()
        return LeaseSnapshot(self.rev, dict(self.keys))

    async def grant(self, ttl):
        self._check()
        self.next_lease += 1
        self.alive.add(self.next_lease)
        return self.next_lease

    async def keepalive(self, lease_id):
        self._check()
        return 30 if lease_id in self.alive else 0

    async def create_lease(self, record, lease_id):
        self._check()
        if self.steal_next:
            self.steal_next -= 1
            self.rev += 1
            other = Template("thief", "172.30.9.9", "02:00:00:00:99:99", "").record(record.subnet)
            self.keys[record.subnet] = LeaseEntry(other, self.rev, 1)
        if record.subnet in self.keys:
            return None
        self.rev += 1
        self.keys[record.subnet] = LeaseEntry(record, self.rev, lease_id)
        return self.rev

    async def replace_lease(self, record, lease_id, expect_mod):
        self._check()
        cur = self.keys.get(record.subnet)
        if cur is None or cur.mod_revision != expect_mod:
            return None
        self.rev += 1
        self.keys[record.subnet] = LeaseEntry(record, self.rev, lease_id)
        return self.rev

    async def delete_lease(self, subnet, expect_mod=None):
        return self.keys.pop(subnet, None) is not None

    async def revoke(self, lease_id):
        self.alive.discard(lease_id)
        for s, e in list(self.keys.items()):
            if e.lease_id == lease_id:
                del self.keys[s]

    def expire(self, lease_id):
        self.alive.discard(lease_id)
        for s, e in list(self.keys.items()):
            if e.lease_id == lease_id:
                del self.keys[s]


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
