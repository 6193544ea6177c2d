"""Records that cross boundaries: the network config and the node lease.

Pure data with validation and (de)serialisation; no I/O. The network config
uses flannel's net-conf.json keys with flannel's meaning, so that a flannel
config (IPv4, IPv6-only or dual-stack) can be reused as it is; a flannel key
we do not implement is refused by name, saying what to use instead.

etcd layout of a lease (one transaction writes or deletes all its keys, all
bound to the node's etcd lease):

  IPv4 or dual-stack node   <prefix>subnets/10.244.7.0-24        the record
  dual-stack node, also     <prefix>subnets/fd00:0:0:7::-64      a claim: the same record
  IPv6-only node            <prefix>subnets/fd00:0:0:7::-64      the record

The record lives under its IPv4 subnet whenever it has one, so every IPv4
lease written before IPv6 existed reads as it is, and an IPv4 agent of an
older release reads a dual-stack record as an IPv4 one (it ignores the
`ipv6Subnet` field and the IPv6 key names it cannot parse). The claim key
makes the IPv6 subnet exclusive the same way the IPv4 key does: the
transaction that creates a lease succeeds only if none of its keys exists.
(flannel writes one key named `10.244.7.0-24&fd00:0:0:7::-64` instead; that
name does not keep `<a.b.c.d>-<len>` and guards neither subnet alone.)
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, Generic, Literal, TypeVar

from overlay.errors import ConfigError

IPNet = IPv4Network | IPv6Network
IPAddr = IPv4Address | IPv6Address
IPIface = IPv4Interface | IPv6Interface
Family = Literal[4, 6]

VNI_MAX = 16_777_215
# Smallest usable subnet: .0 is the node's VTEP address, .1 the bridge
# gateway, the last address broadcast; a /29 leaves five pod addresses.
MAX_SUBNET_LEN = 29
MAX_CIDR_PREFIX = 28
# IPv6 has no broadcast address: a /126 leaves two (flannel's limit too).
MAX_SUBNET_LEN6 = 126
MAX_CIDR_PREFIX6 = 124
MIN_MTU = 576  # below this not even IPv4's minimum datagram fits (IPv6 needs 1280)
MIN_MTU6 = 1280

RESERVED: tuple[tuple[IPNet, str], ...] = (
    (ip_network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ip_network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
    (ip_network("::/8"), "reserved (::/8: loopback, IPv4-mapped)"),
    (ip_network("fe80::/10"), "link-local (fe80::/10)"),
    (ip_network("ff00::/8"), "multicast (ff00::/8)"),
)

# flannel keys (net-conf.json) that we do not implement: what to do instead.
# A key set to flannel's default means what we do anyway and is accepted.
_FLANNEL_UNSUPPORTED = {
    "Networks": "multiple cluster networks (flannel's MultiClusterCIDR) are not supported; "
                "use one Network",
    "IPv6Networks": "multiple cluster networks (flannel's MultiClusterCIDR) are not supported; "
                    "use one IPv6Network",
}
_BACKEND_UNSUPPORTED: dict[str, tuple[object, str]] = {
    # key: (flannel's default, why and what instead)
    "GBP": (False, "VXLAN Group Based Policy is not supported; remove it or set it to false"),
    "Learning": (False, "overlayd programs every FDB entry itself, so the device never "
                 "learns; remove it or set it to false"),
    "MacPrefix": (None, "a Windows-only flannel option; remove it"),
    "Name": (None, "a Windows-only flannel option; overlayd names the device "
             "overlay.<VNI>; remove it"),
}
_TOP_KEYS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6",
             "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
             "EnableNFTables", "Backend")
_BACKEND_KEYS = ("Type", "VNI", "Port", "DirectRouting", "MTU")

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$")


def parse_mac(value: object, field: str = "mac") -> str:
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a MAC address string, got {value!r}")
    mac = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        raise ConfigError(field, f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise ConfigError(field, f"{mac} is a multicast MAC; a VTEP needs a unicast one")
    if mac == "00:00:00:00:00:00":
        raise ConfigError(field, "the all-zero MAC cannot be a VTEP address")
    return mac


PUBLIC_KEY_PREFIX = "ed25519:"


def parse_public_key(value: object, field: str = "publicKey") -> str:
    """A node's membership signing key as published in its lease: "ed25519:" and the
    32-byte public key in base64. "" means none (an agent from before signed records)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.startswith(PUBLIC_KEY_PREFIX):
        raise ConfigError(field, f"{str(value)[:80]!r} is not an ed25519 public key "
                          f"({PUBLIC_KEY_PREFIX}<base64>)")
    try:
        raw = base64.b64decode(value[len(PUBLIC_KEY_PREFIX):], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(field, f"{value[:80]!r} is not a 32-byte key in base64")
    return value


def check_node_name(name: object, field: str = "node") -> str:
    if not isinstance(name, str) or not _NODE_NAME_RE.match(name):
        raise ConfigError(
            field,
            f"{name!r} is not a valid node name (letters, digits, '-', '_', '.'; "
            "must start and end with a letter or digit)",
        )
    return name


def parse_ip(value: object, field: str) -> IPAddr:
    """An IPv4 or IPv6 address (an underlay address)."""
    if not isinstance(value, str):
        raise ConfigError(field, f"expected an IP address string, got {value!r}")
    try:
        return ip_address(value.strip())
    except ValueError:
        raise ConfigError(field, f"{value!r} is not an IP address") from None


def parse_underlay_ip(value: object, field: str = "underlayIP") -> IPAddr:
    """A node's underlay address: a unicast address of either family that a VXLAN
    packet can be sent to (not loopback, link-local, multicast or unspecified)."""
    addr = parse_ip(value, field)
    if addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        raise ConfigError(field, f"{addr} cannot be an underlay address (loopback, link-local, "
                          "multicast or unspecified)")
    return addr


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(field, f"{value} is outside {lo}..{hi}")
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(field, f"expected true or false, got {value!r}")
    return value


def _any_cidr(value: object, field: str, example: str) -> IPNet:
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a CIDR string such as {example}, got {value!r}")
    text = value.strip()
    try:
        net = ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(field, f"{value!r} is not a CIDR such as {example}") from None
    if "/" not in text:
        raise ConfigError(field, f"{value!r} has no prefix length; did you mean {net}?")
    # Compare values, not text: "2001:cafe:42:0::/56" (flannel's documented
    # example) is the same network as "2001:cafe:42::/56".
    if net.network_address != ip_address(text.split("/", 1)[0]):
        raise ConfigError(field, f"{value} has host bits set; did you mean {net}?")
    return net


def parse_cidr(value: object, field: str = "Network") -> IPv4Network:
    net = _any_cidr(value, field, "10.244.0.0/16")
    if not isinstance(net, IPv4Network):
        raise ConfigError(field, f"{value} is IPv6; put an IPv6 pod network in IPv6Network "
                          "(with \"EnableIPv6\": true)" if field == "Network"
                          else f"{value} is IPv6; expected an IPv4 network")
    return net


def parse_cidr6(value: object, field: str = "IPv6Network") -> IPv6Network:
    net = _any_cidr(value, field, "fd00:10:244::/56")
    if not isinstance(net, IPv6Network):
        raise ConfigError(field, f"{value} is IPv4; expected an IPv6 network")
    return net


def parse_subnet(value: object, field: str = "subnet") -> IPNet:
    """A node subnet of either family."""
    return _any_cidr(value, field, "10.244.7.0/24")


def within(net: IPNet, outer: IPNet) -> bool:
    """`net` lies in `outer` (False across families)."""
    if isinstance(net, IPv4Network):
        return isinstance(outer, IPv4Network) and net.subnet_of(outer)
    return isinstance(outer, IPv6Network) and net.subnet_of(outer)


def hostport(host: IPAddr | str, port: int | str) -> str:
    """host:port, with an IPv6 address in brackets ([fd30::1:11]:7946)."""
    h = str(host)
    return f"[{h}]:{port}" if ":" in h and not h.startswith("[") else f"{h}:{port}"


def vtep_address(subnet: IPNet) -> IPAddr:
    """A node's address on the VXLAN device: its subnet's network address (as flannel)."""
    return subnet.network_address


def pod_gateway(subnet: IPNet) -> IPIface:
    """The bridge address, the pods' default gateway: the subnet's first host."""
    if isinstance(subnet, IPv4Network):
        return IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
    return IPv6Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


@dataclass(frozen=True)
class Pool:
    """Where one address family's node subnets come from (flannel's Network,
    SubnetLen, SubnetMin and SubnetMax, or their IPv6 counterparts)."""

    network: IPNet
    subnet_len: int
    first: IPNet  # the lowest subnet a new lease gets (SubnetMin)
    last: IPNet  # the highest (SubnetMax)
    # Set explicitly: a node whose old subnet lies outside moves, as in flannel.
    # Left at its default, an old subnet below it (the first subnet, which
    # releases before this one handed out) stays with its node.
    min_explicit: bool = False
    max_explicit: bool = False

    @property
    def family(self) -> Family:
        return 4 if isinstance(self.network, IPv4Network) else 6

    @property
    def bits(self) -> int:
        return self.network.max_prefixlen

    @property
    def count(self) -> int:
        """Subnets in the whole network."""
        return 1 << (self.subnet_len - self.network.prefixlen)

    @property
    def size(self) -> int:
        return 1 << (self.bits - self.subnet_len)

    def index(self, subnet: IPNet) -> int:
        return (int(subnet.network_address) - int(self.network.network_address)) // self.size

    def at(self, index: int) -> IPNet:
        base = int(self.network.network_address) + index * self.size
        if self.family == 4:
            return IPv4Network((base, self.subnet_len))
        return IPv6Network((base, self.subnet_len))

    @property
    def range_indexes(self) -> range:
        """Indexes of the subnets new leases are taken from."""
        return range(self.index(self.first), self.index(self.last) + 1)

    def belongs(self, subnet: IPNet) -> bool:
        return subnet.prefixlen == self.subnet_len and within(subnet, self.network)

    def in_range(self, subnet: IPNet) -> bool:
        """A subnet a new lease may get."""
        return self.belongs(subnet) and self.index(self.first) <= self.index(subnet) \
            <= self.index(self.last)

    def keeps(self, subnet: IPNet) -> bool:
        """A subnet a node that held it before may keep."""
        if not self.belongs(subnet):
            return False
        i = self.index(subnet)
        return ((not self.min_explicit or i >= self.index(self.first))
                and (not self.max_explicit or i <= self.index(self.last)))


_Net = TypeVar("_Net", IPv4Network, IPv6Network)
_Addr = TypeVar("_Addr", IPv4Address, IPv6Address)


@dataclass(frozen=True)
class _Family(Generic[_Net, _Addr]):
    """One address family's keys in flannel's net-conf, and how to read them."""

    network: str  # Network
    subnet_len: str
    subnet_min: str
    subnet_max: str
    parse_network: Callable[[object, str], _Net]
    address: type[_Addr]
    missing: str  # the error when the family is enabled and `network` absent
    disabled: str  # why its keys are ignored when the family is not enabled

    @property
    def keys(self) -> tuple[str, str, str, str]:
        return self.network, self.subnet_len, self.subnet_min, self.subnet_max


_V4: _Family[IPv4Network, IPv4Address] = _Family(
    "Network", "SubnetLen", "SubnetMin", "SubnetMax", parse_cidr, IPv4Address,
    "missing; set the cluster CIDR, e.g. 10.244.0.0/16 (or \"EnableIPv4\": false for an "
    "IPv6-only cluster)", "\"EnableIPv4\" is false")
_V6: _Family[IPv6Network, IPv6Address] = _Family(
    "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", parse_cidr6, IPv6Address,
    "missing; \"EnableIPv6\": true needs the IPv6 pod network, e.g. fd00:10:244::/56",
    "\"EnableIPv6\" is not true")
_FAMILIES: dict[int, _Family[Any, Any]] = {4: _V4, 6: _V6}


def _parse_family(doc: dict[str, Any], fam: _Family[_Net, _Addr], enabled: bool,
                  notes: list[str]) -> tuple[_Net, int, _Addr | None, _Addr | None] | None:
    """One family's network, subnet length, SubnetMin and SubnetMax; None when the family
    is not enabled (its keys are then ignored, as flannel does, with a note each)."""
    if not enabled:
        notes += [f"{k} is ignored: {fam.disabled}" for k in fam.keys if k in doc]
        return None
    if fam.network not in doc:
        raise ConfigError(fam.network, fam.missing)
    network = fam.parse_network(doc[fam.network], fam.network)
    length = _int(doc.get(fam.subnet_len, default_subnet_len(network)), fam.subnet_len,
                  0, network.max_prefixlen)
    return (network, length, _address(doc.get(fam.subnet_min), fam.subnet_min, fam),
            _address(doc.get(fam.subnet_max), fam.subnet_max, fam))


def _address(value: object, field: str, fam: _Family[_Net, _Addr]) -> _Addr | None:
    if value is None:
        return None
    addr = parse_ip(value, field)
    if not isinstance(addr, fam.address):
        raise ConfigError(field, f"{value} is IPv{addr.version}; {field} is an address of "
                          f"{fam.network}")
    return addr


def default_subnet_len(network: IPNet) -> int:
    """flannel's: a /24 (IPv6: /64) per node, or a quarter of a smaller network."""
    if isinstance(network, IPv4Network):
        return 24 if network.prefixlen <= 22 else network.prefixlen + 2
    return 64 if network.prefixlen <= 62 else network.prefixlen + 2


@dataclass(frozen=True)
class NetworkConfig:
    """The cluster network, stored at <prefix>network/config.

    `network` is the IPv4 pod network (None: IPv4 disabled, flannel's
    "EnableIPv4": false), `ipv6_network` the IPv6 one (None: IPv6 disabled).
    `subnet_min` and friends are None when left at flannel's defaults: from
    the second subnet of the network to the last.
    """

    network: IPv4Network | None
    subnet_len: int = 24
    vni: int = 1
    port: int = 8472
    backend: str = "vxlan"
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 64
    subnet_min: IPv4Address | None = None
    subnet_max: IPv4Address | None = None
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    direct_routing: bool = False
    mtu: int | None = None  # flannel's Backend.MTU: the underlay MTU to plan for
    # What from_dict accepted but ignored, as flannel does (for the CLI to say).
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        validate_network(self)

    @property
    def enable_ipv4(self) -> bool:
        return self.network is not None

    @property
    def enable_ipv6(self) -> bool:
        return self.ipv6_network is not None

    def pool(self, family: int) -> Pool | None:
        if family == 4 and self.network is not None:
            return _pool(self.network, self.subnet_len, self.subnet_min, self.subnet_max)
        if family == 6 and self.ipv6_network is not None:
            return _pool(self.ipv6_network, self.ipv6_subnet_len, self.ipv6_subnet_min,
                         self.ipv6_subnet_max)
        return None

    def pools(self) -> tuple[Pool, ...]:
        return tuple(p for f in (4, 6) if (p := self.pool(f)) is not None)

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(p.family for p in self.pools())

    @property
    def primary(self) -> Pool:
        """The family a lease is keyed by: IPv4 when enabled."""
        return self.pools()[0]

    @property
    def networks(self) -> tuple[IPNet, ...]:
        """The pod networks, IPv4 first."""
        return tuple(p.network for p in self.pools())

    @property
    def subnet_count(self) -> int:
        """Subnets new leases can get (of the primary family)."""
        return len(self.primary.range_indexes)

    def describe(self) -> str:
        parts = [f"{p.network}, /{p.subnet_len} per node" for p in self.pools()]
        extra = ", DirectRouting" if self.direct_routing else ""
        return f"{' and '.join(parts)}, VNI {self.vni}, UDP port {self.port}{extra}"

    def to_json(self) -> str:
        doc: dict[str, Any] = {}
        if self.network is not None:
            doc["Network"] = str(self.network)
            doc["SubnetLen"] = self.subnet_len
            if self.subnet_min is not None:
                doc["SubnetMin"] = str(self.subnet_min)
            if self.subnet_max is not None:
                doc["SubnetMax"] = str(self.subnet_max)
        else:
            doc["EnableIPv4"] = False
        if self.ipv6_network is not None:
            doc["EnableIPv6"] = True
            doc["IPv6Network"] = str(self.ipv6_network)
            doc["IPv6SubnetLen"] = self.ipv6_subnet_len
            if self.ipv6_subnet_min is not None:
                doc["IPv6SubnetMin"] = str(self.ipv6_subnet_min)
            if self.ipv6_subnet_max is not None:
                doc["IPv6SubnetMax"] = str(self.ipv6_subnet_max)
        backend: dict[str, Any] = {"Type": self.backend, "VNI": self.vni, "Port": self.port}
        if self.direct_routing:
            backend["DirectRouting"] = True
        if self.mtu is not None:
            backend["MTU"] = self.mtu
        doc["Backend"] = backend
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> NetworkConfig:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError("config", "expected a JSON object")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NetworkConfig:
        for key in sorted(doc):
            if key in _FLANNEL_UNSUPPORTED:
                raise ConfigError(key, _FLANNEL_UNSUPPORTED[key])
            if key not in _TOP_KEYS:
                raise ConfigError(key, "unsupported key (known: " + ", ".join(_TOP_KEYS) + ")")
        notes: list[str] = []
        enable4 = _bool(doc.get("EnableIPv4", True), "EnableIPv4")
        enable6 = _bool(doc.get("EnableIPv6", False), "EnableIPv6")
        # Accepted either way: masquerading always uses nftables (table ip/ip6 overlay).
        _bool(doc.get("EnableNFTables", False), "EnableNFTables")
        if not enable4 and not enable6:
            raise ConfigError("EnableIPv4", "both EnableIPv4 and EnableIPv6 are false: enable "
                              "at least one family")
        network, subnet_len, smin, smax = (_parse_family(doc, _V4, enable4, notes)
                                           or (None, 24, None, None))
        net6, len6, min6, max6 = _parse_family(doc, _V6, enable6, notes) or (None, 64, None, None)
        backend = doc.get("Backend", {})
        if not isinstance(backend, dict):
            raise ConfigError("Backend", f"expected an object, got {backend!r}")
        for key in sorted(backend):
            if key in _BACKEND_UNSUPPORTED:
                default, why = _BACKEND_UNSUPPORTED[key]
                if backend[key] != default or default is None:
                    raise ConfigError(f"Backend.{key}", why)
            elif key not in _BACKEND_KEYS:
                raise ConfigError(f"Backend.{key}", "unsupported key (known: "
                                  + ", ".join(_BACKEND_KEYS) + ")")
        btype = backend.get("Type", "vxlan")
        if btype != "vxlan":
            hint = (" for direct routes use \"vxlan\" with \"DirectRouting\": true "
                    "(routes to peers on the same subnet, VXLAN to the others)"
                    if btype == "host-gw" else "")
            raise ConfigError("Backend.Type", f"{btype!r} is not supported; use \"vxlan\"{hint}")
        vni = _int(backend.get("VNI", 1), "Backend.VNI", 1, VNI_MAX)
        port = _int(backend.get("Port", 8472), "Backend.Port", 1, 65535)
        direct = _bool(backend.get("DirectRouting", False), "Backend.DirectRouting")
        mtu = backend.get("MTU")
        if mtu is not None:
            mtu = _int(mtu, "Backend.MTU", MIN_MTU + 50, 65535)
        return cls(network=network, subnet_len=subnet_len, vni=vni, port=port,
                   ipv6_network=net6, ipv6_subnet_len=len6,
                   subnet_min=smin, subnet_max=smax, ipv6_subnet_min=min6, ipv6_subnet_max=max6,
                   direct_routing=direct, mtu=mtu, notes=tuple(notes))


def _bound(pool_net: IPNet, length: int, value: IPAddr | None, default: IPNet,
           field: str, net_key: str, len_key: str) -> IPNet:
    if value is None:
        return default
    if value not in pool_net:
        raise ConfigError(field, f"{value} is not in {net_key} {pool_net}")
    sub = ip_network(f"{value}/{length}", strict=False)
    if sub.network_address != value:
        raise ConfigError(field, f"{value} is not on a /{length} boundary ({len_key}); did you "
                          f"mean {sub.network_address}?")
    return sub


def _pool(network: IPNet, length: int, smin: IPAddr | None, smax: IPAddr | None) -> Pool:
    v4 = isinstance(network, IPv4Network)
    fam = _FAMILIES[network.version]
    size = 1 << (network.max_prefixlen - length)
    count = 1 << (length - network.prefixlen)
    base = int(network.network_address)
    mk = (lambda i: IPv4Network((base + i * size, length))) if v4 else \
        (lambda i: IPv6Network((base + i * size, length)))
    # flannel skips the first subnet by default (its network address is the cluster's).
    first = _bound(network, length, smin, mk(1 if count > 1 else 0), fam.subnet_min,
                   fam.network, fam.subnet_len)
    last = _bound(network, length, smax, mk(count - 1), fam.subnet_max, fam.network,
                  fam.subnet_len)
    return Pool(network, length, first, last, smin is not None, smax is not None)


def validate_network(cfg: NetworkConfig, avoid: tuple[IPNet, ...] = ()) -> None:
    """Raise ConfigError naming the key if `cfg` cannot work.

    `avoid` lists networks the pod networks must not overlap, such as the
    underlay networks of the hosts.
    """
    if cfg.network is None and cfg.ipv6_network is None:
        raise ConfigError("EnableIPv4", "no pod network: enable IPv4 (Network) or IPv6 "
                          "(EnableIPv6 and IPv6Network)")
    for net, length, keys, max_prefix, max_len in (
        (cfg.network, cfg.subnet_len, ("Network", "SubnetLen"), MAX_CIDR_PREFIX,
         MAX_SUBNET_LEN),
        (cfg.ipv6_network, cfg.ipv6_subnet_len, ("IPv6Network", "IPv6SubnetLen"),
         MAX_CIDR_PREFIX6, MAX_SUBNET_LEN6),
    ):
        if net is None:
            continue
        nkey, lkey = keys
        for reserved, what in RESERVED:
            if net.overlaps(reserved):
                raise ConfigError(nkey, f"{net} overlaps {what}")
        for other in avoid:
            if other.version == net.version and net.overlaps(other):
                raise ConfigError(
                    nkey,
                    f"{net} overlaps {other}, which is in use on this host; "
                    "pod addresses would be unreachable",
                )
        if net.prefixlen > max_prefix:
            raise ConfigError(nkey, f"{net} is too small: use a /{max_prefix} or larger")
        if not isinstance(length, int) or isinstance(length, bool):
            raise ConfigError(lkey, f"expected an integer, got {length!r}")
        if length < net.prefixlen:
            raise ConfigError(
                lkey,
                f"a /{length} per node does not fit in {net}; "
                f"use a length between {net.prefixlen} and {max_len}",
            )
        if length > max_len:
            raise ConfigError(lkey, f"/{length} leaves no room for pods; use /{max_len} or less")
    for family in (4, 6):
        pool = cfg.pool(family)  # checks SubnetMin/SubnetMax
        if pool is not None and pool.index(pool.first) > pool.index(pool.last):
            raise ConfigError(_FAMILIES[family].subnet_min, f"{pool.first.network_address} is "
                              f"above the subnet range's end {pool.last.network_address}")
    _int(cfg.vni, "Backend.VNI", 1, VNI_MAX)
    _int(cfg.port, "Backend.Port", 1, 65535)
    if cfg.mtu is not None:
        _int(cfg.mtu, "Backend.MTU", MIN_MTU + 50, 65535)
    if cfg.backend != "vxlan":
        raise ConfigError("Backend.Type", f"{cfg.backend!r} is not supported; use \"vxlan\"")


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes in its lease: enough for a peer to program it.

    `subnet` is the node's IPv4 subnet (None on an IPv6-only cluster),
    `subnet6` its IPv6 one (None unless IPv6 is enabled); at least one is set.
    `underlay_ip` is IPv4 or IPv6, whichever family the VXLAN packets use.
    """

    node: str
    subnet: IPv4Network | None
    underlay_ip: IPAddr
    vtep_mac: str
    grpc_addr: str = ""
    backend: str = "vxlan"
    # The node's membership signing key ("ed25519:<base64>", "" for none): etcd binds
    # the node name to it, and peers accept the node's word about itself (gossip) only
    # when signed with it.
    public_key: str = ""
    subnet6: IPv6Network | None = None

    def __post_init__(self) -> None:
        if self.subnet is None and self.subnet6 is None:
            raise ConfigError("subnet", "a lease needs an IPv4 or an IPv6 subnet")

    @property
    def key_subnet(self) -> IPNet:
        """The subnet the record is stored under: IPv4 when the node has one."""
        return self.subnet if self.subnet is not None else self.subnet6  # type: ignore[return-value]

    @property
    def subnets(self) -> tuple[IPNet, ...]:
        """IPv4 first."""
        return tuple(s for s in (self.subnet, self.subnet6) if s is not None)

    @property
    def lease_keys(self) -> tuple[IPNet, ...]:
        """Every etcd key of the lease: the record's, then the IPv6 claim if any."""
        return self.subnets

    def subnet_of(self, family: int) -> IPNet | None:
        return self.subnet if family == 4 else self.subnet6

    @property
    def vtep_ip(self) -> IPAddr:
        """The node's address on the VXLAN device in its primary family."""
        return vtep_address(self.key_subnet)

    @property
    def vtep_ips(self) -> tuple[IPAddr, ...]:
        return tuple(vtep_address(s) for s in self.subnets)

    @property
    def gateway(self) -> IPIface:
        """The bridge address of the primary family, the pods' default gateway."""
        return pod_gateway(self.key_subnet)

    @property
    def gateways(self) -> tuple[IPIface, ...]:
        return tuple(pod_gateway(s) for s in self.subnets)

    def with_(self, **changes: Any) -> NodeRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "node": self.node,
            "underlayIP": str(self.underlay_ip),
            "vtepMAC": self.vtep_mac,
            "grpcAddr": self.grpc_addr,
            "backend": self.backend,
        }
        if self.subnet is not None:
            doc["subnet"] = str(self.subnet)
        if self.subnet6 is not None:
            doc["ipv6Subnet"] = str(self.subnet6)
        if self.public_key:
            doc["publicKey"] = self.public_key
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeRecord:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("lease", f"not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError("lease", "expected a JSON object")
        subnet = parse_cidr(doc["subnet"], "subnet") if doc.get("subnet") is not None else None
        subnet6 = parse_cidr6(doc["ipv6Subnet"], "ipv6Subnet") \
            if doc.get("ipv6Subnet") is not None else None
        if subnet is None and subnet6 is None:
            raise ConfigError("subnet", "missing (and no ipv6Subnet)")
        grpc_addr = doc.get("grpcAddr", "")
        if not isinstance(grpc_addr, str):
            raise ConfigError("grpcAddr", f"expected a string, got {grpc_addr!r}")
        backend = doc.get("backend", "vxlan")
        if backend != "vxlan":
            raise ConfigError("backend", f"{backend!r} is not supported")
        return cls(
            node=check_node_name(doc.get("node")),
            subnet=subnet,
            underlay_ip=parse_underlay_ip(doc.get("underlayIP"), "underlayIP"),
            vtep_mac=parse_mac(doc.get("vtepMAC"), "vtepMAC"),
            grpc_addr=grpc_addr,
            backend=backend,
            public_key=parse_public_key(doc.get("publicKey")),
            subnet6=subnet6,
        )


@dataclass(frozen=True)
class LeaseEntry:
    """A node record as read from etcd, with where it came from."""

    record: NodeRecord
    mod_revision: int
    lease_id: int


@dataclass(frozen=True)
class LeaseSnapshot:
    """Every lease: `entries` by the key holding the record (`record.key_subnet`),
    `claims` by the IPv6 subnet of a dual-stack record (its second key)."""

    revision: int
    entries: dict[IPNet, LeaseEntry]
    invalid: list[tuple[str, str]] = field(default_factory=list)
    claims: dict[IPNet, LeaseEntry] = field(default_factory=dict)

    def taken(self) -> set[IPNet]:
        """Every subnet some node holds, of both families."""
        out: set[IPNet] = set(self.entries) | set(self.claims)
        for e in self.entries.values():
            out.update(e.record.subnets)
        return out


@dataclass(frozen=True)
class LeaseEvent:
    """A change to one lease key: `entry` is None when the key was deleted.
    `claim`: the key is the IPv6 claim of a dual-stack record, not the record's own."""

    subnet: IPNet
    entry: LeaseEntry | None
    revision: int
    claim: bool = False


def key_role(key_subnet: IPNet, record: NodeRecord) -> Literal["record", "claim", ""]:
    """What key `key_subnet` is for `record`: its own, its IPv6 claim, or neither."""
    if key_subnet == record.key_subnet:
        return "record"
    if record.subnet is not None and key_subnet == record.subnet6:
        return "claim"
    return ""


def subnet_key(prefix: str, subnet: IPNet) -> str:
    """/overlay/subnets/10.244.1.0-24 (flannel's key layout); /overlay/subnets/fd00::-64."""
    return f"{prefix}subnets/{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(prefix: str, key: str) -> IPNet | None:
    head = f"{prefix}subnets/"
    if not key.startswith(head):
        return None
    tail = key[len(head) :]
    addr, sep, length = tail.rpartition("-")
    if not sep or not length.isdigit():
        return None
    try:
        net = ip_network(f"{addr}/{length}", strict=True)
    except ValueError:
        return None
    return net if str(net.network_address) == addr else None


def config_key(prefix: str) -> str:
    return f"{prefix}network/config"


def normalize_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    if not prefix.endswith("/"):
        prefix += "/"
    return prefix
