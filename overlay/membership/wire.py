"""Conversions between the protocol's records and overlay.v1 messages.

Everything that arrives from a peer is validated here like a lease read from
etcd; an invalid update is dropped (and counted) instead of reaching the
core. Updates arrive as `Claim`s: what the sender says, not yet admitted;
`admission.Gate` decides which become core `Update`s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from overlay.errors import ConfigError
from overlay.membership.admission import Claim, Statement
from overlay.membership.swim import Record, State, Update
from overlay.model import (
    NodeRecord,
    check_node_name,
    parse_cidr,
    parse_cidr6,
    parse_mac,
    parse_underlay_ip,
)
from overlay.v1 import overlay_pb2 as pb

# Beyond any record we make (about 120 bytes): a bigger statement is refused unread.
MAX_STATEMENT = 1024
SIGNATURE_SIZE = 64


def record_pb(rec: NodeRecord, lease_revision: int = 0, incarnation: int = 0) -> Any:
    return pb.NodeRecord(
        name=rec.node, subnet=str(rec.subnet) if rec.subnet is not None else "",
        underlay_ip=str(rec.underlay_ip), vtep_mac=rec.vtep_mac, grpc_addr=rec.grpc_addr,
        backend=rec.backend, incarnation=incarnation, lease_revision=lease_revision,
        subnet6=str(rec.subnet6) if rec.subnet6 is not None else "",
    )


def update_pb(u: Update) -> Any:
    proof = u.record.proof
    if proof is not None:
        # The subject's statement carries record and incarnation: nothing else to send.
        return pb.MemberUpdate(state=pb_state(u.state), reporter=u.reporter,
                               signed=pb.SignedStatement(statement=proof.statement,
                                                         signature=proof.signature))
    # Unsigned: an opinion about a node never heard from (incarnation 0).
    return pb.MemberUpdate(record=pb.NodeRecord(name=u.name), state=pb_state(u.state),
                           incarnation=u.incarnation, reporter=u.reporter)


def statement_bytes(rec: Record, incarnation: int, state: State) -> bytes:
    """What a node signs: its record at `incarnation`, ALIVE or LEFT."""
    msg = pb.Statement(record=record_pb(rec.node, rec.lease_revision, incarnation),
                       state=pb_state(state))
    data: bytes = msg.SerializeToString(deterministic=True)
    return data


def parse_statement(data: bytes) -> Statement:
    """A serialized Statement, validated; ConfigError names what is wrong."""
    from google.protobuf.message import DecodeError

    if len(data) > MAX_STATEMENT:
        raise ConfigError("statement", f"{len(data)} bytes, more than {MAX_STATEMENT}")
    try:
        m = pb.Statement.FromString(data)
    except (DecodeError, ValueError):
        raise ConfigError("statement", "not a Statement message") from None
    state = int(m.state)
    if state not in (State.ALIVE, State.LEFT):
        raise ConfigError("statement.state", f"{state} is not ALIVE or LEFT")
    inc, rev = int(m.record.incarnation), int(m.record.lease_revision)
    if inc < 1:
        raise ConfigError("statement.incarnation", "must be at least 1")
    if rev < 0:
        raise ConfigError("statement.lease_revision", "negative")
    return Statement(Record(node_record(m.record), rev), inc, State(state))


def pb_state(state: State | None) -> Any:
    """The overlay.v1.PeerState number (UNSPECIFIED for None)."""
    return int(state) if state is not None else 0


def node_record(m: Any) -> NodeRecord:
    """A NodeRecord message as a validated NodeRecord; ConfigError names the bad field."""
    ip = parse_underlay_ip(m.underlay_ip, "underlay_ip")
    if m.backend not in ("", "vxlan"):
        raise ConfigError("backend", f"{m.backend!r} is not supported")
    if m.grpc_addr and not m.grpc_addr.rpartition(":")[2].isdigit():
        raise ConfigError("grpc_addr", f"{m.grpc_addr!r} is not host:port")
    subnet = parse_cidr(m.subnet, "subnet") if m.subnet else None
    subnet6 = parse_cidr6(m.subnet6, "subnet6") if m.subnet6 else None
    if subnet is None and subnet6 is None:
        raise ConfigError("subnet", "missing (and no subnet6)")
    return NodeRecord(check_node_name(m.name, "name"), subnet, ip,
                      parse_mac(m.vtep_mac, "vtep_mac"), m.grpc_addr, subnet6=subnet6)


_STATES = {int(s): s for s in State}


def claim_from_pb(m: Any) -> Claim:
    """Only the framing is checked here; the statement is read by the gate, once."""
    state = _STATES.get(m.state)
    if state is None:
        raise ConfigError("state", f"unknown peer state {m.state}")
    if m.HasField("signed"):
        signed = m.signed
        sig = signed.signature
        if len(sig) != SIGNATURE_SIZE:
            raise ConfigError("signature", f"{len(sig)} bytes, not {SIGNATURE_SIZE}")
        return Claim(state, m.reporter, signed.statement, sig)
    return Claim(state, m.reporter, name=m.record.name, incarnation=int(m.incarnation))


def claims_from_pb(items: Iterable[Any]) -> tuple[list[Claim], list[str]]:
    """The well-framed claims, and why each other one was dropped."""
    good: list[Claim] = []
    bad: list[str] = []
    for m in items:
        try:
            good.append(claim_from_pb(m))
        except ConfigError as exc:
            bad.append(f"update: {exc}")
    return good, bad
