"""Pod address allocation from the node's subnet, kept in files.

Layout under the IPAM dir (default /run/overlay/ipam: allocations are for
running pods, which do not outlive a reboot):
  ip/<a.b.c.d>      "containerID\\nifname\\n"   the allocation itself
  att/<hash>        "a.b.c.d\\ncontainerID\\nifname\\n"   lookup by attachment
  last_reserved     where the next search starts (addresses are not reused at once)
  lock              flock()ed around every change

Creating ip/<addr> with O_EXCL is the allocation, so two allocators can never
hand out the same address; the lock makes the pair of files consistent for
any other process that reads or changes them.

One directory per address family: /run/overlay/ipam for IPv4 (as before
IPv6 existed) and /run/overlay/ipam6 for IPv6, in the same format, so a
dual-stack pod has an attachment record in each.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path


class AddressesExhausted(Exception):
    pass


@dataclass(frozen=True)
class Allocation:
    ip: IPv4Address | IPv6Address
    container_id: str
    ifname: str


def ipam_dirs(base: Path | str) -> tuple[Path, Path]:
    """(the IPv4 IPAM dir, the IPv6 one) next to each other under `base`."""
    return Path(base) / "ipam", Path(base) / "ipam6"


def attachment_key(container_id: str, ifname: str) -> str:
    return hashlib.sha256(f"{container_id}\0{ifname}".encode()).hexdigest()[:40]


class Ipam:
    def __init__(self, directory: Path | str) -> None:
        self.dir = Path(directory)
        self.ip_dir = self.dir / "ip"
        self.att_dir = self.dir / "att"
        self.ip_dir.mkdir(parents=True, exist_ok=True)
        self.att_dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def find(self, container_id: str, ifname: str) -> Allocation | None:
        try:
            text = (self.att_dir / attachment_key(container_id, ifname)).read_text()
        except FileNotFoundError:
            return None
        lines = text.split("\n")
        if len(lines) < 3 or lines[1] != container_id or lines[2] != ifname:
            return None
        try:
            return Allocation(ip_address(lines[0]), container_id, ifname)
        except ValueError:
            return None

    def allocate(self, subnet: IPv4Network | IPv6Network, container_id: str,
                 ifname: str) -> Allocation:
        """An address for the attachment: the one it already has, or the next free one."""
        with self.locked():
            have = self.find(container_id, ifname)
            if have is not None and have.ip in subnet:
                return have
            first = int(subnet.network_address) + 2  # .0 VTEP, .1 gateway
            # IPv4 keeps its broadcast address out; IPv6 has none.
            last = int(subnet.broadcast_address) - (1 if subnet.version == 4 else 0)
            if last < first:
                raise AddressesExhausted(f"{subnet} has no room for pods")
            start = self._last_reserved(subnet)
            start = start + 1 if start is not None and first <= start < last else first
            size = last - first + 1
            make = IPv4Address if subnet.version == 4 else IPv6Address
            for i in range(size):
                ip = make(first + (start - first + i) % size)
                try:
                    fd = os.open(self.ip_dir / str(ip),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(f"{container_id}\n{ifname}\n")
                (self.att_dir / attachment_key(container_id, ifname)).write_text(
                    f"{ip}\n{container_id}\n{ifname}\n")
                (self.dir / "last_reserved").write_text(f"{ip}\n")
                return Allocation(ip, container_id, ifname)
        raise AddressesExhausted(f"all {size} pod addresses of {subnet} are allocated")

    def _last_reserved(self, subnet: IPv4Network | IPv6Network) -> int | None:
        try:
            ip = ip_address((self.dir / "last_reserved").read_text().strip())
        except (OSError, ValueError):
            return None
        return int(ip) if ip in subnet else None

    def release(self, container_id: str, ifname: str) -> Allocation | None:
        with self.locked():
            have = self.find(container_id, ifname)
            att = self.att_dir / attachment_key(container_id, ifname)
            with contextlib.suppress(FileNotFoundError):
                att.unlink()
            if have is None:
                return None
            path = self.ip_dir / str(have.ip)
            try:
                owner = path.read_text().split("\n")
            except FileNotFoundError:
                return have
            if owner[:2] == [container_id, ifname]:
                path.unlink()
            return have

    def all(self) -> list[Allocation]:
        out = []
        for p in self.ip_dir.iterdir():
            try:
                ip = ip_address(p.name)
                cid, ifname = p.read_text().split("\n")[:2]
            except (OSError, ValueError):
                continue
            out.append(Allocation(ip, cid, ifname))
        return sorted(out, key=lambda a: (a.ip.version, int(a.ip)))

    def gc(self, valid: Iterable[tuple[str, str]]) -> list[Allocation]:
        """Release every allocation whose attachment is not in `valid`."""
        keep = set(valid)
        gone = []
        for a in self.all():
            if (a.container_id, a.ifname) not in keep:
                released = self.release(a.container_id, a.ifname)
                if released is not None:
                    gone.append(released)
        return gone

    def repair(self) -> int:
        """Make ip/ and att/ agree after a crash between the two writes."""
        fixed = 0
        with self.locked():
            allocs = {a.ip: a for a in self.all()}
            for a in allocs.values():
                att = self.att_dir / attachment_key(a.container_id, a.ifname)
                if not att.exists():
                    att.write_text(f"{a.ip}\n{a.container_id}\n{a.ifname}\n")
                    fixed += 1
            for p in self.att_dir.iterdir():
                try:
                    ip_s, cid, ifname = p.read_text().split("\n")[:3]
                    ok = allocs.get(ip_address(ip_s)) == Allocation(ip_address(ip_s), cid, ifname)
                except (OSError, ValueError):
                    ok = False
                if not ok:
                    p.unlink(missing_ok=True)
                    fixed += 1
        return fixed
