"""The whole agent, in memory: FakeKernel for the node, an etcd in memory, a membership
that only records. Through a degraded start (etcd unreachable, saved state present)
and back to normal when the store answers; and a start that waits for etcd."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from overlay import metrics
from overlay.agent import state
from overlay.agent.agent import Agent
from overlay.agent.lease import Template
from overlay.agent.localclient import local_status
from overlay.agent.options import AgentOptions
from overlay.agent.parts import Parts
from overlay.cni.wiring import PodWiring
from overlay.dataplane.desired import Fdb, Neigh, Route
from overlay.dataplane.fake import FakeKernel
from overlay.dataplane.kernel import Underlay
from overlay.devnames import BRIDGE_NAME, vxlan_name
from overlay.errors import NotFound, TemporaryError
from overlay.etcdstore import EtcdOptions
from overlay.membership.service import PeerHealth, PeerView
from overlay.membership.signing import NodeKey
from overlay.membership.swim import State, SwimConfig
from overlay.membership.tls import TlsMaterial
from overlay.model import IPNet, LeaseEntry, LeaseEvent, LeaseSnapshot, NetworkConfig, NodeRecord

CFG = NetworkConfig(network=IPv4Network("10.244.0.0/16"), subnet_len=24)
UNDERLAY = Underlay("eth0", 2, IPv4Address("172.30.1.11"), 1500, IPv4Network("172.30.0.0/16"))
MINE = IPv4Network("10.244.7.0/24")


def peer(name: str, third: int) -> NodeRecord:
    return Template(name, f"172.30.1.{10 + third}", f"02:00:00:00:00:{third:02x}",
                    f"172.30.1.{10 + third}:7946").record(IPv4Network(f"10.244.{third}.0/24"))


class MemoryEtcd:
    """The etcd the agent needs, in memory, with a switch to make it unreachable."""

    def __init__(self) -> None:
        self.cfg: NetworkConfig | None = CFG
        self.keys: dict[IPNet, LeaseEntry] = {}
        self.events: list[LeaseEvent] = []
        self.rev = 10
        self.leases: set[int] = set()
        self.ttls: dict[int, int] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise TemporaryError("etcd unreachable")

    def _put(self, subnet: IPNet, entry: LeaseEntry | None) -> int:
        self.rev += 1
        if entry is None:
            self.keys.pop(subnet, None)
        else:
            self.keys[subnet] = entry = LeaseEntry(entry.record, self.rev, entry.lease_id)
        self.events.append(LeaseEvent(subnet, entry, self.rev))
        return self.rev

    async def close(self) -> None: ...

    async def ping(self) -> int:
        self._check()
        return self.rev

    async def get_config(self) -> NetworkConfig:
        self._check()
        if self.cfg is None:
            raise NotFound("no network config")
        return self.cfg

    async def watch_config(self, start_revision: int) -> AsyncIterator[int]:
        while True:
            self._check()
            await asyncio.sleep(0.05)
            if False:  # the config never changes here
                yield start_revision

    async def list_leases(self) -> LeaseSnapshot:
        self._check()
        return LeaseSnapshot(self.rev, dict(self.keys))

    async def watch_leases(self, start_revision: int) -> AsyncIterator[list[LeaseEvent]]:
        while True:
            self._check()
            batch = [e for e in self.events if e.revision >= start_revision]
            if batch:
                start_revision = batch[-1].revision + 1
                yield batch
            await asyncio.sleep(0.02)

    async def grant(self, ttl: int) -> int:
        self._check()
        lease_id = 100 + len(self.ttls)
        self.leases.add(lease_id)
        self.ttls[lease_id] = ttl
        return lease_id

    async def keepalive(self, lease_id: int) -> int:
        self._check()
        return 30 if lease_id in self.leases else 0

    async def create_lease(self, record: NodeRecord, lease_id: int) -> int | None:
        self._check()
        if record.key_subnet in self.keys:
            return None
        return self._put(record.key_subnet, LeaseEntry(record, 0, lease_id))

    async def replace_lease(self, record: NodeRecord, lease_id: int,
                            expect_mod: int | Mapping[IPNet, int],
                            drop: Mapping[IPNet, int] | None = None) -> int | None:
        """IPv4 leases only (one key each): `expect_mod` 0 means the key must not exist."""
        self._check()
        key = record.key_subnet
        want = expect_mod if isinstance(expect_mod, int) else expect_mod.get(key, 0)
        cur = self.keys.get(key)
        if (cur.mod_revision if cur is not None else 0) != want:
            return None
        for old in drop or {}:
            if old != key:
                self._put(old, None)
        return self._put(key, LeaseEntry(record, 0, lease_id))

    async def delete_lease(self, subnet: IPNet | NodeRecord,
                           expect_mod: int | None = None) -> bool:
        self._check()
        key = subnet.key_subnet if isinstance(subnet, NodeRecord) else subnet
        had = key in self.keys
        self._put(key, None)
        return had

    async def revoke(self, lease_id: int) -> None:
        self._check()
        self.leases.discard(lease_id)


class RecordingMembership:
    """Announces nothing to anyone: remembers what the agent told it."""

    def __init__(self, me: NodeRecord, lease_revision: int, incarnation: int, cfg: SwimConfig,
                 listen: str, tls: TlsMaterial | None,
                 etcd_entries: Callable[[], Mapping[IPv4Network, LeaseEntry]],
                 on_change: Callable[[], None], key: NodeKey) -> None:
        self.incarnation = incarnation
        self.key = key
        self.me = me
        self.entries = etcd_entries
        self.on_change = on_change
        self.announced = [(me, lease_revision)]

    async def start(self) -> None: ...

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None: ...

    async def leave(self, timeout: float = 1.0) -> int:
        return 0

    def set_self(self, rec: NodeRecord, lease_revision: int) -> None:
        self.announced.append((rec, lease_revision))

    def sync_etcd(self) -> None:
        self.on_change()

    def peer_records(self) -> list[NodeRecord]:
        return [e.record for e in self.entries().values() if e.record.node != self.me.node]

    def condition(self) -> tuple[bool, str]:
        return True, f"{len(self.peer_records())} alive"

    def views(self) -> list[PeerView]:
        return [PeerView(e.record, e.mod_revision, 1, State.ALIVE, 0, True, "etcd", PeerHealth())
                for e in self.entries().values() if e.record.node != self.me.node]


class RecordingNft:
    def __init__(self) -> None:
        self.scripts: list[str] = []

    async def run(self, script: str) -> None:
        self.scripts.append(script)

    async def listing(self, *args: str) -> str | None:
        return None


class FakeNode:
    """The node's kernel: FakeKernel for devices and entries, nothing of the machine's."""

    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.nft = RecordingNft()
        self.forwarding = False

    def monitor(self) -> None:
        return None  # the periodic pass (0.1 s here) finds drift

    async def find_underlay(self, iface: str | None, iface_regex: str | None,
                            public_ip: str | None, family: int | None = None) -> Underlay:
        return UNDERLAY

    def enable_forwarding(self, ipv6: bool = False) -> None:
        self.forwarding = True

    def pod_wiring(self, bridge: str) -> PodWiring:
        return PodWiring(None, bridge)  # never asked to attach a pod here

    def close(self) -> None:
        self.kernel.close()


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.etcd = MemoryEtcd()
        self.node = FakeNode()
        self.memberships: list[RecordingMembership] = []
        self.opts = AgentOptions(node_name="n1", run_dir=tmp / "run", state_dir=tmp / "state",
                                 reconcile_interval=0.1, vxlan_filter=False,
                                 etcd_startup_timeout=0.3)

        def membership(*args: object) -> RecordingMembership:
            m = RecordingMembership(*args)  # type: ignore[arg-type]
            self.memberships.append(m)
            return m

        def store(opts: EtcdOptions) -> MemoryEtcd:
            return self.etcd

        self.agent = Agent(self.opts, Parts(kernel=lambda: self.node, store=store,
                                            membership=membership))

    def programmed(self, rec: NodeRecord) -> bool:
        vx = self.node.kernel.links.get(vxlan_name(CFG.vni))
        if vx is None:
            return False
        e = self.node.kernel.entries.get(vx.index)
        return e is not None and Route(rec.subnet, rec.vtep_ip) in e.routes and \
            Neigh(rec.vtep_ip, rec.vtep_mac) in e.neighs and \
            Fdb(rec.vtep_mac, rec.underlay_ip) in e.fdbs


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_degraded_start_from_saved_state_then_normal_when_etcd_answers(tmp_path):
    h = Harness(tmp_path)
    p2, p3 = peer("n2", 2), peer("n3", 3)
    me_then = Template("n1", "172.30.1.11", "02:00:00:00:00:01", "172.30.1.11:7946").record(MINE)
    # What the last run saved: our lease (revision 5), the config, the leases it saw.
    state.save(h.opts.state_dir, state.Identity("n1", "02:00:00:00:00:01", MINE, 5, 1000))
    state.save_network(h.opts.state_dir, CFG)
    state.save_peers(h.opts.state_dir, LeaseSnapshot(6, {MINE: LeaseEntry(me_then, 5, 1),
                                                         p2.subnet: LeaseEntry(p2, 6, 2)}))
    h.etcd.keys[p2.subnet] = LeaseEntry(p2, 6, 2)  # our own key expired meanwhile
    h.etcd.down = True

    async def go() -> None:
        task = asyncio.create_task(h.agent.run())
        a = h.agent
        await until(a.readiness.ready)
        # DEGRADED: the saved subnet, the saved peers programmed, etcd said to be away.
        st = a.status()
        assert st.degraded and a.degraded.active and st.me is not None
        assert st.me.subnet == MINE and h.programmed(p2)
        conditions = dict(st.conditions)
        assert not conditions["etcd"].ok and "DEGRADED" in conditions["etcd"].message
        assert conditions["lease"].ok and "assumed" in conditions["lease"].message
        assert h.node.kernel.links[BRIDGE_NAME].up and h.node.forwarding
        assert h.memberships[0].announced[0][0].subnet == MINE  # gossiped at once
        # ... with the key it signs with (issue 11): peers verify our word against it.
        assert h.memberships[0].announced[0][0].public_key == h.memberships[0].key.public
        # The local API says so too (the real client, over the unix socket).
        reply = await asyncio.to_thread(local_status, h.opts.run_dir / "overlayd.sock")
        assert reply.degraded and reply.self.subnet == str(MINE) and reply.vni == CFG.vni
        assert [p.record.name for p in reply.peers] == ["n2"] and reply.peers[0].programmed

        h.etcd.down = False
        await until(lambda: not a.degraded.active)
        held = h.etcd.keys[MINE]
        assert held.record.node == "n1"  # the same subnet, re-taken in etcd
        await until(lambda: a.readiness.conditions["etcd"].ok)
        assert not a.status().degraded
        assert h.memberships[0].announced[-1] == (held.record, held.mod_revision)
        # Following etcd again: a node that joins now is programmed.
        await h.etcd.create_lease(p3, 999)
        await until(lambda: h.programmed(p3))
        # ... and the listing is saved again for the next start without etcd.
        await until(lambda: p3.subnet in (state.load_peers(h.opts.state_dir) or
                                          LeaseSnapshot(0, {})).entries, timeout=10)
        a.refresh_metrics()
        alive = metrics.REGISTRY.get_sample_value("overlay_peers", {"state": "alive"})
        assert alive == 2
        ttl_lease = held.lease_id
        a.stop()
        assert await task == 0
        # Stopping leaves the kernel and the lease for the next start: the key is on a
        # lease of --restart-grace that nobody renews, not on the TTL lease (revoked).
        assert h.programmed(p2) and h.programmed(p3) and MINE in h.etcd.keys
        kept = h.etcd.keys[MINE]
        assert kept.record == held.record and kept.lease_id in h.etcd.leases
        assert h.etcd.ttls[kept.lease_id] == h.opts.restart_grace > h.opts.lease_ttl
        assert ttl_lease not in h.etcd.leases

    asyncio.run(go())
    # nftables only through the agent's runner: the stale VXLAN filter table is removed.
    assert any("delete table ip overlay_vxlan" in s for s in h.node.nft.scripts)


def test_without_saved_state_the_agent_waits_for_etcd(tmp_path):
    h = Harness(tmp_path)
    h.etcd.down = True

    async def go() -> None:
        task = asyncio.create_task(h.agent.run())
        a = h.agent
        await until(lambda: not a.readiness.conditions["etcd"].ok
                    and a.readiness.conditions["etcd"].message != "not checked yet")
        await asyncio.sleep(0.5)
        assert not a.readiness.ready() and a.lease is None  # still waiting for the config
        node = a.node_net()
        assert not node.ready and node.subnet is None
        h.etcd.down = False
        await until(a.readiness.ready)
        st = a.status()
        assert not st.degraded and st.me is not None and st.me.node == "n1"
        assert h.etcd.keys[st.me.subnet].record.node == "n1"
        # etcd binds n1 to the key the membership signs with, kept in the state dir.
        key = h.memberships[0].key
        assert h.etcd.keys[st.me.subnet].record.public_key == key.public
        assert NodeKey(state.signing_key(h.opts.state_dir)).public == key.public
        assert a.node_net().ready and a.node_net().subnet == st.me.subnet
        a.stop()
        assert await task == 0

    asyncio.run(go())
