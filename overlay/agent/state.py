"""The node's identity, persisted in the state dir (/var/lib/overlay by default).

It survives restarts and reboots, so a node comes back with the same name,
the same VTEP MAC (peers' neighbour entries stay right) and asks for the
same subnet first (running pods keep their addresses).

Next to it, the last network config and the last listing of the leases:
with them an agent that starts while etcd is unreachable still comes up
(degraded), programs the peers it knew, and gossips its own record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass
from ipaddress import IPv6Network
from pathlib import Path

from overlay.errors import ConfigError
from overlay.model import (
    IPNet,
    LeaseEntry,
    LeaseSnapshot,
    NetworkConfig,
    NodeRecord,
    check_node_name,
    key_role,
    parse_cidr6,
    parse_mac,
    parse_subnet,
)

log = logging.getLogger(__name__)

STATE_FILE = "node.json"
NETWORK_FILE = "network.json"
PEERS_FILE = "peers.json"
KEY_FILE = "node.key"


@dataclass(frozen=True)
class Identity:
    node: str
    vtep_mac: str
    subnet: IPNet | None = None  # the lease's key subnet (IPv4 when it has one)
    lease_revision: int = 0     # etcd mod_revision of our lease key when last written
    incarnation: int = 0        # membership incarnation of the last start
    subnet6: IPv6Network | None = None  # the IPv6 subnet of a dual-stack lease

    @property
    def subnets(self) -> tuple[IPNet, ...]:
        return tuple(s for s in (self.subnet, self.subnet6) if s is not None)


def random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02  # locally administered, unicast
    return ":".join(f"{x:02x}" for x in b)


def atomic_write(path: Path, data: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(state_dir: Path) -> Identity | None:
    path = state_dir / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); starting with a new identity", path, exc)
        return None
    try:
        subnet = parse_subnet(doc["subnet"], "subnet") if doc.get("subnet") else None
        subnet6 = parse_cidr6(doc["ipv6Subnet"], "ipv6Subnet") if doc.get("ipv6Subnet") \
            else None
        return Identity(check_node_name(doc.get("node")), parse_mac(doc.get("vtepMAC")), subnet,
                        _nonneg(doc.get("leaseRevision", 0)), _nonneg(doc.get("incarnation", 0)),
                        subnet6 if subnet6 != subnet else None)
    except (ConfigError, KeyError, TypeError) as exc:
        log.warning("ignoring invalid %s (%s); starting with a new identity", path, exc)
        return None


def _nonneg(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"expected a non-negative integer, got {v!r}")
    return v


def save(state_dir: Path, ident: Identity) -> None:
    doc = {"node": ident.node, "vtepMAC": ident.vtep_mac,
           "subnet": str(ident.subnet) if ident.subnet else None,
           "leaseRevision": ident.lease_revision, "incarnation": ident.incarnation}
    if ident.subnet6 is not None and ident.subnet6 != ident.subnet:
        doc["ipv6Subnet"] = str(ident.subnet6)
    atomic_write(state_dir / STATE_FILE, json.dumps(doc, indent=2) + "\n")


def resolve(state_dir: Path, node_name: str | None, vtep_mac: str | None) -> Identity:
    """Flags win over the persisted identity, which wins over defaults."""
    saved = load(state_dir)
    if node_name:
        name = check_node_name(node_name, "--node-name")
    elif saved is not None:
        name = saved.node
    else:
        name = check_node_name(socket.gethostname().split(".")[0], "hostname")
    if vtep_mac:
        mac = parse_mac(vtep_mac, "--vtep-mac")
    elif saved is not None:
        mac = saved.vtep_mac
    else:
        mac = random_mac()
    same = saved is not None and saved.node == name
    subnet = saved.subnet if saved is not None and same else None
    if saved is not None and not same:
        log.warning("node name changed from %s to %s: not reusing %s's subnet",
                    saved.node, name, saved.node)
    ident = Identity(name, mac, subnet, saved.lease_revision if saved and same else 0,
                     saved.incarnation if saved and same else 0,
                     saved.subnet6 if saved is not None and same else None)
    save(state_dir, ident)
    return ident


def signing_key(state_dir: Path) -> bytes:
    """This node's membership signing key (ed25519, raw private bytes), made on first use
    and kept in <state dir>/node.key (PKCS#8 PEM, mode 0600). Its public half goes into
    our lease; peers accept our word about ourselves only when signed with it, so a new
    key is trusted once etcd holds our lease with it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = state_dir / KEY_FILE
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, Ed25519PrivateKey):
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return key.private_bytes_raw()
        log.warning("ignoring %s: not an ed25519 key; making a new one", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s); making a new signing key: peers accept our "
                    "gossip once etcd holds our lease with it", path, exc)
    new = Ed25519PrivateKey.generate()
    pem = new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem.decode(), mode=0o600)
    log.info("made a membership signing key in %s", path)
    return new.private_bytes_raw()


def next_incarnation(previous: int, now_ms: int) -> int:
    """The membership incarnation of a new start: above the last one even if the clock
    went back, and time-based so that a lost state dir still gives a higher one."""
    return max(previous + 1, now_ms)


def save_network(state_dir: Path, cfg: NetworkConfig) -> None:
    atomic_write(state_dir / NETWORK_FILE, cfg.to_json() + "\n")


def load_network(state_dir: Path) -> NetworkConfig | None:
    path = state_dir / NETWORK_FILE
    try:
        return NetworkConfig.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ConfigError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return None


def save_peers(state_dir: Path, snap: LeaseSnapshot) -> None:
    """The last listing of the leases (with etcd revisions), for a start without etcd."""
    doc = {"revision": snap.revision,
           "leases": [{"record": json.loads(e.record.to_json()), "modRevision": e.mod_revision,
                       "lease": e.lease_id} for _, e in sorted(snap.entries.items())]}
    atomic_write(state_dir / PEERS_FILE, json.dumps(doc, indent=1) + "\n")


def load_peers(state_dir: Path) -> LeaseSnapshot | None:
    path = state_dir / PEERS_FILE
    try:
        doc = json.loads(path.read_text())
        entries: dict[IPNet, LeaseEntry] = {}
        claims: dict[IPNet, LeaseEntry] = {}
        for item in doc["leases"]:
            rec = NodeRecord.from_json(json.dumps(item["record"]))
            entry = LeaseEntry(rec, _nonneg(item["modRevision"]), _nonneg(item.get("lease", 0)))
            entries[rec.key_subnet] = entry
            for k in rec.lease_keys:
                if key_role(k, rec) == "claim":
                    claims[k] = entry
        return LeaseSnapshot(_nonneg(doc["revision"]), entries, [], claims)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ConfigError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc)
        return None
