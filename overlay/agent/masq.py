"""Egress masquerading for pods, in the node's own nftables tables.

  table ip overlay {                          # and the same `table ip6 overlay`
    set masq_pods { type ipv4_addr; }         #   (ipv6_addr, ip6 saddr) for IPv6 pods
    chain postrouting {
      type nat hook postrouting priority srcnat;
      ip saddr @masq_pods ip daddr != <cluster> masquerade
      ip saddr <node subnet> ip daddr != <cluster> masquerade   # with overlayd --ip-masq
    }
  }

Traffic between pods (destination inside the cluster network) is never
translated. There is one table per pod address family the cluster has. The
tables are ours alone: rebuilt from scratch when the agent starts and
deleted when it stops. Pods that asked for masquerading are remembered in
<run-dir>/masq/ so a restarted agent puts them back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network, ip_address
from pathlib import Path

from overlay.agent.nft import NftCommand, Runner
from overlay.errors import TemporaryError
from overlay.log import change_fields
from overlay.model import IPAddr, IPNet

log = logging.getLogger(__name__)

TABLE = "overlay"
Networks = IPNet | tuple[IPNet, ...] | None


def _nets(value: Networks) -> tuple[IPNet, ...]:
    if value is None:
        return ()
    if isinstance(value, IPv4Network | IPv6Network):
        return (value,)
    return tuple(value)


def _fam(version: int) -> tuple[str, str, str]:
    """(nft table family, set type, address match) for an IP version."""
    return ("ip", "ipv4_addr", "ip") if version == 4 else ("ip6", "ipv6_addr", "ip6")


class NftMasquerade:
    def __init__(
        self,
        cluster: Callable[[], Networks],
        node_subnet: Callable[[], Networks],
        state_dir: Path,
        whole_node: bool = False,
        nft: Runner | None = None,
    ) -> None:
        self.nft = nft or NftCommand()
        self.cluster = cluster
        self.node_subnet = node_subnet
        self.dir = state_dir
        self.whole_node = whole_node
        self._built_for: tuple[tuple[IPNet, ...], tuple[IPNet, ...]] | None = None
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return self._built_for is not None

    def _pods(self) -> list[IPAddr]:
        out: list[IPAddr] = []
        if self.dir.exists():
            for p in self.dir.iterdir():
                try:
                    out.append(ip_address(p.name))
                except ValueError:
                    continue
        return sorted(out, key=lambda a: (a.version, int(a)))

    def has_pods(self) -> bool:
        return bool(self._pods())

    async def ensure(self) -> None:
        """(Re)build the tables for the current cluster networks and node subnets."""
        async with self._lock:
            await self._ensure_locked()

    def _families(self) -> tuple[int, ...]:
        built = self._built_for
        return tuple(sorted({c.version for c in built[0]})) if built else ()

    async def _ensure_locked(self) -> None:
        clusters, subnets = _nets(self.cluster()), _nets(self.node_subnet())
        if not clusters:
            raise TemporaryError("masquerading needs the cluster network config first")
        if self._built_for == (clusters, subnets):
            return
        pods = self._pods()
        script = ""
        for old in set(self._families()) - {c.version for c in clusters}:
            tfam = _fam(old)[0]
            script += f"table {tfam} {TABLE} {{}}\ndelete table {tfam} {TABLE}\n"
        rules = []
        for cluster in clusters:
            tfam, stype, match = _fam(cluster.version)
            mine = [p for p in pods if p.version == cluster.version]
            subnet = next((s for s in subnets if s.version == cluster.version), None)
            elements = f"elements = {{ {', '.join(map(str, mine))} }}" if mine else ""
            node_rule = (f"{match} saddr {subnet} {match} daddr != {cluster} masquerade"
                         if self.whole_node and subnet is not None else "")
            rules.append(node_rule)
            script += (
                f"table {tfam} {TABLE} {{}}\n"
                f"delete table {tfam} {TABLE}\n"
                f"table {tfam} {TABLE} {{\n"
                f"  set masq_pods {{ type {stype}; {elements} }}\n"
                f"  chain postrouting {{\n"
                f"    type nat hook postrouting priority srcnat; policy accept;\n"
                f"    {match} saddr @masq_pods {match} daddr != {cluster} masquerade\n"
                f"    {node_rule}\n"
                f"  }}\n"
                f"}}\n"
            )
        await self.nft.run(script)
        self._built_for = (clusters, subnets)
        node_wide = any(rules)
        where = " and ".join(str(s) for s in subnets)
        why = ("overlayd --ip-masq" if node_wide else "pods whose CNI config sets ipMasq") + \
            f"; the node subnet is {where or '-'}"
        tables = ", ".join(f"{_fam(c.version)[0]} {TABLE}" for c in clusters)
        log.info("nftables table %s: masquerading %s leaving %s (%s)", tables,
                 f"{len(pods)} pod(s)" + (f" and all of {where}" if node_wide else ""),
                 " and ".join(map(str, clusters)), why,
                 extra=change_fields("nft", "create", why, table=tables))

    async def discard(self) -> None:
        """Remove a table an earlier overlayd left when it was killed: with no pod
        asking for masquerading any more, its elements are addresses since released."""
        async with self._lock:
            if self._built_for is not None:
                return
            try:
                await self.nft.run("".join(f"table {t} {TABLE} {{}}\ndelete table {t} {TABLE}\n"
                                      for t in ("ip", "ip6")))
            except TemporaryError as exc:
                log.warning("could not remove a stale nftables table %s: %s", TABLE, exc)

    async def add(self, ip: IPAddr) -> None:
        async with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / str(ip)).touch()
            if self._built_for is None:
                await self._ensure_locked()  # the new element is included
                return
            await self.nft.run(f"add element {_fam(ip.version)[0]} {TABLE} masq_pods {{ {ip} }}\n")
            why = "its CNI config sets ipMasq"
            log.info("nftables: masquerading pod %s (%s)", ip, why,
                     extra=change_fields("nft", "add", why, element=str(ip)))

    async def remove(self, ip: IPAddr) -> None:
        async with self._lock:
            marker = self.dir / str(ip)
            if not marker.exists():
                return
            marker.unlink(missing_ok=True)
            if self._built_for is not None:
                try:
                    await self.nft.run(f"delete element {_fam(ip.version)[0]} {TABLE} masq_pods "
                                  f"{{ {ip} }}\n")
                    why = "the pod was deleted"
                    log.info("nftables: no longer masquerading %s (%s)", ip, why,
                             extra=change_fields("nft", "del", why, element=str(ip)))
                except TemporaryError as exc:
                    log.warning("could not remove %s from the masquerade set: %s", ip, exc)

    async def close(self) -> None:
        if self._built_for is None:
            return
        tables = [f"{_fam(f)[0]} {TABLE}" for f in self._families()]
        try:
            await self.nft.run("".join(f"delete table {t}\n" for t in tables))
            why = "overlayd is stopping"
            log.info("nftables table %s removed (%s)", ", ".join(tables), why,
                     extra=change_fields("nft", "delete", why, table=", ".join(tables)))
        except TemporaryError as exc:
            log.warning("could not remove nftables table %s: %s", ", ".join(tables), exc)
        self._built_for = None
