"""Egress masquerading for pods, in the node's own nftables table.

  table ip overlay {
    set masq_pods { type ipv4_addr; }       # pods whose CNI config sets ipMasq
    chain postrouting {
      type nat hook postrouting priority srcnat;
      ip saddr @masq_pods ip daddr != <cluster> masquerade
      ip saddr <node subnet> ip daddr != <cluster> masquerade   # with overlayd --ip-masq
    }
  }

Traffic between pods (destination inside the cluster network) is never
translated. The table is ours alone: it is rebuilt from scratch when the
agent starts and deleted when it stops. Pods that asked for masquerading are
remembered in <run-dir>/masq/ so a restarted agent puts them back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from overlay.agent.nft import NftCommand, Runner
from overlay.errors import TemporaryError
from overlay.log import change_fields

log = logging.getLogger(__name__)

TABLE = "overlay"


class NftMasquerade:
    def __init__(
        self,
        cluster: Callable[[], IPv4Network | None],
        node_subnet: Callable[[], IPv4Network | None],
        state_dir: Path,
        whole_node: bool = False,
        nft: Runner | None = None,
    ) -> None:
        self.nft = nft or NftCommand()
        self.cluster = cluster
        self.node_subnet = node_subnet
        self.dir = state_dir
        self.whole_node = whole_node
        self._built_for: tuple[IPv4Network | None, IPv4Network | None] | None = None
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self._built_for is not None

    def _pods(self) -> list[IPv4Address]:
        out = []
        if self.dir.exists():
            for p in self.dir.iterdir():
                try:
                    out.append(IPv4Address(p.name))
                except ValueError:
                    continue
        return sorted(out)

    def has_pods(self) -> bool:
        return bool(self._pods())

    async def ensure(self) -> None:
        """(Re)build the table for the current cluster network and node subnet."""
        async with self._lock:
            await self._ensure_locked()

    async def _ensure_locked(self) -> None:
        cluster, subnet = self.cluster(), self.node_subnet()
        if cluster is None:
            raise TemporaryError("masquerading needs the cluster network config first")
        if self._built_for == (cluster, subnet):
            return
        pods = self._pods()
        elements = f"elements = {{ {', '.join(map(str, pods))} }}" if pods else ""
        node_rule = (f"ip saddr {subnet} ip daddr != {cluster} masquerade"
                     if self.whole_node and subnet is not None else "")
        script = (
            f"table ip {TABLE} {{}}\n"
            f"delete table ip {TABLE}\n"
            f"table ip {TABLE} {{\n"
            f"  set masq_pods {{ type ipv4_addr; {elements} }}\n"
            f"  chain postrouting {{\n"
            f"    type nat hook postrouting priority srcnat; policy accept;\n"
            f"    ip saddr @masq_pods ip daddr != {cluster} masquerade\n"
            f"    {node_rule}\n"
            f"  }}\n"
            f"}}\n"
        )
        await self.nft.run(script)
        self._built_for = (cluster, subnet)
        why = ("overlayd --ip-masq" if node_rule else "pods whose CNI config sets ipMasq") + \
            f"; the node subnet is {subnet}"
        log.info("nftables table ip %s: masquerading %s leaving %s (%s)", TABLE,
                 f"{len(pods)} pod(s)" + (f" and all of {subnet}" if node_rule else ""), cluster,
                 why, extra=change_fields("nft", "create", why, table=f"ip {TABLE}"))

    async def discard(self) -> None:
        """Remove a table an earlier overlayd left when it was killed: with no pod
        asking for masquerading any more, its elements are addresses since released."""
        async with self._lock:
            if self._built_for is not None:
                return
            try:
                await self.nft.run(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")
            except TemporaryError as exc:
                log.warning("could not remove a stale nftables table ip %s: %s", TABLE, exc)

    async def add(self, ip: IPv4Address) -> None:
        async with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / str(ip)).touch()
            if self._built_for is None:
                await self._ensure_locked()  # the new element is included
                return
            await self.nft.run(f"add element ip {TABLE} masq_pods {{ {ip} }}\n")
            why = "its CNI config sets ipMasq"
            log.info("nftables: masquerading pod %s (%s)", ip, why,
                     extra=change_fields("nft", "add", why, element=str(ip)))

    async def remove(self, ip: IPv4Address) -> None:
        async with self._lock:
            marker = self.dir / str(ip)
            if not marker.exists():
                return
            marker.unlink(missing_ok=True)
            if self._built_for is not None:
                try:
                    await self.nft.run(f"delete element ip {TABLE} masq_pods {{ {ip} }}\n")
                    why = "the pod was deleted"
                    log.info("nftables: no longer masquerading %s (%s)", ip, why,
                             extra=change_fields("nft", "del", why, element=str(ip)))
                except TemporaryError as exc:
                    log.warning("could not remove %s from the masquerade set: %s", ip, exc)

    async def close(self) -> None:
        if self._built_for is None:
            return
        try:
            await self.nft.run(f"delete table ip {TABLE}\n")
            why = "overlayd is stopping"
            log.info("nftables table ip %s removed (%s)", TABLE, why,
                     extra=change_fields("nft", "delete", why, table=f"ip {TABLE}"))
        except TemporaryError as exc:
            log.warning("could not remove nftables table ip %s: %s", TABLE, exc)
        self._built_for = None
