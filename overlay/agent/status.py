"""The agent's status as one frozen snapshot: what `overlayctl status` shows.

The local API turns it into a StatusReply (`overlay.agent.localapi`); nothing
else needs protobuf. Peer counts by membership state (the `overlay_peers`
gauge) come from the membership's states directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from overlay.agent.readiness import Condition
from overlay.membership.service import PeerView
from overlay.membership.swim import State
from overlay.model import NetworkConfig, NodeRecord

# `unknown`: the peer is not (yet) in the membership.
STATE_LABELS = ("unknown", *(s.label for s in State))


@dataclass(frozen=True)
class PeerStatus:
    record: NodeRecord
    lease_revision: int
    programmed: bool
    incarnation: int = 0
    state: State | None = None
    since_unix_ms: int = 0
    in_etcd: bool = True
    source: str = "etcd"    # etcd, gossip (newer details announced), left, or "" (no lease)
    grpc_rtt_us: int | None = None
    grpc_error: str | None = None
    tunnel_rtt_us: int | None = None
    tunnel_error: str | None = None
    direct: bool = False  # reached by a direct route (DirectRouting)

    @classmethod
    def of_view(cls, v: PeerView, programmed: bool, direct: bool = False) -> PeerStatus:
        h = v.health
        return cls(v.record, v.lease_revision, programmed, v.incarnation, v.state,
                   v.since_unix_ms, v.in_etcd, v.source, h.grpc_rtt_us, h.grpc_error,
                   h.tunnel_rtt_us, h.tunnel_error, direct)


@dataclass(frozen=True)
class AgentStatus:
    node: str                      # "" until the identity is resolved
    me: NodeRecord | None          # our lease record, once we hold (or assume) one
    lease_revision: int
    incarnation: int               # the membership's, 0 before it starts
    ready: bool
    degraded: bool
    conditions: tuple[tuple[str, Condition], ...]
    mtu: int
    cfg: NetworkConfig | None
    started: float                 # Unix time
    peers: tuple[PeerStatus, ...]


def state_counts(states: Iterable[State | None]) -> dict[str, int]:
    """Peers by state label, every label present (a gauge that drops to 0 must say so)."""
    counts = dict.fromkeys(STATE_LABELS, 0)
    for s in states:
        counts[s.label if s is not None else "unknown"] += 1
    return counts
