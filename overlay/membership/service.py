"""The membership shell: the Membership gRPC service, its clients, and the timers.

All decisions are the pure core's (`swim.Swim`); this module only moves
messages, measures round trips, keeps one channel per peer address and
turns what the core changed into logs, metrics and a reconcile wake-up.

Per probe interval one peer is probed directly and, concurrently, through
the VXLAN tunnel (its gRPC port on its VTEP address, which routes through
our VXLAN device): the tunnel round trip is shown in status but never used
for liveness, so that a broken tunnel is visible as such and not mistaken
for a dead node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
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
from overlay.membership.swim import Change, Member, Proof, Record, State, Swim, SwimConfig, Update
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
        self._creds = tlsmod.channel_credentials(tls) if tls is not None else None
        self._seq = itertools.count(1)
        self._server: Any = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._verifications = 0
        self._updates_in = {r: metrics.GOSSIP_UPDATES.labels(result=r)
                            for r in ("admitted", "ignored", "refused")}
        self._programmed: list[tuple[NodeRecord, Source]] = []
        self._pull_soon: set[str] = set()
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
        server = grpc.aio.server(options=[*COMMON_OPTIONS, ("grpc.so_reuseport", 0)])
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

    async def run(self) -> None:
        """Join (full exchange with the known peers), then probe, gossip and
        push-pull forever."""
        await self.join()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._loop("probe", self.cfg.probe_interval, self._probe_once))
            tg.create_task(self._loop("gossip", self.cfg.gossip_interval, self._gossip_once))
            tg.create_task(self._loop("push-pull", self.cfg.push_pull_interval,
                                      self._push_pull_once, jitter=0.2))
            tg.create_task(self._loop("tick", 0.1, self._tick_once))

    async def _loop(self, what: str, interval: float, step: Callable[[], Awaitable[None]],
                    jitter: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        said = Once()
        while True:
            t0 = loop.time()
            try:
                await step()
                said.reset()
            except Exception as exc:  # a membership bug must not take the node agent down
                if said.changed(str(exc)):
                    log.warning("membership %s step failed: %s", what, exc, exc_info=exc)
            wait = interval * (1 + jitter * (2 * self.swim.rng.random() - 1))
            await asyncio.sleep(max(0.0, wait - (loop.time() - t0)))

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

    def set_self(self, rec: NodeRecord, lease_revision: int) -> None:
        """Our lease changed (re-taken, moved, or new details): announce it."""
        if self.swim.set_self(Record(rec, lease_revision)):
            log.info("membership: announcing our record at incarnation %d (lease revision %d)",
                     self.swim.incarnation, lease_revision)

    def peers(self) -> list[Peer]:
        return effective_peers(self.etcd_entries(), self.swim.members, self.name)

    def peer_records(self) -> list[NodeRecord]:
        """What the data plane programs (the reconciler's peer source)."""
        return programmable(self.peers())

    def condition(self) -> tuple[bool, str]:
        c = self.swim.counts()
        parts = [f"{c[s]} {s.label}" for s in State if c[s]]
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

    def _channel(self, addr: str, name: str) -> Any:
        key = (addr, name)
        ch = self._channels.get(key)
        if ch is None:
            if self._creds is not None:
                # Verify the peer's certificate against its node name, whatever the address.
                opts = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)]
                ch = grpc.aio.secure_channel(addr, self._creds, options=opts)
            else:
                ch = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            self._channels[key] = ch
        return ch

    async def _call(self, kind: str, addr: str, name: str, method: str, req: Any,
                    timeout: float) -> Any:
        stub = pb_grpc.MembershipStub(self._channel(addr, name))
        size = req.ByteSize()
        metrics.GOSSIP_MESSAGES.labels(type=kind, direction="out").inc()
        metrics.GOSSIP_BYTES.labels(direction="out").inc(size)
        self.bytes_out += size
        try:
            reply = await getattr(stub, method)(req, timeout=max(timeout, 0.01))
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            raise RpcFailed(_rpc_error(exc)) from None
        size = reply.ByteSize()
        metrics.GOSSIP_BYTES.labels(direction="in").inc(size)
        self.bytes_in += size
        return reply

    def _piggyback(self, about: str) -> list[Any]:
        updates = self.swim.piggyback(about=about)
        m = self.swim.members.get(about)
        if m is not None and m.state in (State.SUSPECT, State.DEAD) and \
                not any(u.name == about for u in updates):
            # It must learn what we believe about it, to refute if it is alive.
            updates.append(Update(m.record, m.state, m.incarnation, self.name))
        return [update_pb(u) for u in updates]

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

    async def _probe(self, name: str, addr: str, timeout: float) -> bool:
        """A direct probe; True if `name` itself answered at `addr`."""
        h = self.health.setdefault(name, PeerHealth())
        req = pb.ProbeRequest(sender=self.name, seq=next(self._seq), target=name,
                              updates=self._piggyback(name))
        t0 = time.perf_counter()
        try:
            reply = await self._call("probe", addr, name, "Probe", req, timeout)
        except RpcFailed as exc:
            h.grpc_error = str(exc)
            return False
        if reply.responder != name:
            h.grpc_error = f"{addr} answered as {reply.responder or 'nobody'}"
            return False
        h.grpc_rtt_us, h.grpc_error = int((time.perf_counter() - t0) * 1e6), None
        self._merge(reply.updates, name, addr)
        cur = self.swim.members.get(name)
        if cur is not None and reply.incarnation > cur.incarnation:
            self._pull_soon.add(name)  # it has news we missed: fetch its record
        return True

    async def _tunnel_probe(self, m: Member, timeout: float) -> None:
        h = self.health.setdefault(m.name, PeerHealth())
        node = self._programmed_record(m.name)
        port = node.grpc_addr.rpartition(":")[2] if node is not None else ""
        if node is None or not port:
            return
        req = pb.ProbeRequest(sender=self.name, seq=next(self._seq), target=m.name, tunnel=True)
        t0 = time.perf_counter()
        try:
            reply = await self._call("tunnel-probe", hostport(node.vtep_ip, port), m.name, "Probe",
                                     req, timeout)
        except RpcFailed as exc:
            h.tunnel_error = str(exc)
            return
        if reply.responder != m.name:
            h.tunnel_error = f"{node.vtep_ip} answered as {reply.responder or 'nobody'}"
            return
        h.tunnel_rtt_us, h.tunnel_error = int((time.perf_counter() - t0) * 1e6), None

    def _programmed_record(self, name: str) -> NodeRecord | None:
        for rec, source in self._programmed:
            if rec.node == name and source != "left":
                return rec
        return None

    async def _indirect(self, helper: Member, target: Member, timeout: float) -> bool:
        req = pb.IndirectProbeRequest(sender=self.name, seq=next(self._seq), target=target.name,
                                      target_addr=target.addr,
                                      timeout_ms=max(1, int(timeout * 800)))
        try:
            reply = await self._call("indirect-probe", helper.addr, helper.name, "IndirectProbe",
                                     req, timeout)
        except RpcFailed:
            return False
        self._merge(reply.updates, helper.name, helper.addr)
        return bool(reply.ack)

    async def _probe_once(self) -> None:
        m = self.swim.next_probe()
        if m is not None:
            await self._probe_member(m)

    async def _probe_member(self, m: Member) -> None:
        """One probe round: direct, then indirect through helpers, within an interval;
        no answer makes it suspect (or confirms that it is)."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        end = loop.time() + cfg.probe_interval
        self._spawn(self._tunnel_probe(m, cfg.probe_interval))
        direct = asyncio.ensure_future(self._probe(m.name, m.addr, cfg.probe_interval))
        try:
            done, _ = await asyncio.wait({direct}, timeout=cfg.probe_timeout)
            if direct in done and direct.result():
                return
            if m.state == State.DEAD or self.swim.members.get(m.name) is not m:
                await asyncio.wait({direct}, timeout=max(0.0, end - loop.time()))
                return
            # No answer yet: ask helpers, and keep waiting for the direct answer too.
            waiting: set[asyncio.Future[bool]] = set() if direct.done() else {direct}
            for h in self.swim.helpers(m.name):
                waiting.add(asyncio.ensure_future(
                    self._indirect(h, m, max(0.01, end - loop.time()))))
            ok = False
            while waiting and not ok:
                finished, waiting = await asyncio.wait(
                    waiting, timeout=max(0.0, end - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    break
                ok = any(not t.cancelled() and t.exception() is None and t.result()
                         for t in finished)
            for t in waiting:
                t.cancel()
            if ok:
                return
            changes = self.swim.probe_failed(m.name, time.monotonic())
            self._handle(changes)
            if any(c.new == State.SUSPECT and c.old != State.SUSPECT for c in changes):
                # Tell the suspect at once: if it is alive it refutes in its answer.
                self._spawn(self._gossip_to(m, timeout=1.0))
        finally:
            if not direct.done():
                direct.cancel()

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

    async def _gossip_once(self) -> None:
        if not self.swim.pending():
            return
        for m in self.swim.gossip_targets():
            self._spawn(self._gossip_to(m))

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

    async def _push_pull_once(self) -> None:
        m = self.swim.push_pull_target()
        if m is not None:
            await self._push_pull(m)

    async def _tick_once(self) -> None:
        now = time.monotonic()
        self._handle(self.swim.tick(now))
        for line in self.refusals.flush(now):
            log.warning("%s", line)
        while self._pull_soon:
            name = self._pull_soon.pop()
            m = self.swim.members.get(name)
            if m is not None and m.addr:
                self._spawn(self._push_pull(m))

    # --- what changed ---------------------------------------------------------

    def _handle(self, changes: list[Change], etcd_changed: bool = False) -> None:
        for c in changes:
            self._log(c)
            if c.new is None:
                self.health.pop(c.name, None)
            if c.new == State.SUSPECT and c.old != State.SUSPECT and c.reporter != self.name \
                    and self.swim.should_probe_suspect():
                # Heard of a suspicion: check for ourselves now. A crash is confirmed
                # within an interval; a live suspect learns it is suspected and refutes.
                m = self.swim.members.get(c.name)
                if m is not None and m.addr:
                    self._spawn(self._probe_member(m))
        if not changes and not etcd_changed:
            return  # nothing the data plane sees can differ (O(peers) to find out)
        programmed = [(p.record, p.source) for p in self.peers()]
        if programmed != self._programmed:
            self._programmed = programmed
            self.on_change()
        if changes:
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
            ok = await ms._probe(request.target, target.addr, timeout)
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
        return self._count_out(pb.LeaveReply())
