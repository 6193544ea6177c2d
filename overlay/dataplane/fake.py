"""An in-memory `Kernel` with failures on demand, for unit tests.

Modelled on Felix's netlinkshim mock: set `fail_next[...]` or `fail_always`
to make the next (or every) matching call fail, and check what the code
under test does about it.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import IPv4Interface, IPv6Interface

from overlay.dataplane.desired import Entries, Fdb, Neigh, Op, Route, apply_ops
from overlay.dataplane.devices import BridgeSpec, DeviceOp, LinkInfo, VxlanSpec
from overlay.dataplane.kernel import KernelError, OpResult


class FakeKernel:
    def __init__(self) -> None:
        self.links: dict[str, LinkInfo] = {}
        self.entries: dict[int, Entries] = {}
        self._next_index = 10
        # "device", "observe", "apply", or an op string such as "add fdb ..."
        self.fail_next: dict[str, int] = {}
        self.fail_always: set[str] = set()
        self.calls: list[str] = []
        self.closed = False

    def _maybe_fail(self, what: str, code: int = errno.EBUSY) -> None:
        for key in (what, what.split(" ", 1)[0]):
            if key in self.fail_always:
                raise KernelError(what, code)
            if self.fail_next.get(key, 0) > 0:
                self.fail_next[key] -= 1
                raise KernelError(what, code)

    # --- Kernel protocol ---------------------------------------------------

    async def link(self, name: str) -> LinkInfo | None:
        self.calls.append(f"link {name}")
        return self.links.get(name)

    async def apply_device_ops(self, ops: Sequence[DeviceOp]) -> None:
        for op in ops:
            self.calls.append(str(op))
            self._maybe_fail("device")
            self._device_op(op)

    def _device_op(self, op: DeviceOp) -> None:
        if op.action == "create":
            spec = op.value
            if op.name in self.links:
                raise KernelError(str(op), errno.EEXIST)
            self._next_index += 1
            if isinstance(spec, VxlanSpec):
                self.links[op.name] = LinkInfo(
                    name=spec.name, index=self._next_index, kind="vxlan", up=False,
                    mtu=spec.mtu, mac=spec.mac, vni=spec.vni, port=spec.port,
                    local=spec.local, learning=False, underlay_ifindex=spec.underlay_ifindex,
                )
            elif isinstance(spec, BridgeSpec):
                self.links[op.name] = LinkInfo(
                    name=spec.name, index=self._next_index, kind="bridge", up=False,
                    mtu=spec.mtu, mac=spec.mac,
                )
            return
        if op.action == "delete":
            link = self.links.pop(op.name, None)
            if link is not None:
                self.entries.pop(link.index, None)
            return
        link = self.links.get(op.name)
        if link is None:
            raise KernelError(str(op), errno.ENODEV)
        if op.action == "set_mtu":
            assert isinstance(op.value, int)
            link = replace(link, mtu=op.value)
        elif op.action == "set_mac":
            assert isinstance(op.value, str)
            link = replace(link, mac=op.value)
        elif op.action == "up":
            link = replace(link, up=True)
        elif op.action == "add_addr":
            assert isinstance(op.value, IPv4Interface | IPv6Interface)
            link = replace(link, addresses=link.addresses | {op.value})
        elif op.action == "del_addr":
            assert isinstance(op.value, IPv4Interface | IPv6Interface)
            link = replace(link, addresses=link.addresses - {op.value})
        self.links[op.name] = link

    async def observe(self, ifindex: int, underlay: int | None = None) -> Entries:
        self.calls.append(f"observe {ifindex}")
        self._maybe_fail("observe")
        return self.entries.get(ifindex, Entries())

    async def apply(self, ifindex: int, ops: Sequence[Op],
                    underlay: int | None = None) -> list[OpResult]:
        results = []
        for op in ops:
            self.calls.append(str(op))
            try:
                self._maybe_fail("apply")
                self._maybe_fail(str(op))
                if ifindex not in {link.index for link in self.links.values()}:
                    raise KernelError(str(op), errno.ENODEV)
                if isinstance(op.entry, Route) and op.entry.direct and underlay is None:
                    raise KernelError(str(op), errno.EINVAL, "no underlay device")
            except KernelError as exc:
                results.append(OpResult(op, exc))
                continue
            self.entries[ifindex] = apply_ops(self.entries.get(ifindex, Entries()), [op])
            results.append(OpResult(op))
        return results

    def close(self) -> None:
        self.closed = True

    # --- test helpers --------------------------------------------------------

    def remove_entry(self, ifindex: int, entry: Route | Neigh | Fdb) -> None:
        """Simulate an operator deleting an entry by hand."""
        self.entries[ifindex] = apply_ops(self.entries[ifindex], [Op("del", entry)])
