"""The agent's local API (gRPC over a unix socket): status and graceful leave."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from overlay import __version__
from overlay.membership.wire import pb_state
from overlay.model import NodeRecord
from overlay.v1 import overlay_pb2 as pb
from overlay.v1 import overlay_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from overlay.agent.agent import Agent


def record_pb(rec: NodeRecord, lease_revision: int = 0, incarnation: int = 0) -> Any:
    return pb.NodeRecord(
        name=rec.node, subnet=str(rec.subnet), underlay_ip=str(rec.underlay_ip),
        vtep_mac=rec.vtep_mac, grpc_addr=rec.grpc_addr, backend=rec.backend,
        incarnation=incarnation, lease_revision=lease_revision,
    )


class LocalService(pb_grpc.LocalServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def Status(self, request: Any, context: Any) -> Any:
        return status_reply(self.agent)

    async def Leave(self, request: Any, context: Any) -> Any:
        self.agent.request_leave()
        return pb.LocalLeaveReply()


def status_reply(agent: Agent) -> Any:
    agent.refresh_conditions()
    st = agent.status()
    reply = pb.StatusReply(ready=st["ready"], version=__version__,
                           started_unix_ms=int(st["started"] * 1000), mtu=st["mtu"],
                           degraded=bool(st.get("degraded", False)))
    membership = getattr(agent, "membership", None)
    if st["self"] is not None:
        reply.self.CopyFrom(record_pb(st["self"]))
        if agent.lease is not None and agent.lease.current is not None:
            reply.self.lease_revision = agent.lease.current.mod_revision
    elif agent.node:
        reply.self.name = agent.node
    if membership is not None:
        reply.self.incarnation = membership.swim.incarnation
    cfg = st["cfg"]
    if cfg is not None:
        reply.cluster_cidr, reply.vni, reply.port = str(cfg.network), cfg.vni, cfg.port
    for name, c in st["conditions"].items():
        reply.conditions.add(name=name, ok=c.ok, message=c.message)
    if membership is not None:
        add_membership_peers(agent, membership, reply)
        return reply
    for p in st["peers"]:
        ps = reply.peers.add(programmed=p["programmed"], in_etcd=True, source="etcd")
        ps.record.CopyFrom(record_pb(p["record"], p["lease_revision"]))
        ps.state = pb.PEER_STATE_UNSPECIFIED
    return reply


def add_membership_peers(agent: Agent, membership: Any, reply: Any) -> None:
    """Every etcd lease holder (as programmed) and every node known only by gossip."""
    rec = agent.reconciler
    for v in membership.views():
        programmed = bool(rec and v.in_etcd and v.source != "left"
                          and rec.is_programmed(v.record))
        ps = reply.peers.add(programmed=programmed, in_etcd=v.in_etcd, source=v.source,
                             since_unix_ms=v.since_unix_ms,
                             state=pb_state(v.state))
        ps.record.CopyFrom(record_pb(v.record, v.lease_revision, v.incarnation))
        h = v.health
        if h.grpc_rtt_us is not None:
            ps.grpc_rtt_us = min(h.grpc_rtt_us, 2**32 - 1)
        if h.tunnel_rtt_us is not None:
            ps.tunnel_rtt_us = min(h.tunnel_rtt_us, 2**32 - 1)
        if h.grpc_error is not None:
            ps.grpc_error = h.grpc_error
        if h.tunnel_error is not None:
            ps.tunnel_error = h.tunnel_error


async def start_local_api(agent: Agent, path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    server = grpc.aio.server()
    pb_grpc.add_LocalServicer_to_server(LocalService(agent), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    os.chmod(path, 0o600)
    return server
