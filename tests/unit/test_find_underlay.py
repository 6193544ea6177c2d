"""find_underlay's choice of interface, over a fake rtnetlink dump."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, ip_interface
from typing import Any

import pytest

from overlay.dataplane.kernel import find_underlay
from overlay.errors import ConfigError

# index, name, mtu, addresses
LINKS = [(1, "lo", 65536, ["127.0.0.1/8", "::1/128"]),
         (2, "eth0", 9000, ["172.30.1.11/16", "fd30::1:11/64", "fe80::1/64"]),
         (3, "mgmt0", 1500, ["192.168.77.2/24"]), (4, "cni0", 1450, ["10.244.7.1/24"]),
         (5, "overlay.1", 1450, ["10.244.7.0/32"]), (6, "eth1", 1500, ["fe80::6/64"]),
         (7, "ovl.10000000", 1450, ["10.245.7.0/32"]),
         (8, "v6only", 1500, ["fe80::7/64", "fd31::7/64"])]


class Msg(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, default)


async def _gen(items: list[Msg]) -> AsyncIterator[Msg]:
    for m in items:
        yield m


class FakeIpr:
    def __init__(self, default_via: int | None, default6_via: int | None = None) -> None:
        self.default_via = default_via
        self.default6_via = default6_via

    async def link(self, cmd: str) -> AsyncIterator[Msg]:
        return _gen([Msg(index=i, IFLA_IFNAME=n, IFLA_MTU=m) for i, n, m, _ in LINKS])

    async def addr(self, cmd: str, family: int) -> AsyncIterator[Msg]:
        v = 4 if family == socket.AF_INET else 6
        return _gen([Msg(index=i, IFA_ADDRESS=a.split("/")[0], prefixlen=int(a.split("/")[1]))
                     for i, _, _, addrs in LINKS for a in addrs if ip_interface(a).version == v])

    async def route(self, cmd: str, family: int) -> AsyncIterator[Msg]:
        via = self.default_via if family == socket.AF_INET else self.default6_via
        routes = [Msg(dst_len=16, table=254, RTA_OIF=2)]
        if via is not None:
            routes.append(Msg(dst_len=0, table=254, RTA_OIF=via))
        return _gen(routes)


def pick(default_via: int | None = 3, default6_via: int | None = None,
         **kw: Any) -> tuple[str, str, int]:
    u = asyncio.run(find_underlay(FakeIpr(default_via, default6_via), **kw))
    return u.ifname, str(u.ip), u.mtu


def test_default_route_interface_by_default():
    assert pick() == ("mgmt0", "192.168.77.2", 1500)


def test_without_default_route_never_loopback_nor_our_own_devices():
    assert pick(None) == ("eth0", "172.30.1.11", 9000)


def test_iface_regex_skips_loopback_and_our_devices():
    assert pick(iface_regex=".*") == ("eth0", "172.30.1.11", 9000)
    with pytest.raises(ConfigError, match="--iface-regex"):
        pick(iface_regex="(cni0|overlay.*|lo)")
    with pytest.raises(ConfigError, match="--iface-regex"):
        pick(iface_regex=r"ovl\..*")  # the VXLAN device of a VNI >= 10,000,000


def test_iface_and_public_ip():
    assert pick(iface="eth0") == ("eth0", "172.30.1.11", 9000)
    assert pick(public_ip="172.30.1.11") == ("eth0", "172.30.1.11", 9000)
    with pytest.raises(ConfigError, match=r"--public-ip: 192.168.77.2 is not an address of eth0"):
        pick(iface="eth0", public_ip="192.168.77.2")
    with pytest.raises(ConfigError, match=r"--iface: eth1 has no IP address"):
        pick(iface="eth1")
    with pytest.raises(ConfigError, match=r"--iface: no interface named 'wlan0'"):
        pick(iface="wlan0")
    assert IPv4Address(pick(iface_regex=r"eth\d")[1]) == IPv4Address("172.30.1.11")


def test_ipv6_underlay():
    # an interface with only IPv6 (link-local ones never count)
    assert pick(iface="v6only") == ("v6only", "fd31::7", 1500)
    # an IPv6-only host: its IPv6 default route
    assert pick(None, 8) == ("v6only", "fd31::7", 1500)
    # --underlay-family 6 on a dual-stack interface
    assert pick(iface="eth0", family=6) == ("eth0", "fd30::1:11", 9000)
    assert pick(iface="eth0") == ("eth0", "172.30.1.11", 9000)
    assert pick(public_ip="fd30::1:11") == ("eth0", "fd30::1:11", 9000)
    with pytest.raises(ConfigError, match="has no IPv4 address"):
        pick(iface="v6only", family=4)
    with pytest.raises(ConfigError, match="is not IPv4"):
        pick(public_ip="fd30::1:11", family=4)
