import threading
from ipaddress import IPv4Address, IPv4Network

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
