"""The node's identity, persisted in the state dir (/var/lib/overlay by default).

It survives restarts and reboots, so a node comes back with the same name,
the same VTEP MAC (peers' neighbour entries stay right) and asks for the
same subnet first (running pods keep their addresses).
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
from ipaddress import IPv4Network
from pathlib import Path

from overlay.errors import ConfigError
from overlay.model import check_node_name, parse_cidr, parse_mac

log = logging.getLogger(__name__)

STATE_FILE = "node.json"


@dataclass(frozen=True)
class Identity:
    node: str
    vtep_mac: str
    subnet: IPv4Network | None = None


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
        subnet = parse_cidr(doc["subnet"], "subnet") if doc.get("subnet") else None
        return Identity(check_node_name(doc.get("node")), parse_mac(doc.get("vtepMAC")), subnet)
    except (ConfigError, KeyError, TypeError) as exc:
        log.warning("ignoring invalid %s (%s); starting with a new identity", path, exc)
        return None


def save(state_dir: Path, ident: Identity) -> None:
    doc = {"node": ident.node, "vtepMAC": ident.vtep_mac,
           "subnet": str(ident.subnet) if ident.subnet else None}
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
    subnet = saved.subnet if saved is not None and saved.node == name else None
    if saved is not None and saved.node != name:
        log.warning("node name changed from %s to %s: not reusing %s's subnet",
                    saved.node, name, saved.node)
    ident = Identity(name, mac, subnet)
    save(state_dir, ident)
    return ident
