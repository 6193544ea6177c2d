"""Records that cross boundaries: the network config and the node lease.

Pure data with validation and (de)serialisation; no I/O. The network config
uses flannel's net-conf.json keys so that an existing flannel config can be
reused as is.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address, ip_network
from typing import Any

from overlay.errors import ConfigError

VNI_MAX = 16_777_215
# Smallest usable subnet: .0 is the node's VTEP address, .1 the bridge
# gateway, the last address broadcast; a /29 leaves five pod addresses.
MAX_SUBNET_LEN = 29
MAX_CIDR_PREFIX = 28



def pod_gateway(subnet: IPv4Network) -> IPv4Interface:
    """The bridge address of a node subnet, the pods' default gateway: its first host."""
    return IPv4Interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


RESERVED = (
    (ip_network("0.0.0.0/8"), "'this network' (0.0.0.0/8)"),
    (ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16)"),
    (ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ip_network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
)

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


def _ipv4(value: object, field: str) -> IPv4Address:
    try:
        addr = ip_address(value)  # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise ConfigError(field, f"{value!r} is not an IPv4 address") from None
    if not isinstance(addr, IPv4Address):
        raise ConfigError(field, f"{value} is IPv6; only an IPv4 underlay is supported")
    return addr


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(field, f"{value} is outside {lo}..{hi}")
    return value


def parse_cidr(value: object, field: str = "Network") -> IPv4Network:
    if not isinstance(value, str):
        raise ConfigError(field, f"expected a CIDR string such as 10.244.0.0/16, got {value!r}")
    try:
        net = ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(field, f"{value!r} is not a CIDR such as 10.244.0.0/16") from None
    if not isinstance(net, IPv4Network):
        raise ConfigError(field, f"{value} is IPv6; the pod network must be IPv4")
    if str(net) != value.strip():
        raise ConfigError(field, f"{value} has host bits set; did you mean {net}?")
    return net


@dataclass(frozen=True)
class NetworkConfig:
    """The cluster network, stored at <prefix>network/config."""

    network: IPv4Network
    subnet_len: int = 24
    vni: int = 1
    port: int = 8472
    backend: str = "vxlan"

    def __post_init__(self) -> None:
        validate_network(self)

    @property
    def subnet_count(self) -> int:
        return int(2 ** (self.subnet_len - self.network.prefixlen))

    def to_json(self) -> str:
        return json.dumps(
            {
                "Network": str(self.network),
                "SubnetLen": self.subnet_len,
                "Backend": {"Type": self.backend, "VNI": self.vni, "Port": self.port},
            },
            sort_keys=True,
        )

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
        unknown = sorted(set(doc) - {"Network", "SubnetLen", "Backend"})
        if unknown:
            raise ConfigError(unknown[0], "unsupported key (known: Network, SubnetLen, Backend)")
        if "Network" not in doc:
            raise ConfigError("Network", "missing; set the cluster CIDR, e.g. 10.244.0.0/16")
        network = parse_cidr(doc["Network"])
        subnet_len = _int(doc.get("SubnetLen", 24), "SubnetLen", 0, 32)
        backend = doc.get("Backend", {})
        if not isinstance(backend, dict):
            raise ConfigError("Backend", f"expected an object, got {backend!r}")
        extra = sorted(set(backend) - {"Type", "VNI", "Port"})
        if extra:
            raise ConfigError(f"Backend.{extra[0]}", "unsupported key (known: Type, VNI, Port)")
        btype = backend.get("Type", "vxlan")
        if btype != "vxlan":
            raise ConfigError("Backend.Type", f"{btype!r} is not supported; use \"vxlan\"")
        vni = _int(backend.get("VNI", 1), "Backend.VNI", 1, VNI_MAX)
        port = _int(backend.get("Port", 8472), "Backend.Port", 1, 65535)
        return cls(network=network, subnet_len=subnet_len, vni=vni, port=port)


def validate_network(cfg: NetworkConfig, avoid: tuple[IPv4Network, ...] = ()) -> None:
    """Raise ConfigError naming the key if `cfg` cannot work.

    `avoid` lists networks the cluster CIDR must not overlap, such as the
    underlay networks of the hosts.
    """
    net = cfg.network
    for reserved, what in RESERVED:
        if net.overlaps(reserved):
            raise ConfigError("Network", f"{net} overlaps {what}")
    for other in avoid:
        if net.overlaps(other):
            raise ConfigError(
                "Network",
                f"{net} overlaps {other}, which is in use on this host; "
                "pod addresses would be unreachable",
            )
    if net.prefixlen > MAX_CIDR_PREFIX:
        raise ConfigError("Network", f"{net} is too small: use a /{MAX_CIDR_PREFIX} or larger")
    if not isinstance(cfg.subnet_len, int) or isinstance(cfg.subnet_len, bool):
        raise ConfigError("SubnetLen", f"expected an integer, got {cfg.subnet_len!r}")
    if cfg.subnet_len < net.prefixlen:
        raise ConfigError(
            "SubnetLen",
            f"a /{cfg.subnet_len} per node does not fit in {net}; "
            f"use a length between {net.prefixlen} and {MAX_SUBNET_LEN}",
        )
    if cfg.subnet_len > MAX_SUBNET_LEN:
        raise ConfigError(
            "SubnetLen", f"/{cfg.subnet_len} leaves no room for pods; use /{MAX_SUBNET_LEN} or less"
        )
    _int(cfg.vni, "Backend.VNI", 1, VNI_MAX)
    _int(cfg.port, "Backend.Port", 1, 65535)
    if cfg.backend != "vxlan":
        raise ConfigError("Backend.Type", f"{cfg.backend!r} is not supported; use \"vxlan\"")


@dataclass(frozen=True)
class NodeRecord:
    """What a node publishes in its lease: enough for a peer to program it."""

    node: str
    subnet: IPv4Network
    underlay_ip: IPv4Address
    vtep_mac: str
    grpc_addr: str = ""
    backend: str = "vxlan"
    # The node's membership signing key ("ed25519:<base64>", "" for none): etcd binds
    # the node name to it, and peers accept the node's word about itself (gossip) only
    # when signed with it.
    public_key: str = ""

    @property
    def vtep_ip(self) -> IPv4Address:
        """The node's address on the VXLAN device: its subnet's network address."""
        return self.subnet.network_address

    @property
    def gateway(self) -> IPv4Interface:
        return pod_gateway(self.subnet)

    def with_(self, **changes: Any) -> NodeRecord:
        return replace(self, **changes)

    def to_json(self) -> str:
        doc = {
            "node": self.node,
            "subnet": str(self.subnet),
            "underlayIP": str(self.underlay_ip),
            "vtepMAC": self.vtep_mac,
            "grpcAddr": self.grpc_addr,
            "backend": self.backend,
        }
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
        subnet = parse_cidr(doc.get("subnet"), "subnet")
        grpc_addr = doc.get("grpcAddr", "")
        if not isinstance(grpc_addr, str):
            raise ConfigError("grpcAddr", f"expected a string, got {grpc_addr!r}")
        backend = doc.get("backend", "vxlan")
        if backend != "vxlan":
            raise ConfigError("backend", f"{backend!r} is not supported")
        return cls(
            node=check_node_name(doc.get("node")),
            subnet=subnet,
            underlay_ip=_ipv4(doc.get("underlayIP"), "underlayIP"),
            vtep_mac=parse_mac(doc.get("vtepMAC"), "vtepMAC"),
            grpc_addr=grpc_addr,
            backend=backend,
            public_key=parse_public_key(doc.get("publicKey")),
        )


@dataclass(frozen=True)
class LeaseEntry:
    """A node record as read from etcd, with where it came from."""

    record: NodeRecord
    mod_revision: int
    lease_id: int


@dataclass(frozen=True)
class LeaseSnapshot:
    revision: int
    entries: dict[IPv4Network, LeaseEntry]
    invalid: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class LeaseEvent:
    """A change to one lease key: `entry` is None when the key was deleted."""

    subnet: IPv4Network
    entry: LeaseEntry | None
    revision: int


def subnet_key(prefix: str, subnet: IPv4Network) -> str:
    """/overlay/subnets/10.244.1.0-24: flannel's key layout."""
    return f"{prefix}subnets/{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(prefix: str, key: str) -> IPv4Network | None:
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
    return net if isinstance(net, IPv4Network) else None


def config_key(prefix: str) -> str:
    return f"{prefix}network/config"


def normalize_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    if not prefix.endswith("/"):
        prefix += "/"
    return prefix
