"""The agent's local API (gRPC over a unix socket): status and graceful leave.

The client is `overlay.agent.localclient`; the status comes from the agent
as an `AgentStatus` snapshot and becomes a StatusReply only here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from overlay import __version__
from overlay.agent.status import AgentStatus
from overlay.membership.wire import pb_state, record_pb
from overlay.v1 import overlay_pb2 as pb
from overlay.v1 import overlay_pb2_grpc as pb_grpc

# A generated protobuf message: untyped, mypy skips overlay.v1.
Message = Any


class LocalService(pb_grpc.LocalServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self, status: Callable[[], AgentStatus], leave: Callable[[], None]) -> None:
        self.status = status
        self.leave = leave

    async def Status(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        return status_reply(self.status())

    async def Leave(self, request: Message, context: grpc.aio.ServicerContext) -> Message:
        self.leave()
        return pb.LocalLeaveReply()


def status_reply(st: AgentStatus) -> Message:
    reply = pb.StatusReply(ready=st.ready, version=__version__,
                           started_unix_ms=int(st.started * 1000), mtu=st.mtu,
                           degraded=st.degraded)
    if st.me is not None:
        reply.self.CopyFrom(record_pb(st.me, st.lease_revision))
    else:
        reply.self.name = st.node
    reply.self.incarnation = st.incarnation
    if st.cfg is not None:
        # both pod networks, comma-separated like Kubernetes' dual-stack --cluster-cidr
        reply.cluster_cidr = ",".join(map(str, st.cfg.networks))
        reply.vni, reply.port = st.cfg.vni, st.cfg.port
    for name, c in st.conditions:
        reply.conditions.add(name=name, ok=c.ok, message=c.message)
    for p in st.peers:
        ps = reply.peers.add(programmed=p.programmed, in_etcd=p.in_etcd, source=p.source,
                             since_unix_ms=p.since_unix_ms, state=pb_state(p.state),
                             direct=p.direct)
        ps.record.CopyFrom(record_pb(p.record, p.lease_revision, p.incarnation))
        if p.grpc_rtt_us is not None:
            ps.grpc_rtt_us = min(p.grpc_rtt_us, 2**32 - 1)
        if p.tunnel_rtt_us is not None:
            ps.tunnel_rtt_us = min(p.tunnel_rtt_us, 2**32 - 1)
        if p.grpc_error is not None:
            ps.grpc_error = p.grpc_error
        if p.tunnel_error is not None:
            ps.tunnel_error = p.tunnel_error
    return reply


async def start_local_api(path: Path, status: Callable[[], AgentStatus],
                          leave: Callable[[], None]) -> grpc.aio.Server:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    server = grpc.aio.server()
    pb_grpc.add_LocalServicer_to_server(LocalService(status, leave), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    os.chmod(path, 0o600)
    return server
