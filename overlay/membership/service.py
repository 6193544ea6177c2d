"""The membership shell: the Membership gRPC service, its clients, and one timer.

All decisions, the timers' included, are the pure core's (`swim.Swim`): this
module sleeps until the core's next wake-up, does what `on_timer` says,
moves messages, measures round trips, keeps one channel per peer address,
and turns what the core changed into logs, metrics and a reconcile wake-up.

Every few probe rounds (and every round with a peer whose tunnel has not
answered yet) the target is also probed through the VXLAN tunnel (its gRPC port on its VTEP address,
which routes through our VXLAN device): the tunnel round trip is shown in
status but never used for liveness, so that a broken tunnel is visible as
such and not mistaken for a dead node. Not every round: every gRPC call
costs about a millisecond of CPU on each side, the bulk of an idle agent's
work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from overlay import metrics
from overlay.errors import ConfigError
from overlay.membership import tls as tlsmod
from overlay.membership.admission import Claim, Reason, Refusal, RefusalLog
from overlay.membership.effective import Peer, Source, effective_peers, programmable
from overlay.membership.signing import NodeKey, gate
from overlay.membership.swim import (
    Change,
    Due,
    Member,
    Probe,
    Proof,
    Record,
    State,
    Swim,
    SwimConfig,
    Update,
)
from overlay.membership.wire import claim_from_pb, claims_from_pb, update_pb
from overlay.model import IPNet, LeaseEntry, NodeRecord, hostport
from overlay.retry import Once
from overlay.v1 import overlay_pb2 as pb
from overlay.v1 import overlay_pb2_grpc as pb_grpc

log = logging.getLogger("overlay.membership")

# Reconnect quickly to a peer that comes back (gRPC's defaults back off up to
# 2 minutes); never go through an HTTP proxy from the environment; no
# bandwidth-delay probing (a PING after every message: more wire bytes than
# the small messages themselves, for windows they never fill).
COMMON_OPTIONS = [("grpc.http2.bdp_probe", 0)]
# A peer whose host vanished without a FIN (a reboot or power loss while its
# link was down) leaves a half-open connection that the server, which only
# answers, would hold for good: ping every connection, idle ones too, and drop
# it when the ping goes unanswered. Live peers answer within milliseconds.
SERVER_KEEPALIVE_S = 20.0
SERVER_KEEPALIVE_TIMEOUT_S = 10.0
SERVER_OPTIONS = [
    *COMMON_OPTIONS,
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", int(SERVER_KEEPALIVE_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(SERVER_KEEPALIVE_TIMEOUT_S * 1000)),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection that went quiet
]
CHANNEL_OPTIONS = [
    *COMMON_OPTIONS,
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 2000),
]
MAX_IN_FLIGHT = 64
# An indirect probe on someone's behalf never waits longer than this.
MAX_INDIRECT_TIMEOUT = 2.0
# At most one warning per reason for refused updates per this many seconds (with a count).
REFUSAL_LOG_INTERVAL = 10.0
# At most one warning about our own timers running late per this many seconds.
STALL_LOG_INTERVAL = 30.0
# One probe round in this many also measures the round trip through the tunnel.
TUNNEL_PROBE_EVERY = 8
_MSG_OUT = {k: metrics.GOSSIP_MESSAGES.labels(type=k, direction="out")
            for k in ("probe", "tunnel-probe", "indirect-probe", "gossip", "push-pull", "leave")}
_BYTES_OUT = metrics.GOSSIP_BYTES.labels(direction="out")
_BYTES_IN = metrics.GOSSIP_BYTES.labels(direction="in")
_MALFORMED = object()


def _safe_decoder(cls: Any) -> Callable[[bytes], Any]:
    """Bytes that are not a `cls` become _MALFORMED instead of an exception inside grpc
    (which logs a traceback per request: an easy way for anyone to flood the log)."""
    from google.protobuf.message import DecodeError

    def decode(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return _MALFORMED

    return decode


def add_membership_servicer(servicer: Any, server: Any) -> None:
    """Like the generated add_MembershipServicer_to_server, with forgiving decoding."""
    methods: dict[str, tuple[Any, Any]] = {
        "Probe": (pb.ProbeRequest, pb.ProbeReply),
        "IndirectProbe": (pb.IndirectProbeRequest, pb.IndirectProbeReply),
        "PushPull": (pb.PushPullRequest, pb.PushPullReply),
        "Gossip": (pb.GossipRequest, pb.GossipReply),
        "Leave": (pb.LeaveRequest, pb.LeaveReply),
    }
    handlers = {}
    for name, (req_cls, reply_cls) in methods.items():
        fn = getattr(servicer, name)

        async def handle(request: Any, context: Any, fn: Any = fn) -> Any:
            if request is _MALFORMED:
                metrics.GOSSIP_MESSAGES.labels(type="malformed", direction="in").inc()
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
            return await fn(request, context)

        handlers[name] = grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=_safe_decoder(req_cls),
            response_serializer=reply_cls.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("overlay.v1.Membership", handlers),))


class RpcFailed(Exception):
    pass


@dataclass
class PeerHealth:
    grpc_rtt_us: int | None = None
    grpc_error: str | None = None
    tunnel_rtt_us: int | None = None
    tunnel_error: str | None = None


@dataclass(frozen=True)
class PeerView:
    """One row of the peer table in `overlayctl status`."""

    record: NodeRecord
    lease_revision: int
    incarnation: int
    state: State | None          # None: no membership (it has no gRPC address)
    since_unix_ms: int
    in_etcd: bool
    source: str                  # etcd, gossip (newer details announced), left, or "" (no lease)
    health: PeerHealth


def _rpc_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "no answer in time"
        details = (exc.details() or "").splitlines()[0][:120] if exc.details() else ""
        return f"{code.name.lower()}: {details}" if details else code.name.lower()
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


class Membership:
    def __init__(
        self,
        me: NodeRecord,
        lease_revision: int,
        incarnation: int,
        cfg: SwimConfig,
        listen: str,
        tls: tlsmod.TlsMaterial | None,
        etcd_entries: Callable[[], Mapping[IPNet, LeaseEntry]],
        on_change: Callable[[], None],
        key: NodeKey,
        rng: random.Random | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.key = key
        self.swim = Swim(Record(me, lease_revision), incarnation, cfg, rng or random.Random(),
                         sign=self._sign)
        self.gate = gate(me.node)
        self.refusals = RefusalLog(REFUSAL_LOG_INTERVAL)
        self.listen = listen
        self.tls = tls
        self.etcd_entries = etcd_entries
        self.on_change = on_change
        self.health: dict[str, PeerHealth] = {}
        self._channels: dict[tuple[str, str], Any] = {}
        self._stubs: dict[tuple[str, str], Any] = {}
        self._creds = tlsmod.channel_credentials(tls) if tls is not None else None
        self._seq = itertools.count(1)
        self._server: Any = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._verifications = 0
        self._updates_in = {r: metrics.GOSSIP_UPDATES.labels(result=r)
                            for r in ("admitted", "ignored", "refused")}
        self._programmed: list[tuple[NodeRecord, Source]] = []
        self._rounds = 0
        self._wake = asyncio.Event()
        self._sleeping_until = math.inf
        self._stall_logged_at = -STALL_LOG_INTERVAL
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def name(self) -> str:
        return self.swim.name

    @property
    def incarnation(self) -> int:
        return self.swim.incarnation

    # --- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        """Serve the Membership service on the listen address."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_membership_servicer(_Servicer(self), server)
        try:
            if self.tls is not None:
                port = server.add_secure_port(self.listen, tlsmod.server_credentials(self.tls))
            else:
                port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            port, why = 0, str(exc)
        else:
            why = "address in use or not local"
        if not port:
            await server.stop(None)
            raise ConfigError("--grpc-listen", f"cannot listen on {self.listen}: {why}")
        await server.start()
        self._server = server
        self.sync_etcd()
        log.info("membership: serving on %s (%s), incarnation %d", self.listen,
                 "mutual TLS" if self.tls else "plaintext; records signed by their nodes; "
                 "give --tls-cert/--tls-key/--tls-ca for mutual TLS", self.swim.incarnation)

    async def close(self) -> None:
        for t in list(self._in_flight):
            t.cancel()
        if self._server is not None:
            await self._server.stop(0.2)
            self._server = None
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close()
        self._channels.clear()
        self._stubs.clear()

    async def run(self) -> None:
        """Join (full exchange with the known peers), then do what the core's timers say,
        forever: one loop sleeping until the next thing is due."""
        await self.join()
        loop = asyncio.get_running_loop()
        swim = self.swim
        swim.start(time.monotonic())
        said = Once()
        while True:
            wake = swim.next_wake()
            if wake > time.monotonic():
                self._wake.clear()
                self._sleeping_until = wake
                handle = loop.call_at(wake, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    handle.cancel()
                    self._sleeping_until = math.inf
                continue  # woken early by news, or on time: look again
            try:
                self._act(swim.on_timer(time.monotonic()))
                said.reset()
            except Exception as exc:  # a membership bug must not take the node agent down
                if said.changed(str(exc)):
                    log.warning("membership step failed: %s", exc, exc_info=exc)
                await asyncio.sleep(self.cfg.probe_interval)

    def _poke(self) -> None:
        """The core may want to run earlier than the driver sleeps (news to gossip, a
        new suspicion): wake it to look again."""
        if self.swim.next_wake() < self._sleeping_until:
            self._wake.set()

    def _act(self, due: Due) -> None:
        if due.stalled:
            self._log_stall(due.stalled)
        if due.changes:
            self._handle(due.changes)
        p = due.probe
        if p is not None:
            self._rounds += 1
            self._spawn(self._direct(p))
            h = self.health.get(p.target)
            if self._rounds % TUNNEL_PROBE_EVERY == 0 or h is None or (
                    h.tunnel_rtt_us is None or h.tunnel_error is not None):
                self._spawn(self._tunnel_probe(p.target, p.time_left(p.started)))
        if due.round is not None:
            for helper in due.indirect:
                self._spawn(self._indirect(helper, due.round))
        for m in due.gossip:
            self._spawn(self._gossip_to(m))
        if due.push_pull is not None:
            self._spawn(self._push_pull(due.push_pull))
        metrics.MEMBERSHIP_HEALTH.set(self.swim.health)
        for line in self.refusals.flush(time.monotonic()):
            log.warning("%s", line)

    def _log_stall(self, late: float) -> None:
        now = time.monotonic()
        if now - self._stall_logged_at < STALL_LOG_INTERVAL:
            return
        self._stall_logged_at = now
        timeout, interval = self.swim.probe_timing()
        log.warning("membership: our timers ran %.1fs late (this node is short of CPU or was "
                    "stopped); local health %d/%d: probing every %.1fs with a %.2fs timeout, "
                    "and not declaring peers dead on our own meanwhile", late,
                    self.swim.health, self.cfg.health_max, interval, timeout)

    async def join(self) -> None:
        targets = self.swim.join_targets()
        if not targets:
            log.info("membership: no peers to join yet")
            return
        results = await asyncio.gather(*(self._push_pull(m, timeout=2.0) for m in targets))
        ok = sum(results)
        log.info("membership: joined, exchanged state with %d of %d peers tried", ok,
                 len(targets))

    # --- what the agent asks --------------------------------------------------

    def sync_etcd(self) -> None:
        """etcd's leases changed: align the member table (called by the agent)."""
        leases = {e.record.node: Record(e.record, e.mod_revision)
                  for e in self.etcd_entries().values()}
        keys = {name: r.node.public_key for name, r in leases.items()}
        keys[self.name] = self.key.public  # ours, even before etcd has it
        self.gate.set_keys(keys)
        self._handle(self.swim.sync_etcd(leases, time.monotonic()), etcd_changed=True)
        self._poke()

    def set_self(self, rec: NodeRecord, lease_revision: int) -> None:
        """Our lease changed (re-taken, moved, or new details): announce it."""
        if self.swim.set_self(Record(rec, lease_revision)):
            log.info("membership: announcing our record at incarnation %d (lease revision %d)",
                     self.swim.incarnation, lease_revision)
            self._poke()

    def peers(self) -> list[Peer]:
        return effective_peers(self.etcd_entries(), self.swim.members, self.name)

    def peer_records(self) -> list[NodeRecord]:
        """What the data plane programs (the reconciler's peer source)."""
        return programmable(self.peers())

    def condition(self) -> tuple[bool, str]:
        c = self.swim.counts()
        parts = [f"{c[s]} {s.label}" for s in State if c[s]]
        if self.swim.health:
            parts.append(f"local health {self.swim.health}/{self.cfg.health_max} (slowed "
                         "down: our own probes or timers were late)")
        return c[State.SUSPECT] + c[State.DEAD] == 0, ", ".join(parts) or "no peers"

    def views(self) -> list[PeerView]:
        now_mono, now_unix = time.monotonic(), time.time()

        def since(m: Member) -> int:
            return int((now_unix - (now_mono - m.since)) * 1000)

        out = []
        seen = set()
        for p in self.peers():
            m = self.swim.members.get(p.record.node)
            seen.add(p.record.node)
            out.append(PeerView(
                p.record, m.record.lease_revision if m and m.heard else p.entry.mod_revision,
                m.incarnation if m else 0,
                m.state if m is not None and m.addr else None,
                since(m) if m else 0, True, p.source,
                self.health.get(p.record.node, PeerHealth())))
        for name, m in sorted(self.swim.members.items()):
            if name in seen:
                continue
            out.append(PeerView(m.record.node, m.record.lease_revision, m.incarnation, m.state,
                                since(m), False, "", self.health.get(name, PeerHealth())))
        return out

    async def leave(self, timeout: float = 1.0) -> int:
        """Tell every reachable peer that we leave; how many acknowledged."""
        u = self.swim.leave()
        req = pb.LeaveRequest(name=self.name, incarnation=u.incarnation,
                              signed=update_pb(u).signed)
        targets = [m for m in self.swim.members.values()
                   if m.state in (State.ALIVE, State.SUSPECT) and m.addr]

        async def one(m: Member) -> bool:
            try:
                await self._call("leave", m.addr, m.name, "Leave", req, timeout)
                return True
            except RpcFailed as exc:
                log.info("membership: could not tell %s that we leave: %s", m.name, exc)
                return False

        acks = sum(await asyncio.gather(*(one(m) for m in targets)))
        log.info("membership: told %d of %d peers that we leave", acks, len(targets))
        return acks

    # --- outgoing messages ----------------------------------------------------

    def _stub(self, addr: str, name: str) -> Any:
        key = (addr, name)
        stub = self._stubs.get(key)
        if stub is None:
            if self._creds is not None:
                # Verify the peer's certificate against its node name, whatever the address.
                opts = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]
                ch = grpc.aio.secure_channel(addr, self._creds, options=opts)
            else:
                ch = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            self._channels[key] = ch
            stub = self._stubs[key] = pb_grpc.MembershipStub(ch)
        return stub

    async def _call(self, kind: str, addr: str, name: str, method: str, req: Any,
                    timeout: float) -> Any:
        stub = self._stub(addr, name)
        size = req.ByteSize()
        _MSG_OUT[kind].inc()
        _BYTES_OUT.inc(size)
        self.bytes_out += size
        try:
            reply = await getattr(stub, method)(req, timeout=max(timeout, 0.01))
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise RpcFailed(_rpc_error(exc)) from None
        size = reply.ByteSize()
        _BYTES_IN.inc(size)
        self.bytes_in += size
        return reply

    def _piggyback(self, about: str) -> list[Any]:
        return [update_pb(u) for u in self.swim.news_for(about)]

    def _merge(self, items: Any, sender: str, peer: str = "") -> None:
        """Admit what `sender` (at `peer`) says (admission.Gate), then merge it."""
        if not len(items):
            return
        claims, bad = claims_from_pb(items)
        now = time.monotonic()
        updates, refused = self.gate.admit(claims, sender, self.swim.members, now)
        if self.gate.verifications != self._verifications:
            metrics.SIGNATURE_OPS.labels(op="verify").inc(
                self.gate.verifications - self._verifications)
            self._verifications = self.gate.verifications
        n_refused = sum(r.count for r in refused)
        self._updates_in["admitted"].inc(len(updates))
        self._updates_in["ignored"].inc(len(claims) - len(updates) - n_refused)
        self._updates_in["refused"].inc(n_refused + len(bad))
        if bad:
            refused += [Refusal(Reason.MALFORMED, sender[:64], "", why) for why in bad]
        if refused:
            self._refused(refused, peer, now)
        if updates:
            self._handle(self.swim.merge(updates, now))
            self._poke()

    def _sign(self, rec: Record, incarnation: int, state: State) -> Proof:
        metrics.SIGNATURE_OPS.labels(op="sign").inc()
        return self.key.sign(rec, incarnation, state)

    def _refused(self, refused: list[Refusal], peer: str, now: float) -> None:
        for r in refused:
            metrics.MEMBERSHIP_REFUSED.labels(reason=r.reason.value).inc(r.count)
        for line in self.refusals.add(refused, peer, now):
            log.warning("%s", line)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._in_flight.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("membership: background message failed: %s", task.exception())

    async def _probe(self, name: str, addr: str, timeout: float) -> Any:
        """A direct probe: the reply if `name` itself answered at `addr`, else None."""
        h = self.health.setdefault(name, PeerHealth())
        req = pb.ProbeRequest(sender=self.name, seq=next(self._seq), target=name,
                              updates=self._piggyback(name))
        t0 = time.perf_counter()
        try:
            reply = await self._call("probe", addr, name, "Probe", req, timeout)
        except RpcFailed as exc:
            h.grpc_error = str(exc)
            return None
        if reply.responder != name:
            h.grpc_error = f"{addr} answered as {reply.responder or 'nobody'}"
            return None
        h.grpc_rtt_us, h.grpc_error = int((time.perf_counter() - t0) * 1e6), None
        self._merge(reply.updates, name, addr)
        return reply

    async def _direct(self, p: Probe) -> None:
        """The direct probe of a round: an answer before the round ends is an ack."""
        reply = await self._probe(p.target, p.addr, p.time_left(time.monotonic()))
        if reply is not None:
            self.swim.probe_ack(p.seq, time.monotonic(), True, int(reply.incarnation))

    async def _tunnel_probe(self, name: str, timeout: float) -> None:
        h = self.health.setdefault(name, PeerHealth())
        node = self._programmed_record(name)
        port = node.grpc_addr.rpartition(":")[2] if node is not None else ""
        if node is None or not port:
            return
        req = pb.ProbeRequest(sender=self.name, seq=next(self._seq), target=name, tunnel=True)
        t0 = time.perf_counter()
        try:
            reply = await self._call("tunnel-probe", hostport(node.vtep_ip, port), name, "Probe",
                                     req, timeout)
        except RpcFailed as exc:
            h.tunnel_error = str(exc)
            return
        if reply.responder != name:
            h.tunnel_error = f"{node.vtep_ip} answered as {reply.responder or 'nobody'}"
            return
        h.tunnel_rtt_us, h.tunnel_error = int((time.perf_counter() - t0) * 1e6), None

    def _programmed_record(self, name: str) -> NodeRecord | None:
        for rec, source in self._programmed:
            if rec.node == name and source != "left":
                return rec
        return None

    async def _indirect(self, helper: Member, p: Probe) -> None:
        """Ask `helper` to probe the round's target; its answer is an ack or a nack."""
        left = p.time_left(time.monotonic())
        # The helper gives up a little before our round ends, so that its nack arrives.
        req = pb.IndirectProbeRequest(sender=self.name, seq=next(self._seq), target=p.target,
                                      target_addr=p.addr, timeout_ms=max(1, int(left * 800)))
        try:
            reply = await self._call("indirect-probe", helper.addr, helper.name,
                                     "IndirectProbe", req, left)
        except RpcFailed:
            return
        self._merge(reply.updates, helper.name, helper.addr)
        if reply.ack:
            self.swim.probe_ack(p.seq, time.monotonic(), direct=False)
        else:
            self.swim.probe_nack(p.seq)

    async def _gossip_to(self, m: Member, timeout: float = 1.0) -> None:
        updates = self._piggyback(m.name)
        if not updates:
            return
        req = pb.GossipRequest(sender=self.name, updates=updates)
        try:
            reply = await self._call("gossip", m.addr, m.name, "Gossip", req, timeout)
        except RpcFailed:
            return
        self._merge(reply.updates, m.name, m.addr)

    async def _push_pull(self, m: Member, timeout: float = 2.0) -> bool:
        req = pb.PushPullRequest(sender=self.name,
                                 members=[update_pb(u) for u in self.swim.full_state()])
        try:
            reply = await self._call("push-pull", m.addr, m.name, "PushPull", req, timeout)
        except RpcFailed as exc:
            log.debug("membership: push-pull with %s failed: %s", m.name, exc)
            return False
        self._merge(reply.members, m.name, m.addr)
        return True

    # --- what changed ---------------------------------------------------------

    def _handle(self, changes: list[Change], etcd_changed: bool = False) -> None:
        for c in changes:
            self._log(c)
            if c.new is None:
                self.health.pop(c.name, None)
        if not etcd_changed and not any(c.data_plane for c in changes):
            return  # alive/suspect/dead: nothing the data plane sees (O(peers) to find out)
        programmed = [(p.record, p.source) for p in self.peers()]
        if programmed != self._programmed:
            self._programmed = programmed
            self.on_change()
        self._drop_unused_channels()

    def _log(self, c: Change) -> None:
        m = self.swim.members.get(c.name)
        by = f" (reported by {c.reporter})" if c.reporter and c.reporter not in (
            self.name, c.name, "etcd") else ""
        if c.new is None:
            log.info("membership: forgot %s (no lease in etcd, %s)", c.name,
                     c.old.label if c.old else "-")
        elif c.old is None:
            if c.reporter != "etcd":
                log.info("membership: new peer %s, %s at incarnation %d%s", c.name,
                         c.new.label, m.incarnation if m else 0, by)
        elif c.new != c.old:
            if c.new == State.SUSPECT:
                log.info("membership: %s is suspect: %s%s", c.name,
                         "no answer to direct and indirect probes" if c.reporter == self.name
                         else "suspected by a peer", by)
            elif c.new == State.DEAD:
                log.warning("membership: %s is dead: it did not refute the suspicion%s; its "
                            "subnet stays programmed while its lease is in etcd", c.name, by)
            elif c.new == State.LEFT:
                log.info("membership: %s left the cluster; its entries are removed", c.name)
            else:
                log.info("membership: %s is %s again (incarnation %d)", c.name, c.new.label,
                         m.incarnation if m else 0)
        if c.record_changed and c.new is not None and c.reporter != "etcd" and m is not None \
                and c.old is not None:
            log.info("membership: %s announced its record: underlay %s, VTEP %s, lease revision "
                     "%d", c.name, m.record.node.underlay_ip, m.record.node.vtep_mac,
                     m.record.lease_revision)

    def _drop_unused_channels(self) -> None:
        """Close channels to addresses no member has any more (a node moved)."""
        wanted = {(m.addr, n) for n, m in self.swim.members.items()}
        for rec, _ in self._programmed:
            port = rec.grpc_addr.rpartition(":")[2]
            wanted.add((hostport(rec.vtep_ip, port), rec.node))
        for key in list(self._channels):
            if key not in wanted:
                # The stub goes with its channel: a cached stub on a closed channel made
                # every call to a node that came back fail ("Channel is closed") for good.
                self._stubs.pop(key, None)
                self._spawn(self._channels.pop(key).close())


