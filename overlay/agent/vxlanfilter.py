"""Accept VXLAN only from cluster members.

Anyone on the underlay can send UDP to port 8472 and the kernel decapsulates
it into our pods' network; neither flannel nor Weave's fast datapath stops
that. Each node keeps its own nftables table:

  table ip overlay_vxlan {
    set members { type ipv4_addr; }          # underlay IPs of current peers
    chain input {
      type filter hook input priority -150; policy accept;
      udp dport 8472 ip saddr != @members counter drop
    }
  }

Over an IPv6 underlay the table is `ip6 overlay_vxlan` (type ipv6_addr,
`ip6 saddr`). The set is replaced in one nft transaction whenever the peer
set changes, so there is never a moment with a half-written list. The table survives agent
restarts (protection does not lapse while overlayd is down) and is removed
on a graceful leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable

from overlay.agent.nft import Monitor, NftCommand, Runner
from overlay.dataplane.desired import Desired
from overlay.errors import TemporaryError
from overlay.model import IPAddr

log = logging.getLogger(__name__)

TABLE = "overlay_vxlan"


def _elements(members: Iterable[IPAddr], family: int = 4) -> str:
    ips = sorted({m for m in members if m.version == family}, key=int)
    return ", ".join(map(str, ips))


def _names(family: int) -> tuple[str, str, str]:
    """(nft table family, set type, address match) of the underlay family."""
    return ("ip", "ipv4_addr", "ip") if family == 4 else ("ip6", "ipv6_addr", "ip6")


def ruleset(port: int, members: Iterable[IPAddr], family: int = 4) -> str:
    """The whole table, created from scratch (a table that exists is replaced). A table
    of the other family, left from a run over the other underlay, goes too."""
    elems = _elements(members, family)
    elements = f" elements = {{ {elems} }};" if elems else ""
    tfam, stype, match = _names(family)
    other = _names(10 - family)[0]
    return (
        f"table {other} {TABLE} {{}}\n"
        f"delete table {other} {TABLE}\n"
        f"table {tfam} {TABLE} {{}}\n"
        f"delete table {tfam} {TABLE}\n"
        f"table {tfam} {TABLE} {{\n"
        f"  set members {{ type {stype};{elements} }}\n"
        f"  chain input {{\n"
        f"    type filter hook input priority -150; policy accept;\n"
        f"    udp dport {port} {match} saddr != @members counter drop\n"
        f"  }}\n"
        f"}}\n"
    )


_RULE = re.compile(r"udp dport (\d+) ip6? saddr != @members counter")
_ELEMENTS = re.compile(r"elements = \{([^}]*)\}")


def parse_table(text: str) -> tuple[int | None, frozenset[str]]:
    """(the port the drop rule guards or None, the member set as nft prints it) from
    `nft list table`. Text, not addresses: this runs over every member."""
    m = _RULE.search(text)
    port = int(m.group(1)) if m else None
    e = _ELEMENTS.search(text)
    items = e.group(1).replace("\n", " ").split(",") if e else []
    return port, frozenset(filter(None, (i.strip() for i in items)))


def member_update(members: Iterable[IPAddr], family: int = 4) -> str:
    """Replace the member set atomically (one nft transaction)."""
    elems = _elements(members, family)
    tfam = _names(family)[0]
    add = f"add element {tfam} {TABLE} members {{ {elems} }}\n" if elems else ""
    return f"flush set {tfam} {TABLE} members\n{add}"


class VxlanFilter:
    # The agent checks the table against the kernel whenever nftables notifies a change
    # (deleted or edited by hand, it is rebuilt like any other drifted state), and this
    # often in any case; every VERIFY_INTERVAL where notifications are not available.
    SAFETY_INTERVAL = 60.0
    VERIFY_INTERVAL = 2.0

    def __init__(self, port: int, nft: Runner | None = None, family: int = 4) -> None:
        self.nft = nft or NftCommand()
        self.port = port
        self.family = family  # the underlay's: the outer source addresses
        self.table = f"{_names(family)[0]} {TABLE}"
        self.members: frozenset[IPAddr] | None = None
        self._texts: frozenset[str] = frozenset()  # the members as nft lists them
        self._lock = asyncio.Lock()

    async def sync(self, members: Iterable[IPAddr]) -> None:
        """Make the accepted sources exactly `members`. Cheap when nothing changed."""
        want = frozenset(m for m in members if m.version == self.family)
        async with self._lock:
            if want == self.members:
                return
            if self.members is None:
                await self.nft.run(ruleset(self.port, want, self.family))
                log.info("VXLAN filter: UDP %d accepted only from %d member(s) "
                         "(nftables table %s)", self.port, len(want), self.table)
            else:
                added, removed = want - self.members, self.members - want
                await self.nft.run(member_update(want, self.family))
                for ip in sorted(added, key=int):
                    log.info("VXLAN filter: accepting %s (new member)", ip)
                for ip in sorted(removed, key=int):
                    log.info("VXLAN filter: no longer accepting %s (not a member)", ip)
            self.members = want
            self._texts = frozenset(str(ip) for ip in want)

    async def verify(self) -> bool:
        """True if the table in the kernel is no longer what we installed (deleted or edited
        by hand); the next `sync` then rebuilds it whole. nftables changes raise no
        rtnetlink notification: the agent calls this on nftables' own notifications
        (`nft.Monitor`) and on a timer."""
        async with self._lock:
            if self.members is None:
                return False
            if await self._kernel_state() == (self.port, self._texts):
                return False
            log.warning("VXLAN filter: table %s was changed outside overlayd; rebuilding "
                        "it", self.table)
            self.members = None
            return True

    async def _kernel_state(self) -> tuple[int | None, frozenset[str]] | None:
        text = await self.nft.listing("table", *self.table.split())
        return None if text is None else parse_table(text)

    async def dropped(self) -> int:
        """Packets dropped so far (from the rule's counter)."""
        text = await self.nft.listing("chain", *self.table.split(), "input")
        for line in (text or "").splitlines():
            if "counter packets" in line:
                return int(line.split("counter packets", 1)[1].split()[0])
        return 0

    async def after_pass(self, want: Desired) -> None:
        """The reconciler's hook: accept VXLAN from exactly the peers just programmed."""
        await self.sync(f.dst for f in want.fdbs)

    async def watch(self, changed: Callable[[], None]) -> None:
        """Check the table when nftables notifies a change (and every SAFETY_INTERVAL), or
        every VERIFY_INTERVAL without notifications; `changed()` when it must be rebuilt."""
        try:
            monitor: Monitor | None = Monitor()
        except OSError as exc:
            log.warning("no nftables notifications (%s): checking the VXLAN filter every "
                        "%.0fs instead", exc, self.VERIFY_INTERVAL)
            monitor = None
        try:
            while True:
                if monitor is None:
                    await asyncio.sleep(self.VERIFY_INTERVAL)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(monitor.changed(), self.SAFETY_INTERVAL)
                if await self.verify():
                    changed()
        finally:
            if monitor is not None:
                monitor.close()

    async def remove(self) -> None:
        async with self._lock:
            try:
                await self.nft.run(f"table {self.table} {{}}\ndelete table {self.table}\n")
                log.info("VXLAN filter removed (nftables table %s)", self.table)
            except TemporaryError as exc:
                log.warning("could not remove the VXLAN filter: %s", exc)
            self.members = None
