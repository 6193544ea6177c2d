"""The client of the agent's local API (gRPC over its unix socket): status and leave.

Used by `overlayctl status`/`leave` and by the sandbox; the server is `localapi`."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from overlay.errors import TemporaryError
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
    """The agent's status; TemporaryError saying why if it cannot be asked."""
    with _call(socket_path, timeout) as stub:
        return stub.Status(pb.StatusRequest(), timeout=timeout)


def local_leave(socket_path: Path | str, timeout: float = 10.0) -> None:
    with _call(socket_path, timeout) as stub:
        stub.Leave(pb.LocalLeaveRequest(), timeout=timeout)


@contextmanager
def _call(socket_path: Path | str, timeout: float) -> Iterator[Any]:
    where = f"overlayd at {socket_path}"
    try:
        st = os.stat(socket_path)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise TemporaryError(f"cannot reach {where}: no such socket; is overlayd running "
                                 "on this node, with this --run-dir?") from None
        raise TemporaryError(f"cannot reach {where}: {_lower(exc.strerror)}") from None
    except ValueError as exc:  # an embedded NUL byte
        raise TemporaryError(f"cannot reach {where}: {exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TemporaryError(f"cannot reach {where}: it is not a socket")
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as ch:
            yield pb_grpc.LocalStub(ch)
    except grpc.RpcError as exc:
        raise TemporaryError(f"{where}: {rpc_reason(exc, timeout)}") from None


def _lower(text: str | None) -> str:
    text = text or "error"
    return text[:1].lower() + text[1:]


_REASONS: tuple[tuple[str, Callable[[float], str]], ...] = (
    ("connection refused", lambda _: "nothing listens on the socket (overlayd is not "
     "running; the socket is left from an earlier run)"),
    ("permission denied", lambda _: "permission denied" + (" (run as root)" if os.geteuid()
                                                             else "")),
    ("http/2", lambda _: "something else listens there: it does not speak gRPC"),
    ("deadline", lambda t: f"no answer within {t:g}s (overlayd is busy or stuck)"),
)


def rpc_reason(exc: grpc.RpcError, timeout: float) -> str:
    """A short, whole reason for a failed local API call (never gRPC's debug string)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""
    text = f"{getattr(code, 'name', '')} {details}".lower()
    for needle, reason in _REASONS:
        if needle in text:
            return reason(timeout)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _REASONS[-1][1](timeout)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "this socket serves something other than overlayd's local API"
    first = details.splitlines()[0] if details else ""
    return f"{getattr(code, 'name', 'error').lower()}: {first}".rstrip(": ")


def status_json(st: Message) -> dict[str, Any]:
    def rec(r: Message) -> dict[str, Any]:
        # "subnet": the lease's own (IPv4 when it has one); "ipv6Subnet" beside it.
        return {"name": r.name, "subnet": r.subnet or r.subnet6 or None,
                "ipv6Subnet": r.subnet6 or None, "underlayIP": r.underlay_ip,
                "vtepMAC": r.vtep_mac, "grpcAddr": r.grpc_addr}

    peers = []
    for p in st.peers:
        d = rec(p.record)
        d.update(state=STATE_NAMES.get(p.state, str(p.state)), sinceUnixMs=p.since_unix_ms,
                 programmed=p.programmed, inEtcd=p.in_etcd, source=p.source, direct=p.direct,
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