class _Servicer(pb_grpc.MembershipServicer):  # type: ignore[misc,unused-ignore]
    def __init__(self, ms: Membership) -> None:
        self.ms = ms

    async def _authorize(self, context: Any, claimed: str, what: str) -> None:
        """With mutual TLS, a peer may only speak for the node its certificate names."""
        metrics.GOSSIP_MESSAGES.labels(type=what, direction="in").inc()
        if self.ms.tls is None:
            return
        auth = context.auth_context()
        names = {v.decode(errors="replace") for k in ("x509_subject_alternative_name",
                                                      "x509_common_name")
                 for v in auth.get(k, [])}
        if claimed not in names:
            log.warning("membership: refused a %s from a certificate for %s claiming to be %r",
                        what, ", ".join(sorted(names)) or "nobody", claimed)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"certificate names {sorted(names)}, not {claimed!r}")

    def _count_in(self, req: Any) -> None:
        size = req.ByteSize()
        metrics.GOSSIP_BYTES.labels(direction="in").inc(size)
        self.ms.bytes_in += size

    def _count_out(self, reply: Any) -> Any:
        size = reply.ByteSize()
        metrics.GOSSIP_BYTES.labels(direction="out").inc(size)
        self.ms.bytes_out += size
        return reply

    async def Probe(self, request: Any, context: Any) -> Any:
        await self._authorize(context, request.sender, "tunnel-probe" if request.tunnel
                              else "probe")
        self._count_in(request)
        ms = self.ms
        if request.tunnel:
            return self._count_out(pb.ProbeReply(responder=ms.name, seq=request.seq,
                                                 incarnation=ms.swim.incarnation))
        ms._merge(request.updates, request.sender, context.peer())
        return self._count_out(pb.ProbeReply(
            responder=ms.name, seq=request.seq, incarnation=ms.swim.incarnation,
            updates=ms._piggyback(request.sender)))

    async def IndirectProbe(self, request: Any, context: Any) -> Any:
        await self._authorize(context, request.sender, "indirect-probe")
        self._count_in(request)
        ms = self.ms
        timeout = min(MAX_INDIRECT_TIMEOUT, max(0.01, request.timeout_ms / 1000))
        target = ms.swim.members.get(request.target)
        if request.target == ms.name:
            ok = True
        elif target is not None and target.probeable:
            # Only members, at the address we know: nobody can make us probe anything else.
            ok = await ms._probe(request.target, target.addr, timeout) is not None
        else:
            ok = False
        return self._count_out(pb.IndirectProbeReply(ack=ok, seq=request.seq,
                                                      updates=ms._piggyback(request.sender)))

    async def PushPull(self, request: Any, context: Any) -> Any:
        await self._authorize(context, request.sender, "push-pull")
        self._count_in(request)
        ms = self.ms
        reply = pb.PushPullReply(members=[update_pb(u) for u in ms.swim.full_state()])
        ms._merge(request.members, request.sender, context.peer())
        return self._count_out(reply)

    async def Gossip(self, request: Any, context: Any) -> Any:
        await self._authorize(context, request.sender, "gossip")
        self._count_in(request)
        ms = self.ms
        ms._merge(request.updates, request.sender, context.peer())
        return self._count_out(pb.GossipReply(updates=ms._piggyback(request.sender)))

    async def Leave(self, request: Any, context: Any) -> Any:
        await self._authorize(context, request.name, "leave")
        self._count_in(request)
        ms = self.ms
        now = time.monotonic()
        claim: Claim | None = None
        refusal: Refusal | None = None
        u: Update | None = None
        try:
            if request.HasField("signed"):
                claim = claim_from_pb(pb.MemberUpdate(state=pb.PEER_STATE_LEFT,
                                                      reporter=request.name,
                                                      signed=request.signed))
        except ConfigError as exc:
            refusal = Refusal(Reason.MALFORMED, request.name[:64], request.name[:64], str(exc))
        else:
            u, refusal = ms.gate.admit_leave(claim, request.name, ms.swim.members, now)
        if refusal is not None:
            ms._refused([refusal], context.peer(), now)
        elif u is not None:
            ms._handle(ms.swim.merge([u], now))
            ms._poke()
        return self._count_out(pb.LeaveReply())
