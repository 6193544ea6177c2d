"""The names of the devices overlay makes on a node, in one place.

  cni0            the pod bridge
  overlay.<VNI>   the VXLAN device; `ovl.<VNI>` when that does not fit in IFNAMSIZ
                  (VNIs of eight digits: 10,000,000 and above)
  veth<11 hex>    the host end of a pod's veth pair, derived from the container ID
                  and the interface name, so DEL finds it without the pod's namespace

Whoever must tell our devices from the host's (underlay discovery, the host
networks a cluster CIDR must not overlap) asks `is_node_device`. Pure and
standard library only (the base layer).
"""

from __future__ import annotations

import hashlib
import re

IFNAMSIZ = 15
BRIDGE_NAME = "cni0"
_VXLAN_RE = re.compile(r"^(?:overlay|ovl)\.[0-9]+$")
HOST_VETH_RE = re.compile(r"^veth[0-9a-f]{11}$")


def vxlan_name(vni: int) -> str:
    """`overlay.<VNI>`; VNIs of eight digits do not fit IFNAMSIZ, so they get `ovl.<VNI>`."""
    name = f"overlay.{vni}"
    return name if len(name) <= IFNAMSIZ else f"ovl.{vni}"


def is_vxlan_device(name: str) -> bool:
    """A name `vxlan_name` gives, for any VNI."""
    return _VXLAN_RE.match(name) is not None


def is_node_device(name: str) -> bool:
    """The bridge or a VXLAN device of ours: they hold cluster addresses, never the host's."""
    return name == BRIDGE_NAME or is_vxlan_device(name)


def host_veth_name(container_id: str, ifname: str) -> str:
    """Deterministic, so DEL finds it without the container's namespace."""
    return "veth" + hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()[:11]
