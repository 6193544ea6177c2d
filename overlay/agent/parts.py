"""What the agent is built from: the node's kernel, the etcd store and the membership.

`Agent` (the composition root) receives `Parts`, three factories, and wires
what they make together. The defaults are the real ones; a unit test passes
in-memory ones and runs the whole start-up, degraded start included, without
root, etcd or gRPC peers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from overlay.agent.followers import ConfigSource, LeaseSource
from overlay.agent.lease import LeaseStore
from overlay.agent.nodekernel import LinuxKernel, NodeKernel
from overlay.etcdstore import EtcdOptions, EtcdStore
from overlay.membership.service import Membership, PeerView
from overlay.membership.signing import NodeKey
from overlay.membership.swim import SwimConfig
from overlay.membership.tls import TlsMaterial
from overlay.model import IPNet, LeaseEntry, NodeRecord


class AgentStore(LeaseStore, ConfigSource, LeaseSource, Protocol):
    """Connects on first use (see EtcdStore.connect): the agent never connects up front."""

    async def close(self) -> None: ...


class MembershipPort(Protocol):
    """What the agent asks of the membership (overlay.membership.service.Membership)."""

    @property
    def incarnation(self) -> int: ...

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...

    async def leave(self, timeout: float = 1.0) -> int: ...

    def set_self(self, rec: NodeRecord, lease_revision: int) -> None: ...

    def sync_etcd(self) -> None: ...

    def peer_records(self) -> list[NodeRecord]: ...

    def condition(self) -> tuple[bool, str]: ...

    def views(self) -> list[PeerView]: ...


class MembershipFactory(Protocol):
    def __call__(self, me: NodeRecord, lease_revision: int, incarnation: int, cfg: SwimConfig,
                 listen: str, tls: TlsMaterial | None,
                 etcd_entries: Callable[[], Mapping[IPNet, LeaseEntry]],
                 on_change: Callable[[], None], key: NodeKey, /) -> MembershipPort: ...


@dataclass(frozen=True)
class Parts:
    kernel: Callable[[], NodeKernel] = LinuxKernel
    store: Callable[[EtcdOptions], AgentStore] = EtcdStore
    membership: MembershipFactory = Membership
