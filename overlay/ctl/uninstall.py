"""`overlayctl uninstall`: remove everything overlay put on a node.

What overlayd and `install-cni` leave on a node when they stop (on purpose:
a restart must not disturb pods) is, all of it:

- devices: the VXLAN device `overlay.<VNI>` (with its routes, neighbour and
  FDB entries), the pod bridge `cni0`, and the host ends of pods' veths
  (`veth` + 11 hex digits, our naming) that are still there;
- nftables: the tables `overlay` (masquerading) and `overlay_vxlan` (the
  VXLAN filter, which keeps dropping UDP 8472 from non-members), of family
  `ip`, and `ip6` for IPv6 pods or an IPv6 underlay;
- files: the plugin `<bin-dir>/overlay` (the static executable),
  `<conf-dir>/10-overlay.conflist`, the DELs and GCs the plugin recorded
  while the agent was down (`cni-pending/` next to the conflist's
  agentSocket: moot once the veths and the run dir are gone), the run dir
  (/run/overlay: sockets, pod address allocations) and the state dir
  (/var/lib/overlay: node name, VTEP MAC, last subnet, peers);
- in etcd: this node's subnet lease (found by the node name in the state
  dir, or --node-name), so peers drop their entries for it at once instead
  of after the lease TTL.

It refuses while overlayd runs (its local API answers): a supervisor
(systemd, the kubelet) would start it again and it would rebuild what was
just removed. Stop it first. Not touched: net.ipv4.ip_forward (other
software relies on it), the kernel modules, the systemd unit files and the
network config in etcd (shared by every node: `etcdctl del
/overlay/network/config` once the last node is gone).

The work is planned first (`plan`, which only reads) and then applied, so
`--dry-run` prints exactly what a real run would remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.agent import masq, vxlanfilter
from overlay.cni.install import CONFLIST_NAME
from overlay.cni.wire import DEFAULT_SOCKET, PENDING_DIR
from overlay.devnames import BRIDGE_NAME, HOST_VETH_RE, is_vxlan_device
from overlay.errors import PermanentError, TemporaryError

NFT_TABLES = (masq.TABLE, vxlanfilter.TABLE)
NFT_FAMILIES = ("ip", "ip6")  # IPv4, IPv6 (a dual-stack node has both)


@dataclass(frozen=True)
class UninstallOptions:
    bin_dir: Path = Path("/opt/cni/bin")
    conf_dir: Path = Path("/etc/cni/net.d")
    run_dir: Path = Path("/run/overlay")
    state_dir: Path = Path("/var/lib/overlay")
    node_name: str | None = None
    etcd: Any = None  # overlay.etcdstore.EtcdOptions; None: leave the lease to expire


@dataclass(frozen=True)
class Action:
    kind: str  # link, nft, file, dir, lease
    what: str
    do: Callable[[], None] = field(compare=False, repr=False)


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def agent_running(run_dir: Path) -> Path | None:
    """The socket of an overlayd that answers in `run_dir`, or None."""
    for name in ("overlayd.sock", "cni.sock"):
        path = run_dir / name
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(path))
            except OSError:
                continue
            return path
    return None


def _links() -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, check=True)
    links: list[dict[str, Any]] = json.loads(out.stdout or b"[]")
    return links


def _kind(link: dict[str, Any]) -> str:
    return str((link.get("linkinfo") or {}).get("info_kind") or "")


def _del_link(name: str) -> Callable[[], None]:
    def do() -> None:
        p = subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)
        if p.returncode != 0 and b"Cannot find device" not in p.stderr:
            raise OSError(p.stderr.decode(errors="replace").strip())
    return do


def _nft_tables() -> set[tuple[str, str]]:
    """(family, name) of every nftables table of family ip or ip6."""
    p = subprocess.run(["nft", "list", "tables"], capture_output=True)
    if p.returncode != 0:
        return set()
    out = set()
    for line in p.stdout.decode().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "table" and words[1] in NFT_FAMILIES:
            out.add((words[1], words[2]))
    return out


def _del_table(family: str, name: str) -> Callable[[], None]:
    def do() -> None:
        p = subprocess.run(["nft", "delete", "table", family, name], capture_output=True)
        if p.returncode != 0:
            raise OSError(p.stderr.decode(errors="replace").strip())
    return do


def _unlink(path: Path) -> Callable[[], None]:
    return lambda: path.unlink(missing_ok=True)


def _clear_dir(path: Path) -> Callable[[], None]:
    """Remove the contents, then the directory itself unless it is a mount point
    (a hostPath volume in a container): empty is as good as gone there."""
    def do() -> None:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        try:
            path.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOENT):
                raise
    return do


def _check_dir(path: Path, flag: str) -> None:
    resolved = path.resolve()
    if resolved == Path("/") or len(resolved.parts) < 3:
        raise PermanentError(f"{flag} {path}: refusing to empty a top-level directory")


def pending_dir(conflist: Path) -> Path:
    """Where the plugin records a DEL or GC it could not hand to the agent: next to the
    conflist's agentSocket (the default socket's when there is no readable conflist)."""
    sock = DEFAULT_SOCKET
    try:
        doc = json.loads(conflist.read_bytes())
        first = doc["plugins"][0]
        if first.get("type") == "overlay" and isinstance(first.get("agentSocket"), str):
            sock = first["agentSocket"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass
    return Path(sock).parent / PENDING_DIR


def node_identity(opts: UninstallOptions) -> tuple[str | None, Any]:
    """(node name, subnet of the last lease) from the state dir, or --node-name."""
    from overlay.agent import state

    ident = state.load(opts.state_dir) if opts.state_dir.is_dir() else None
    if ident is not None:
        return opts.node_name or ident.node, ident.subnet
    return opts.node_name, None


def lease_actions(opts: UninstallOptions, node: str) -> tuple[list[Action], list[str]]:
    """The etcd keys held by `node`, each with the action that deletes it (only if
    still unchanged, so a subnet another node took meanwhile is left alone)."""
    from overlay.etcdstore import EtcdStore

    async def listing() -> Any:
        async with EtcdStore(opts.etcd) as store:
            return await store.list_leases(), store.prefix

    try:
        snap, prefix = asyncio.run(listing())
    except (TemporaryError, PermanentError) as exc:
        return [], [f"lease of node {node} in etcd: {exc}; it expires after its TTL "
                    "(overlayd --lease-ttl, 60 s by default)"]
    actions = []
    for entry in snap.entries.values():
        if entry.record.node != node:
            continue

        def delete(entry: Any = entry) -> None:
            async def go() -> None:
                async with EtcdStore(opts.etcd) as store:
                    if not await store.delete_lease(entry.record.subnet, entry.mod_revision):
                        raise OSError("changed meanwhile (another node holds it now?)")
                    if entry.lease_id:
                        with contextlib.suppress(TemporaryError, PermanentError):
                            await store.revoke(entry.lease_id)
            asyncio.run(go())

        key = f"{prefix}subnets/{entry.record.subnet.network_address}-" \
              f"{entry.record.subnet.prefixlen}"
        actions.append(Action("lease", f"etcd key {key} (node {node})", delete))
    return actions, []


def plan(opts: UninstallOptions) -> tuple[list[Action], list[str]]:
    """Everything to remove, and notes on what cannot be (read-only)."""
    _check_dir(opts.run_dir, "--run-dir")
    _check_dir(opts.state_dir, "--state-dir")
    running = agent_running(opts.run_dir)
    if running is not None:
        raise PermanentError(
            f"overlayd is running (it answers on {running}): stop it first "
            "(`systemctl stop overlayd`, or delete the DaemonSet), or it rebuilds what this "
            "removes; to leave the cluster while it runs, use `overlayctl leave`")
    actions: list[Action] = []
    notes: list[str] = []
    node, _ = node_identity(opts)
    if opts.etcd is not None:
        if node is None and opts.state_dir.is_dir():
            notes.append(f"lease in etcd: no node name in {opts.state_dir} and no --node-name; "
                         "it expires after its TTL")
        elif node is not None:
            more, why = lease_actions(opts, node)
            actions += more
            notes += why
    links = _links()
    for link in links:
        name, kind = str(link.get("ifname")), _kind(link)
        if kind == "vxlan" and is_vxlan_device(name):
            actions.append(Action("link", f"VXLAN device {name}", _del_link(name)))
    for link in links:
        name, kind = str(link.get("ifname")), _kind(link)
        if name == BRIDGE_NAME and kind == "bridge":
            actions.append(Action("link", f"pod bridge {name}", _del_link(name)))
        elif kind == "veth" and HOST_VETH_RE.match(name):
            actions.append(Action("link", f"pod veth {name}", _del_link(name)))
    tables = _nft_tables()
    for family in NFT_FAMILIES:
        for table in NFT_TABLES:
            if (family, table) in tables:
                actions.append(Action("nft", f"nftables table {family} {table}",
                                      _del_table(family, table)))
    pending = pending_dir(opts.conf_dir / CONFLIST_NAME)
    if pending.is_dir():
        n = sum(1 for _ in pending.glob("*.req"))
        actions.append(Action("dir", f"{pending}/ ({n} DEL/GC recorded while overlayd was "
                              "down; the veths and addresses they would release go too)",
                              _clear_dir(pending)))
    for path in (opts.bin_dir / "overlay", opts.conf_dir / CONFLIST_NAME):
        if path.is_file() or path.is_symlink():
            actions.append(Action("file", str(path), _unlink(path)))
    for path in (opts.run_dir, opts.state_dir):
        if path.is_dir():
            actions.append(Action("dir", f"{path}/ (and everything in it)", _clear_dir(path)))
    return actions, notes


def apply(actions: list[Action]) -> Outcome:
    out = Outcome()
    for a in actions:
        try:
            a.do()
        except (OSError, TemporaryError, PermanentError) as exc:
            out.failed.append(f"{a.what}: {exc}")
        else:
            out.done.append(a.what)
    return out
