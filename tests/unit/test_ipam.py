import threading
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from overlay.cni.ipam import AddressesExhausted, Ipam

SUBNET = IPv4Network("10.244.1.0/29")  # .2 - .6 usable


def test_allocation_skips_vtep_and_gateway_and_is_idempotent(tmp_path):
    ipam = Ipam(tmp_path)
    a = ipam.allocate(SUBNET, "c1", "eth0")
    assert a.ip == IPv4Address("10.244.1.2")
    assert ipam.allocate(SUBNET, "c1", "eth0") == a
    assert ipam.allocate(SUBNET, "c1", "eth1").ip == IPv4Address("10.244.1.3")


def test_exhaustion_and_release(tmp_path):
    ipam = Ipam(tmp_path)
    ips = {ipam.allocate(SUBNET, f"c{i}", "eth0").ip for i in range(5)}
    assert len(ips) == 5 and IPv4Address("10.244.1.7") not in ips
    with pytest.raises(AddressesExhausted):
        ipam.allocate(SUBNET, "c9", "eth0")
    assert ipam.release("c2", "eth0") is not None
    assert ipam.release("c2", "eth0") is None  # twice is fine
    assert ipam.allocate(SUBNET, "c9", "eth0").ip == IPv4Address("10.244.1.4")


def test_released_address_is_not_reused_at_once(tmp_path):
    ipam = Ipam(tmp_path)
    a = ipam.allocate(SUBNET, "c1", "eth0")
    ipam.release("c1", "eth0")
    assert ipam.allocate(SUBNET, "c2", "eth0").ip != a.ip


def test_state_survives_a_new_instance(tmp_path):
    Ipam(tmp_path).allocate(SUBNET, "c1", "eth0")
    again = Ipam(tmp_path)
    assert again.find("c1", "eth0") is not None
    assert again.allocate(SUBNET, "c2", "eth0").ip != again.find("c1", "eth0").ip


def test_parallel_allocations_from_two_instances_never_collide(tmp_path):
    subnet = IPv4Network("10.244.1.0/24")
    got, errors = [], []

    def worker(n):
        ipam = Ipam(tmp_path)
        try:
            for i in range(25):
                got.append(ipam.allocate(subnet, f"w{n}-{i}", "eth0").ip)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 100 == len(set(got))


def test_gc_keeps_only_valid_attachments(tmp_path):
    ipam = Ipam(tmp_path)
    for c in ("a", "b", "c"):
        ipam.allocate(SUBNET, c, "eth0")
    gone = ipam.gc([("b", "eth0")])
    assert {g.container_id for g in gone} == {"a", "c"}
    assert [a.container_id for a in ipam.all()] == ["b"]


def test_repair_after_crash_between_writes(tmp_path):
    ipam = Ipam(tmp_path)
    a = ipam.allocate(SUBNET, "c1", "eth0")
    for p in (tmp_path / "att").iterdir():
        p.unlink()
    (tmp_path / "att" / "stale").write_text("10.244.1.6\nghost\neth0\n")
    assert ipam.repair() == 2
    assert ipam.find("c1", "eth0") == a


def test_ipv6_allocation_uses_every_address_after_the_gateway(tmp_path):
    ipam = Ipam(tmp_path / "ipam6")
    sub = IPv6Network("fd00:0:0:7::/125")  # ::0 VTEP, ::1 gateway, ::2-::7 pods (no broadcast)
    got = [ipam.allocate(sub, f"c{i}", "eth0").ip for i in range(6)]
    assert got == [IPv6Address(f"fd00:0:0:7::{i}") for i in range(2, 8)]
    with pytest.raises(AddressesExhausted):
        ipam.allocate(sub, "c9", "eth0")
    assert Ipam(tmp_path / "ipam6").find("c3", "eth0").ip == IPv6Address("fd00:0:0:7::5")
    assert [a.ip for a in ipam.gc([("c0", "eth0")])] == got[1:]


def test_a_64_is_not_walked(tmp_path):
    ipam = Ipam(tmp_path)
    a = ipam.allocate(IPv6Network("fd00:0:0:7::/64"), "c1", "eth0")
    assert a.ip == IPv6Address("fd00:0:0:7::2")
    assert ipam.repair() == 0 and ipam.all() == [a]
