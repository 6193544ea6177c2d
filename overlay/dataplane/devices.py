"""The two devices a node owns, as specs, and what it takes to make a link match.

Pure: `device_ops(spec, observed)` compares, the kernel shell executes. An
existing device is kept when it is compatible (a restart must not disturb
running pods) and recreated only when a property the kernel cannot change
in place differs (flannel's ensureLink).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Literal

from overlay.model import IPAddr, IPIface

# Outer Ethernet 14 + IP 20/40 + UDP 8 + VXLAN 8 (the inner Ethernet header
# is not part of the inner MTU): 50 bytes over IPv4, 70 over IPv6.
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70


def vxlan_overhead(underlay_family: int) -> int:
    return VXLAN_OVERHEAD_V6 if underlay_family == 6 else VXLAN_OVERHEAD_V4


def _addresses(value: IPIface | tuple[IPIface, ...]) -> tuple[IPIface, ...]:
    if isinstance(value, IPv4Interface | IPv6Interface):
        return (value,)
    return tuple(value)


def managed(addr: IPIface) -> bool:
    """Addresses we own on our devices: not the IPv6 link-local ones the kernel adds."""
    return not (addr.version == 6 and addr.ip.is_link_local)


def stable_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from `seed`."""
    h = hashlib.sha256(seed.encode()).digest()
    first = (h[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *h[1:6]))


@dataclass(frozen=True)
class VxlanSpec:
    """One device for both pod families; `local` (IPv4 or IPv6) sets the underlay's.
    `addresses`: the node's VTEP address of each pod family, as /32 and /128."""

    name: str
    vni: int
    port: int
    local: IPAddr
    mtu: int
    mac: str
    addresses: tuple[IPIface, ...]
    underlay_ifindex: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", _addresses(self.addresses))


@dataclass(frozen=True)
class BridgeSpec:
    """`addresses`: the pods' gateway of each family."""

    name: str
    mac: str
    mtu: int
    addresses: tuple[IPIface, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", _addresses(self.addresses))


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel reports about one link (the subset we care about)."""

    name: str
    index: int
    kind: str | None
    up: bool
    mtu: int
    mac: str
    addresses: frozenset[IPIface] = field(default_factory=frozenset)
    vni: int | None = None
    port: int | None = None
    local: IPAddr | None = None
    learning: bool | None = None
    underlay_ifindex: int | None = None


DeviceAction = Literal["create", "delete", "set_mtu", "set_mac", "up", "add_addr", "del_addr"]


@dataclass(frozen=True)
class DeviceOp:
    action: DeviceAction
    name: str
    value: object = None
    why: str = ""

    def __str__(self) -> str:
        v = "" if self.value is None else f" {self.value}"
        return f"{self.action} {self.name}{v}"


def _addr_key(a: IPIface) -> tuple[int, int, int]:
    return (a.version, int(a.ip), a.network.prefixlen)


def _common_ops(
    name: str, mtu: int, mac: str, addresses: tuple[IPIface, ...], have: LinkInfo,
    what: str = "node address",
) -> list[DeviceOp]:
    ops: list[DeviceOp] = []
    if have.mtu != mtu:
        ops.append(DeviceOp("set_mtu", name, mtu, f"MTU is {have.mtu}, want {mtu}"))
    if have.mac != mac:
        ops.append(DeviceOp("set_mac", name, mac, f"MAC is {have.mac}, want {mac}"))
    stale = {a for a in have.addresses if managed(a)} - set(addresses)
    for a in sorted(stale, key=_addr_key):
        # flannel leaves the old address on cni0 and every later pod fails
        # ("already has an IP address different from"); we replace it.
        ops.append(DeviceOp("del_addr", name, a, "address from an earlier subnet"))
    for a in addresses:
        if a not in have.addresses:
            ops.append(DeviceOp("add_addr", name, a, what))
    if not have.up:
        ops.append(DeviceOp("up", name, None, "device is down"))
    return ops


def vxlan_ops(spec: VxlanSpec, have: LinkInfo | None) -> list[DeviceOp]:
    create = DeviceOp("create", spec.name, spec, "device missing")
    rest = [
        *(DeviceOp("add_addr", spec.name, a, "node address") for a in spec.addresses),
        DeviceOp("up", spec.name, None, "new device"),
    ]
    if have is None:
        return [create, *rest]
    mismatch = incompatible_vxlan(spec, have)
    if mismatch:
        return [
            DeviceOp("delete", spec.name, None, mismatch),
            DeviceOp("create", spec.name, spec, mismatch),
            *rest,
        ]
    return _common_ops(spec.name, spec.mtu, spec.mac, spec.addresses, have)


def incompatible_vxlan(spec: VxlanSpec, have: LinkInfo) -> str:
    """Why the existing link cannot be kept, or '' if it can."""
    if have.kind != "vxlan":
        return f"{have.name} exists but is a {have.kind or 'unknown'} device, not vxlan"
    diffs = []
    if have.vni != spec.vni:
        diffs.append(f"VNI {have.vni} != {spec.vni}")
    if have.port != spec.port:
        diffs.append(f"port {have.port} != {spec.port}")
    if have.local != spec.local:
        diffs.append(f"local {have.local} != {spec.local}")
    if have.learning:
        diffs.append("learning is on")
    if spec.underlay_ifindex is not None and have.underlay_ifindex not in (
        None,
        spec.underlay_ifindex,
    ):
        diffs.append(f"underlay link {have.underlay_ifindex} != {spec.underlay_ifindex}")
    return ("incompatible: " + ", ".join(diffs)) if diffs else ""


def bridge_ops(spec: BridgeSpec, have: LinkInfo | None) -> list[DeviceOp]:
    gateways = [DeviceOp("add_addr", spec.name, a, "pod gateway") for a in spec.addresses]
    if have is None:
        return [
            DeviceOp("create", spec.name, spec, "device missing"),
            *gateways,
            DeviceOp("up", spec.name, None, "new device"),
        ]
    if have.kind != "bridge":
        why = f"{have.name} exists but is a {have.kind or 'unknown'} device, not a bridge"
        return [
            DeviceOp("delete", spec.name, None, why),
            DeviceOp("create", spec.name, spec, why),
            *gateways,
            DeviceOp("up", spec.name, None, "new device"),
        ]
    return _common_ops(spec.name, spec.mtu, spec.mac, spec.addresses, have, "pod gateway")
