"""The node's own kernel, as the agent uses it, behind one object.

Devices and entries (`Kernel`), its notifications, the underlay interface,
IP forwarding, nftables and the host end of pod wiring: everything the agent
changes or reads on its node. `LinuxKernel` is the real one; the unit tests
build the agent on an in-memory one (`overlay.dataplane.fake.FakeKernel`
inside), so no test of the agent touches the machine's network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from pyroute2 import AsyncIPRoute

from overlay.agent.nft import NftCommand, Runner
from overlay.cni.wiring import PodWiring
from overlay.dataplane.kernel import ChangeMonitor, Kernel, NetlinkKernel, Underlay, find_underlay
from overlay.dataplane.reconciler import Monitor
from overlay.log import change_fields

log = logging.getLogger("overlayd")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP6_FORWARD = Path("/proc/sys/net/ipv6/conf/all/forwarding")


class NodeKernel(Protocol):
    @property
    def kernel(self) -> Kernel: ...

    @property
    def nft(self) -> Runner: ...

    def monitor(self) -> Monitor | None: ...

    async def find_underlay(self, iface: str | None, iface_regex: str | None,
                            public_ip: str | None, family: int | None = None) -> Underlay: ...

    def enable_forwarding(self, ipv6: bool = False) -> None: ...

    def pod_wiring(self, bridge: str) -> PodWiring: ...

    def close(self) -> None: ...


class LinuxKernel:
    """The kernel of the network namespace overlayd runs in."""

    def __init__(self) -> None:
        self.netlink = NetlinkKernel()
        self.nft = NftCommand()
        self._monitor: ChangeMonitor | None = None
        self._cni_ipr: AsyncIPRoute | None = None

    @property
    def kernel(self) -> Kernel:
        return self.netlink

    def monitor(self) -> Monitor:
        if self._monitor is None:
            self._monitor = ChangeMonitor()
        return self._monitor

    async def find_underlay(self, iface: str | None, iface_regex: str | None,
                            public_ip: str | None, family: int | None = None) -> Underlay:
        return await find_underlay(self.netlink.ipr, iface, iface_regex, public_ip, family)

    def enable_forwarding(self, ipv6: bool = False) -> None:
        knobs = [("net.ipv4.ip_forward", IP_FORWARD)]
        if ipv6:  # IPv6 forwarding is one switch for the whole namespace
            knobs.append(("net.ipv6.conf.all.forwarding", IP6_FORWARD))
        for name, path in knobs:
            try:
                if path.read_text().strip() != "1":
                    path.write_text("1\n")
                    why = "pods' traffic is routed through this host"
                    log.info("enabled %s (%s)", name, why,
                             extra=change_fields("sysctl", "set", why, sysctl=name))
            except OSError as exc:
                log.warning("cannot enable %s: %s; pod traffic will not be forwarded", name,
                            exc)

    def pod_wiring(self, bridge: str) -> PodWiring:
        # A netlink socket of its own: CNI requests run beside the reconciler's batches.
        if self._cni_ipr is None:
            self._cni_ipr = AsyncIPRoute()
        return PodWiring(self._cni_ipr, bridge)

    def close(self) -> None:
        self.netlink.close()
        if self._monitor is not None:
            self._monitor.close()
        if self._cni_ipr is not None:
            self._cni_ipr.close()
