"""Conversions between the protocol's records and overlay.v1 messages.

Everything that arrives from a peer is validated here like a lease read from
etcd; an invalid update is dropped (and counted) instead of reaching the
core.
"""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address
from typing import Any

from overlay.errors import ConfigError
from overlay.membership.swim import Record, State, Update
from overlay.model import NodeRecord, check_node_name, parse_cidr, parse_mac
from overlay.v1 import overlay_pb2 as pb


def record_pb(rec: NodeRecord, lease_revision: int = 0, incarnation: int = 0) -> Any:
    return pb.NodeRecord(
        name=rec.node, subnet=str(rec.subnet), underlay_ip=str(rec.underlay_ip),
        vtep_mac=rec.vtep_mac, grpc_addr=rec.grpc_addr, backend=rec.backend,
        incarnation=incarnation, lease_revision=lease_revision,
    )


def update_pb(u: Update) -> Any:
    return pb.MemberUpdate(record=record_pb(u.record.node, u.record.lease_revision,
                                            u.incarnation),
                           state=pb_state(u.state), incarnation=u.incarnation,
                           reporter=u.reporter)


def pb_state(state: State | None) -> Any:
    """The overlay.v1.PeerState number (UNSPECIFIED for None)."""
    return int(state) if state is not None else 0


def node_record(m: Any) -> NodeRecord:
    """A NodeRecord message as a validated NodeRecord; ConfigError names the bad field."""
    try:
        ip = ip_address(m.underlay_ip)
    except ValueError:
        raise ConfigError("underlay_ip", f"{m.underlay_ip!r} is not an IP address") from None
    if not isinstance(ip, IPv4Address):
        raise ConfigError("underlay_ip", f"{ip} is not IPv4")
    if m.backend not in ("", "vxlan"):
        raise ConfigError("backend", f"{m.backend!r} is not supported")
    if m.grpc_addr and not m.grpc_addr.rpartition(":")[2].isdigit():
        raise ConfigError("grpc_addr", f"{m.grpc_addr!r} is not host:port")
    return NodeRecord(check_node_name(m.name, "name"), parse_cidr(m.subnet, "subnet"), ip,
                      parse_mac(m.vtep_mac, "vtep_mac"), m.grpc_addr)


def update_from_pb(m: Any) -> Update:
    if m.state not in (State.ALIVE, State.SUSPECT, State.DEAD, State.LEFT):
        raise ConfigError("state", f"unknown peer state {m.state}")
    if m.incarnation < 0 or m.record.lease_revision < 0:
        raise ConfigError("incarnation", "negative")
    return Update(Record(node_record(m.record), int(m.record.lease_revision)), State(m.state),
                  int(m.incarnation), m.reporter)


def updates_from_pb(items: Any) -> tuple[list[Update], list[str]]:
    """The valid updates, and why each invalid one was dropped."""
    good: list[Update] = []
    bad: list[str] = []
    for m in items:
        try:
            good.append(update_from_pb(m))
        except ConfigError as exc:
            bad.append(f"update about {m.record.name!r}: {exc}")
    return good, bad
