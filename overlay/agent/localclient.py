"""The client of the agent's local API (gRPC over its unix socket): status and leave.

Used by `overlayctl status`/`leave` and by the sandbox; the server is `localapi`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from overlay.v1 import overlay_pb2 as pb
from overlay.v1 import overlay_pb2_grpc as pb_grpc

# A generated protobuf message (StatusReply, NodeRecord): untyped, mypy skips overlay.v1.
Message = Any

STATE_NAMES = {
    pb.PEER_STATE_UNSPECIFIED: "-",
    pb.PEER_STATE_ALIVE: "alive",
    pb.PEER_STATE_SUSPECT: "suspect",
    pb.PEER_STATE_DEAD: "dead",
    pb.PEER_STATE_LEFT: "left",
}


def local_status(socket_path: Path | str, timeout: float = 3.0) -> Message:
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        return pb_grpc.LocalStub(ch).Status(pb.StatusRequest(), timeout=timeout)


def local_leave(socket_path: Path | str, timeout: float = 10.0) -> None:
    with grpc.insecure_channel(f"unix:{socket_path}") as ch:
        pb_grpc.LocalStub(ch).Leave(pb.LocalLeaveRequest(), timeout=timeout)


def status_json(st: Message) -> dict[str, Any]:
    def rec(r: Message) -> dict[str, Any]:
        return {"name": r.name, "subnet": r.subnet, "underlayIP": r.underlay_ip,
                "vtepMAC": r.vtep_mac, "grpcAddr": r.grpc_addr}

    peers = []
    for p in st.peers:
        d = rec(p.record)
        d.update(state=STATE_NAMES.get(p.state, str(p.state)), sinceUnixMs=p.since_unix_ms,
                 programmed=p.programmed, inEtcd=p.in_etcd, source=p.source,
                 incarnation=p.record.incarnation, leaseRevision=p.record.lease_revision,
                 grpcRttUs=p.grpc_rtt_us if p.HasField("grpc_rtt_us") else None,
                 tunnelRttUs=p.tunnel_rtt_us if p.HasField("tunnel_rtt_us") else None,
                 grpcError=p.grpc_error if p.HasField("grpc_error") else None,
                 tunnelError=p.tunnel_error if p.HasField("tunnel_error") else None)
        peers.append(d)
    node = rec(st.self)
    node.update(incarnation=st.self.incarnation, leaseRevision=st.self.lease_revision)
    return {
        "node": node, "ready": st.ready, "degraded": st.degraded, "version": st.version,
        "mtu": st.mtu,
        "clusterCIDR": st.cluster_cidr, "vni": st.vni, "port": st.port,
        "conditions": {c.name: {"ok": c.ok, "message": c.message} for c in st.conditions},
        "peers": peers,
    }
