import asyncio
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from overlay.dataplane.desired import Fdb, Neigh, Route
from overlay.dataplane.devices import BridgeSpec, VxlanSpec
from overlay.dataplane.fake import FakeKernel
from overlay.dataplane.reconciler import Reconciler, Specs
from overlay.model import NodeRecord


def rec(name, third, mac_last):
    return NodeRecord(name, IPv4Network(f"10.244.{third}.0/24"),
                      IPv4Address(f"172.30.1.{10 + third}"), f"02:00:00:00:00:{mac_last:02x}")


SPECS = Specs(
    "n1",
    VxlanSpec("overlay.1", 1, 8472, IPv4Address("172.30.1.11"), 1450, "02:00:00:00:00:01",
              IPv4Interface("10.244.1.0/32")),
    BridgeSpec("cni0", "02:00:00:00:00:aa", 1450, IPv4Interface("10.244.1.1/24")),
    IPv4Network("10.244.0.0/16"),
)


def make(peers):
    k = FakeKernel()
    r = Reconciler(k, lambda: peers)
    r.set_specs(SPECS)
    return k, r


def run(coro):
    return asyncio.run(coro)


def test_first_pass_builds_devices_and_programs_peers():
    peers = [rec("n2", 2, 2), rec("n3", 3, 3)]
    k, r = make(peers)
    res = run(r.reconcile_once())
    assert res.ok and res.applied == 6
    vx = k.links["overlay.1"]
    assert vx.up and IPv4Interface("10.244.1.0/32") in vx.addresses
    assert k.links["cni0"].up
    assert len(k.entries[vx.index]) == 6
    assert all(r.is_programmed(p) for p in peers)


def test_second_pass_changes_nothing():
    k, r = make([rec("n2", 2, 2)])
    run(r.reconcile_once())
    k.calls.clear()
    res = run(r.reconcile_once())
    assert res.applied == 0 and res.device_ops == 0
    assert not any(c.startswith(("add", "del", "create")) for c in k.calls)


def test_entry_deleted_by_hand_is_repaired_and_counted():
    peer = rec("n2", 2, 2)
    k, r = make([peer])
    run(r.reconcile_once())
    idx = k.links["overlay.1"].index
    k.remove_entry(idx, Fdb(peer.vtep_mac, peer.underlay_ip))
    res = run(r.reconcile_once())
    assert res.repaired == 1 and r.is_programmed(peer)


def test_deleted_device_is_recreated_with_its_entries():
    peer = rec("n2", 2, 2)
    k, r = make([peer])
    run(r.reconcile_once())
    del k.links["overlay.1"]
    res = run(r.reconcile_once())
    assert res.ok and res.repaired >= 1
    assert r.is_programmed(peer)
    assert len(k.entries[k.links["overlay.1"].index]) == 3


def test_a_recreated_bridge_calls_bridge_created_to_put_the_pods_back():
    k = FakeKernel()
    calls = []

    async def created():
        calls.append(k.links["cni0"].index)  # the new bridge exists when it runs

    r = Reconciler(k, lambda: [rec("n2", 2, 2)], bridge_created=created)
    r.set_specs(SPECS)
    run(r.reconcile_once())
    run(r.reconcile_once())
    assert len(calls) == 1  # created once at start, untouched by the second pass
    del k.links["cni0"]
    run(r.reconcile_once())
    assert len(calls) == 2 and calls[1] == k.links["cni0"].index


def test_failed_op_is_not_recorded_as_programmed_and_is_retried():
    peer = rec("n2", 2, 2)
    k, r = make([peer])
    k.fail_next[f"add {Route(peer.subnet, peer.vtep_ip)}"] = 1
    res = run(r.reconcile_once())
    assert not res.ok and res.failed == 1 and res.applied == 2
    assert not r.is_programmed(peer)
    assert Route(peer.subnet, peer.vtep_ip) not in r.programmed.routes
    res = run(r.reconcile_once())
    assert res.ok and res.applied == 1 and r.is_programmed(peer)


def test_stale_peers_from_before_a_restart_are_removed():
    k, r = make([])
    run(r.reconcile_once())
    gone = rec("n9", 9, 9)
    idx = k.links["overlay.1"].index
    from overlay.dataplane.desired import Entries
    k.entries[idx] = Entries(frozenset({Route(gone.subnet, gone.vtep_ip)}),
                             frozenset({Neigh(gone.vtep_ip, gone.vtep_mac)}),
                             frozenset({Fdb(gone.vtep_mac, gone.underlay_ip)}))
    res = run(r.reconcile_once())
    assert res.applied == 3 and len(k.entries[idx]) == 0


