"""The two devices a node owns, as specs, and what it takes to make a link match.

Pure: `device_ops(spec, observed)` compares, the kernel shell executes. An
existing device is kept when it is compatible (a restart must not disturb
running pods) and recreated only when a property the kernel cannot change
in place differs (flannel's ensureLink).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Literal

VXLAN_OVERHEAD_V4 = 50


def stable_mac(seed: str) -> str:
    """A locally administered unicast MAC derived from `seed`."""
    h = hashlib.sha256(seed.encode()).digest()
    first = (h[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *h[1:6]))


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    port: int
    local: IPv4Address
    mtu: int
    mac: str
    address: IPv4Interface
    underlay_ifindex: int | None = None


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    mac: str
    mtu: int
    address: IPv4Interface


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel reports about one link (the subset we care about)."""

    name: str
    index: int
    kind: str | None
    up: bool
    mtu: int
    mac: str
    addresses: frozenset[IPv4Interface] = field(default_factory=frozenset)
    vni: int | None = None
    port: int | None = None
    local: IPv4Address | None = None
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


def _common_ops(
    name: str, mtu: int, mac: str, address: IPv4Interface, have: LinkInfo
) -> list[DeviceOp]:
    ops: list[DeviceOp] = []
    if have.mtu != mtu:
        ops.append(DeviceOp("set_mtu", name, mtu, f"MTU is {have.mtu}, want {mtu}"))
    if have.mac != mac:
        ops.append(DeviceOp("set_mac", name, mac, f"MAC is {have.mac}, want {mac}"))
    for a in sorted(have.addresses - {address}):
        # flannel leaves the old address on cni0 and every later pod fails
        # ("already has an IP address different from"); we replace it.
        ops.append(DeviceOp("del_addr", name, a, "address from an earlier subnet"))
    if address not in have.addresses:
        ops.append(DeviceOp("add_addr", name, address, "node address"))
    if not have.up:
        ops.append(DeviceOp("up", name, None, "device is down"))
    return ops


def vxlan_ops(spec: VxlanSpec, have: LinkInfo | None) -> list[DeviceOp]:
    create = DeviceOp("create", spec.name, spec, "device missing")
    rest = [
        DeviceOp("add_addr", spec.name, spec.address, "node address"),
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
    return _common_ops(spec.name, spec.mtu, spec.mac, spec.address, have)


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
    if have is None:
        return [
            DeviceOp("create", spec.name, spec, "device missing"),
            DeviceOp("add_addr", spec.name, spec.address, "pod gateway"),
            DeviceOp("up", spec.name, None, "new device"),
        ]
    if have.kind != "bridge":
        why = f"{have.name} exists but is a {have.kind or 'unknown'} device, not a bridge"
        return [
            DeviceOp("delete", spec.name, None, why),
            DeviceOp("create", spec.name, spec, why),
            DeviceOp("add_addr", spec.name, spec.address, "pod gateway"),
            DeviceOp("up", spec.name, None, "new device"),
        ]
    return _common_ops(spec.name, spec.mtu, spec.mac, spec.address, have)