def test_observe_failure_raises_and_run_loop_survives_it():
    peer = rec("n2", 2, 2)
    k, r = make([peer])
    r.interval = 0.01
    k.fail_next["observe"] = 2

    async def go():
        task = asyncio.create_task(r.run())
        await asyncio.wait_for(r.first_done.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(go())
    assert r.is_programmed(peer)


def test_a_kernel_notification_wakes_a_pass_long_before_the_timer():
    peer = rec("n2", 2, 2)
    k = FakeKernel()

    class Monitor:
        def __init__(self):
            self.fire = asyncio.Event()
            self.seen = []

        async def changed(self, watched):
            await self.fire.wait()
            self.fire.clear()
            self.seen.append(watched())
            return "route changed"

    mon = Monitor()
    r = Reconciler(k, lambda: [peer], interval=3600, monitor=mon)
    r.set_specs(SPECS)

    async def go():
        task = asyncio.create_task(r.run())
        await asyncio.wait_for(r.first_done.wait(), 5)
        idx = r.vxlan_index
        k.remove_entry(idx, Route(peer.subnet, peer.vtep_ip))
        mon.fire.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if r.passes >= 2:
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return idx

    idx = run(go())
    assert r.passes == 2 and r.is_programmed(peer)
    assert Route(peer.subnet, peer.vtep_ip) in k.entries[idx].routes
    w = mon.seen[0]
    assert w.vxlan == idx and w.bridge is not None and w.vxlan_mtu == 1450
    assert w.clusters == (SPECS.cluster,)


def test_a_broken_notification_socket_is_not_fatal_and_still_wakes_a_pass():
    from overlay.dataplane.kernel import KernelError

    k = FakeKernel()

    class Broken:
        calls = 0

        async def changed(self, watched):
            Broken.calls += 1
            if Broken.calls == 1:
                await asyncio.sleep(0.05)  # after the first pass
                raise KernelError("read kernel notifications", 22, "Invalid argument")
            await asyncio.Event().wait()

    r = Reconciler(k, lambda: [], interval=3600, monitor=Broken())
    r.set_specs(SPECS)

    async def go():
        task = asyncio.create_task(r.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if r.passes >= 2 and Broken.calls >= 2:
                break
        assert not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(go())
    assert r.passes >= 2 and Broken.calls >= 2


# --- IPv6 and DirectRouting ------------------------------------------------------------


def test_dual_stack_specs_program_both_families_and_report_them_programmed():
    from ipaddress import IPv6Interface, IPv6Network

    from overlay.dataplane.desired import UnderlayView

    specs = Specs(
        "n1",
        VxlanSpec("overlay.1", 1, 8472, IPv4Address("172.30.1.11"), 1450, "02:00:00:00:00:01",
                  (IPv4Interface("10.244.1.0/32"), IPv6Interface("fd00:0:0:1::/128")), 2),
        BridgeSpec("cni0", "02:00:00:00:00:aa", 1450,
                   (IPv4Interface("10.244.1.1/24"), IPv6Interface("fd00:0:0:1::1/64"))),
        (IPv4Network("10.244.0.0/16"), IPv6Network("fd00::/48")),
        UnderlayView(4, IPv4Network("172.30.0.0/16"), direct_routing=True),
    )
    near = rec("n2", 2, 2).with_(subnet6=IPv6Network("fd00:0:0:2::/64"))
    far = rec("n3", 3, 3).with_(subnet6=IPv6Network("fd00:0:0:3::/64"),
                                underlay_ip=IPv4Address("172.31.1.13"))
    k = FakeKernel()
    r = Reconciler(k, lambda: [near, far])
    r.set_specs(specs)
    res = run(r.reconcile_once())
    assert res.ok, res.errors
    vx = k.links["overlay.1"]
    assert IPv6Interface("fd00:0:0:1::/128") in vx.addresses
    assert IPv6Interface("fd00:0:0:1::1/64") in k.links["cni0"].addresses
    routes = {(str(e.dst), e.direct) for e in k.entries[vx.index].routes}
    assert routes == {("10.244.2.0/24", True), ("fd00:0:0:2::/64", False),
                      ("10.244.3.0/24", False), ("fd00:0:0:3::/64", False)}
    assert r.is_programmed(near) and r.is_programmed(far)
    assert r.is_direct("n2") and not r.is_direct("n3")
    w = r.watched()
    assert w.underlay == 2 and len(w.neigh6) == 2 and len(w.clusters) == 2


def test_a_direct_route_without_an_underlay_device_fails_the_op_not_the_pass():
    from overlay.dataplane.desired import UnderlayView

    specs = Specs("n1", SPECS.vxlan, SPECS.bridge, SPECS.cluster,
                  UnderlayView(4, IPv4Network("172.30.0.0/16"), direct_routing=True))
    k = FakeKernel()
    r = Reconciler(k, lambda: [rec("n2", 2, 2)])
    r.set_specs(specs)  # the VXLAN spec names no underlay device
    res = run(r.reconcile_once())
    assert res.failed == 1 and "no underlay device" in res.errors[0]
