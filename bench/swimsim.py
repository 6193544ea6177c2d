#!/usr/bin/env python3
"""Membership past this machine, by simulation: the real pure `Swim` core at 100 to
10,000 members, next to memberlist's LAN defaults run through the same simulator.

Every member is a `overlay.membership.swim.Swim`, driven exactly as the agent's
shell drives it (`service.py`): sleep until `next_wake()`, do what `on_timer()`
returns, merge what arrives, answer probes with `news_for()`. Only the
transport is simulated, on a simulated clock with a priority queue of events:

  latency   one way: 0.25 ms + an exponential of mean 0.25 ms (a LAN)
  loss      every message (request or reply) is lost with probability --loss,
            as UDP loses it (memberlist's transport; the agents' gRPC over TCP
            retransmits instead, so this is the harsher case for us)
  stalls    members stop for 1 s at a time (CPU starvation, SIGSTOP), at random
            times, --stalls per member and hour (at least 10 s apart: two back to
            back would be one longer outage): what arrives meanwhile waits, their
            timers fire late
  crashes   one member at a time stops for good, every --crash-every s

Reported per run, from the members' own state changes: crash detection (the
time each live member needs to see the crashed one DEAD: p50, p99, and the
slowest member per crash), false DEAD (a member that was alive declared dead
by someone) per member-hour, and messages and payload bytes (protobuf sizes of
the agents' messages: each of our updates carries its subject's signed
statement and 64-byte ed25519 signature as the agents send it, memberlist's
the unsigned record; no HTTP/2 or TCP overhead; signatures are sized, not
made or checked) sent per member per second,
the periodic full exchange (push-pull) at its average rate (a run is shorter
than its interval at 10,000 members).

The reference is memberlist's DefaultLANConfig as the issue names it: probe
every 1 s, 500 ms timeout, 3 indirect probes, suspicion 4 * log10(N) s with no
Lifeguard (no confirmations, no Local Health Awareness), gossip to 3 members
every 200 ms as one-way messages, push-pull every 30 s (scaled as memberlist
does), dead members not probed.

Deterministic: the same --seed gives the same figures. Writes
bench/results/swimsim.json; bench/report.py plots it against N.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from overlay.membership.swim import (  # noqa: E402
    Change,
    Due,
    Probe,
    Proof,
    Record,
    Roster,
    State,
    Swim,
    SwimConfig,
    Update,
)
from overlay.model import NodeRecord  # noqa: E402

OURS = SwimConfig()
MEMBERLIST = SwimConfig(
    probe_interval=1.0, probe_timeout=0.5, probe_timeout_max=0.5, indirect_probes=3,
    suspect_timeout=4.0, suspect_timeout_max=4.0, confirmed_log_factor=1.0, confirmations=0,
    suspect_probers=0,
    gossip_interval=0.2, gossip_fanout=3, gossip_sends=10**9, retransmit_mult=4,
    push_pull_interval=30.0,
    health_max=0, adaptive_timeout=False, stall_threshold=math.inf, probe_dead=False,
)
CONFIGS = {"ours": OURS, "memberlist": MEMBERLIST}

# Message kinds (requests; a reply is counted with its request's kind).
PROBE, INDIRECT, GOSSIP, PUSHPULL = range(4)
KINDS = ("probe", "indirect-probe", "gossip", "push-pull")
HEADER = 24          # sender name, seq and framing of a request or reply, bytes
INDIRECT_MAX = 2.0   # the agent's MAX_INDIRECT_TIMEOUT
RPC_TIMEOUT = {GOSSIP: 1.0, PUSHPULL: 2.0}
STALL_GAP = 10.0     # s between the stalls of one member at least


@dataclass(frozen=True)
class Scenario:
    n: int
    seconds: float = 60.0
    loss: float = 0.05
    latency: float = 0.00025
    stalls_per_hour: float = 30.0   # per member
    stall_seconds: float = 1.0
    crash_every: float = 20.0
    warmup: float = 5.0
    seed: int = 1


def record(i: int) -> Record:
    a, b = divmod(i, 250)
    ip = f"172.{16 + a // 250}.{a % 250}.{b + 1}"
    node = NodeRecord(f"m{i}", IPv4Network(f"10.{a // 250}.{a % 250}.{b}/32"),
                      IPv4Address(ip), f"02:00:00:{a // 250:02x}:{a % 250:02x}:{b:02x}",
                      f"{ip}:7946")
    return Record(node, 1, _proof(Record(node, 1)))


# An agent's incarnation starts at its start time in ms: six bytes as a varint.
TYPICAL_INCARNATION = 1_796_086_707_863


def _proof(rec: Record) -> Proof:
    """A proof of the agents' size: the real statement, a signature of the right length
    (the simulated members neither sign nor verify: that cost is bench/signing.py's)."""
    from overlay.membership.wire import SIGNATURE_SIZE, statement_bytes

    return Proof(statement_bytes(rec, TYPICAL_INCARNATION, State.ALIVE),
                 bytes(SIGNATURE_SIZE), "ed25519:" + "A" * 43 + "=")


def update_size(u: Update, signed: bool = True) -> int:
    """Bytes of `u` in a message: an overlay.v1.MemberUpdate in a repeated field. Ours
    carries the subject's signed statement; unsigned (the reference, which signs
    nothing) it carries the record and incarnation as such."""
    from overlay.membership.wire import pb_state, record_pb, update_pb
    from overlay.v1 import overlay_pb2 as pb

    msg = update_pb(u) if signed else pb.MemberUpdate(
        record=record_pb(u.record.node, u.record.lease_revision, u.incarnation),
        state=pb_state(u.state), incarnation=u.incarnation, reporter=u.reporter)
    n = msg.ByteSize()
    return n + 1 + (1 if n < 128 else 2)


@dataclass
class Node:
    i: int
    name: str
    swim: Swim
    crashed: bool = False
    stalled_until: float = 0.0
    wake_at: float = math.inf       # the timer event in the queue
    deferred: list[tuple[float, int, tuple[Any, ...]]] = field(default_factory=list)
    sent: int = 0
    bytes: int = 0


class Sim:
    def __init__(self, sc: Scenario, cfg: SwimConfig, gossip_replies: bool = True,
                 signed: bool = True) -> None:
        self.sc, self.cfg = sc, cfg
        self.gossip_replies = gossip_replies
        self.rng = random.Random(sc.seed)
        self.now = 0.0
        self._q: list[tuple[float, int, int, tuple[Any, ...]]] = []
        self._seq = 0
        records = [record(i) for i in range(sc.n)]
        roster = Roster(records)
        self.nodes = [Node(i, r.name, Swim(r, 1, cfg, random.Random(sc.seed * 1_000_003 + i),
                                           roster)) for i, r in enumerate(records)]
        self.by_name = {n.name: n for n in self.nodes}
        self.size = {r.name: update_size(Update(r, State.SUSPECT, TYPICAL_INCARNATION, r.name),
                                         signed) for r in records}
        self.crash_at: dict[str, float] = {}          # crashed and not back yet
        self.crashes: list[tuple[str, list[str], dict[str, float]]] = []  # victim, observers, seen
        self.detected: dict[str, dict[str, float]] = {}
        self.roster = roster
        self.false_dead: list[tuple[float, str, str]] = []   # (time, observer, subject)
        self.false_dead_subjects: set[tuple[str, int]] = set()
        self.suspicions = 0
        self.stalls = 0
        self.counted_from = sc.warmup
        self.msgs = [0, 0, 0, 0]
        self.events = 0
        self._rid = 0
        self._pending: set[int] = set()
        self._full_bytes = sum(self.size.values())
        for node in self.nodes:
            node.swim.start(0.0)
            self._arm(node)
        if sc.stalls_per_hour > 0:
            rate = sc.stalls_per_hour * sc.n / 3600
            t = self.rng.expovariate(rate)
            while t < sc.seconds:
                self._push(t, 5, (self.rng.randrange(sc.n),))
                t += self.rng.expovariate(rate)
        t = sc.warmup
        while t + sc.crash_every <= sc.seconds:
            self._push(t, 6, ())
            t += sc.crash_every

    # --- the event queue ---------------------------------------------------------

    def _push(self, t: float, kind: int, args: tuple[Any, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, kind, args))

    def _arm(self, node: Node) -> None:
        """(Re)schedule the node's timer if its core wants to run earlier than queued."""
        if node.crashed:
            return
        t = node.swim.next_wake()
        if t < node.wake_at:
            node.wake_at = t
            self._push(max(t, self.now), 0, (node, t))

    def run(self) -> dict[str, Any]:
        t0 = time.process_time()
        end = self.sc.seconds
        handlers = (self._on_wake, self._on_request, self._on_reply, self._on_timeout,
                    None, self._on_stall, self._on_crash, self._on_resume, self._on_restart)
        q = self._q
        while q and q[0][0] <= end:
            t, _, kind, args = heapq.heappop(q)
            self.now = t
            self.events += 1
            if kind in (0, 1, 2, 3):
                node = args[0] if kind == 0 else args[1] if kind == 1 else args[0]
                if node.crashed:
                    continue
                if node.stalled_until > t:  # stopped: it runs when it wakes up
                    node.deferred.append((t, kind, args))
                    continue
            handlers[kind](*args)  # type: ignore[misc]
        return self.results(time.process_time() - t0)

    # --- messages ----------------------------------------------------------------

    def _latency(self) -> float:
        return self.sc.latency + self.rng.expovariate(1 / self.sc.latency)

    def _send(self, src: Node, dst: Node, kind: int, payload: tuple[Any, ...],
              updates: list[Update], timeout: float, ctx: Any) -> None:
        """A request from src to dst; src hears back through `ctx` (reply or timeout)."""
        self._count(src, kind, updates)
        self._rid += 1
        rid = self._rid
        if ctx[0] == "helper":  # the only caller that acts on a timeout (a nack)
            self._pending.add(rid)
            self._push(self.now + timeout, 3, (src, rid, ctx))
        if self.rng.random() >= self.sc.loss:
            self._push(self.now + self._latency(), 1, (src, dst, kind, payload, updates,
                                                      (rid, self.now + timeout), ctx))

    def _count(self, src: Node, kind: int, updates: list[Update]) -> None:
        if self.now < self.counted_from or kind == PUSHPULL:
            return  # push-pull: counted at its average rate (see results)
        src.sent += 1
        src.bytes += HEADER + sum(self.size[u.name] for u in updates)
        self.msgs[kind] += 1

    def _reply(self, dst: Node, src: Node, kind: int, payload: tuple[Any, ...],
               updates: list[Update], rid: tuple[int, float], ctx: Any) -> None:
        self._count(dst, kind, updates)
        if self.rng.random() >= self.sc.loss:
            self._push(self.now + self._latency(), 2, (src, dst, kind, payload, updates, rid,
                                                      ctx))

    def _on_request(self, src: Node, dst: Node, kind: int, payload: tuple[Any, ...],
                    updates: list[Update], rid: tuple[int, float], ctx: Any) -> None:
        """`dst` handles a request as the agent's servicer does."""
        sw = dst.swim
        if kind == PROBE:
            self._changes(dst, sw.merge(updates, self.now))
            self._reply(dst, src, kind, (sw.incarnation,), sw.news_for(src.name), rid, ctx)
        elif kind == GOSSIP:
            self._changes(dst, sw.merge(updates, self.now))
            if self.gossip_replies:  # ours is an RPC: the reply carries news back
                self._reply(dst, src, kind, (), sw.news_for(src.name), rid, ctx)
        elif kind == PUSHPULL:
            state = sw.full_state(roster=False)
            self._changes(dst, sw.merge(updates, self.now))
            self._reply(dst, src, kind, (), state, rid, ctx)
        elif kind == INDIRECT:
            target, timeout = payload
            m = sw.members.get(target)
            if m is None or not m.probeable:
                self._reply(dst, src, kind, (False,), sw.news_for(src.name), rid, ctx)
            else:
                tnode = self.by_name[target]
                self._send(dst, tnode, PROBE, (), sw.news_for(target), timeout,
                           ("helper", src, rid, ctx))
        self._arm(dst)

    def _on_reply(self, src: Node, dst: Node, kind: int, payload: tuple[Any, ...],
                  updates: list[Update], rid: tuple[int, float], ctx: Any) -> None:
        """`src` hears back from `dst`, unless its deadline passed (then gRPC has failed
        the call already)."""
        if self.now > rid[1]:
            return
        if ctx[0] == "helper":
            if rid[0] not in self._pending:
                return
            self._pending.discard(rid[0])
        sw = src.swim
        self._changes(src, sw.merge(updates, self.now))
        what = ctx[0]
        if what == "direct":
            sw.probe_ack(ctx[1], self.now, True, payload[0])
        elif what == "indirect":
            if payload[0]:
                sw.probe_ack(ctx[1], self.now, direct=False)
            else:
                sw.probe_nack(ctx[1])
        elif what == "helper":  # our probe for someone else's round came back: ack it
            _, asker, arid, actx = ctx
            self._reply(src, asker, INDIRECT, (True,), sw.news_for(asker.name), arid, actx)
        self._arm(src)

    def _on_timeout(self, src: Node, rid: int, ctx: Any) -> None:
        """A helper's probe went unanswered: it tells the asker (a nack)."""
        if rid not in self._pending:
            return
        self._pending.discard(rid)
        _, asker, arid, actx = ctx
        sw = src.swim
        self._reply(src, asker, INDIRECT, (False,), sw.news_for(asker.name), arid, actx)

    # --- timers: the shell's _act -------------------------------------------------

    def _on_wake(self, node: Node, t: float) -> None:
        if t != node.wake_at:
            return  # superseded by an earlier timer
        node.wake_at = math.inf
        sw = node.swim
        if sw.next_wake() > self.now:
            self._arm(node)
            return
        due: Due = sw.on_timer(self.now)
        self._changes(node, due.changes)
        p: Probe | None = due.probe
        if p is not None:
            dst = self.by_name[p.target]
            self._send(node, dst, PROBE, (), sw.news_for(p.target), p.time_left(self.now),
                       ("direct", p.seq))
        if due.round is not None:
            r = due.round
            left = r.time_left(self.now)
            for h in due.indirect:
                self._send(node, self.by_name[h.name], INDIRECT,
                           (r.target, min(INDIRECT_MAX, left * 0.8)), [], left,
                           ("indirect", r.seq))
        for m in due.gossip:
            updates = sw.news_for(m.name)
            if updates:
                self._send(node, self.by_name[m.name], GOSSIP, (), updates,
                           RPC_TIMEOUT[GOSSIP], ("gossip",))
        if due.push_pull is not None:
            self._send(node, self.by_name[due.push_pull.name], PUSHPULL, (),
                       sw.full_state(roster=False), RPC_TIMEOUT[PUSHPULL], ("push-pull",))
        self._arm(node)

    # --- faults -------------------------------------------------------------------

    def _on_stall(self, i: int) -> None:
        node = self.nodes[i]
        if node.crashed or node.stalled_until > self.now - STALL_GAP:
            return  # one stall at a time: two back to back would be a longer one
        self.stalls += 1
        node.stalled_until = self.now + self.sc.stall_seconds
        self._push(node.stalled_until, 7, (node,))

    def _on_resume(self, node: Node) -> None:
        """Back from a stall: what arrived meanwhile first (the event loop reads its
        sockets before it runs its timers), then the timers."""
        work = sorted(node.deferred, key=lambda e: (e[1] == 0, e[0]))
        node.deferred = []
        # (stalled_until stays: the end of its last stall)
        for _, kind, args in work:
            if node.crashed:
                return
            if kind == 0:
                node.wake_at = math.inf
                self._arm(node)
                continue
            (self._on_request if kind == 1 else self._on_reply if kind == 2
             else self._on_timeout)(*args)
        self._arm(node)

    def _on_crash(self) -> None:
        alive = [n for n in self.nodes if not n.crashed and n.stalled_until <= self.now]
        victim = alive[self.rng.randrange(len(alive))]
        victim.crashed = True
        victim.deferred = []
        self.crash_at[victim.name] = self.now
        seen: dict[str, float] = {}
        self.detected[victim.name] = seen
        self.crashes.append((victim.name, [n.name for n in alive if n is not victim], seen))
        # it comes back (a new life) just before the next crash
        self._push(self.now + self.sc.crash_every - 1.0, 8, (victim,))

    def _on_restart(self, node: Node) -> None:
        """The crashed node's agent starts again: a higher incarnation, and a full
        exchange with a random member (the agent's join)."""
        del self.crash_at[node.name]
        del self.detected[node.name]
        old = node.swim
        node.swim = Swim(old.me, old.incarnation + 1, self.cfg,
                         random.Random(self.rng.random()), self.roster)
        node.crashed, node.wake_at = False, math.inf
        node.swim.start(self.now)
        target = node.swim.push_pull_target()
        if target is not None:
            self._send(node, self.by_name[target.name], PUSHPULL, (),
                       node.swim.full_state(roster=False), RPC_TIMEOUT[PUSHPULL], ("join",))
        self._arm(node)

    def _changes(self, node: Node, changes: list[Change]) -> None:
        for c in changes:
            if c.new == State.SUSPECT and c.old != State.SUSPECT and c.reporter == node.name:
                self.suspicions += 1  # raised here (not heard from others)
            if c.new not in (State.DEAD, None) or c.old in (State.DEAD, None):
                continue
            t0 = self.crash_at.get(c.name)
            if t0 is not None:
                self.detected[c.name].setdefault(node.name, self.now - t0)
            else:
                m = node.swim.members.get(c.name)
                self.false_dead.append((self.now, node.name, c.name))
                self.false_dead_subjects.add((c.name, m.incarnation if m else 0))

    # --- results --------------------------------------------------------------------

    def results(self, cpu: float) -> dict[str, Any]:
        sc = self.sc
        per_member, slowest, missed = [], [], 0
        for _victim, observers, seen in self.crashes:
            observers = [o for o in observers if not self.by_name[o].crashed]
            for o in observers:
                if o in seen:
                    per_member.append(seen[o])
                else:
                    missed += 1
            if observers and all(o in seen for o in observers):
                slowest.append(max(seen[o] for o in observers))
        per_member.sort()
        window = sc.seconds - sc.warmup
        member_hours = sc.n * window / 3600
        live = [n for n in self.nodes if not n.crashed]
        # Push-pull at its average rate: a run is shorter than one interval at 10,000
        # members. Each member starts one exchange per interval and answers about one:
        # two messages, each with every member's record.
        pp_interval = self.cfg.push_pull_interval * self.cfg.push_pull_scale(sc.n)
        pp_msgs = 2 / pp_interval
        pp_bytes = 2 * (HEADER + self._full_bytes) / pp_interval
        sent = sum(n.sent for n in live) + pp_msgs * len(live) * window
        nbytes = sum(n.bytes for n in live) + pp_bytes * len(live) * window
        return {
            "n": sc.n,
            "crashes": len(self.crashes),
            "detect_p50_s": _pct(per_member, 50),
            "detect_p99_s": _pct(per_member, 99),
            "detect_all_max_s": round(max(slowest), 3) if slowest else None,
            "detect_all_s": [round(x, 3) for x in slowest],
            "undetected_views": missed,
            "false_dead_per_member_hour": round(len(self.false_dead) / member_hours, 4),
            "false_dead_views": len(self.false_dead),
            "false_dead_members": len(self.false_dead_subjects),
            "suspicions_per_member_hour": round(self.suspicions / member_hours, 2),
            "stalls": self.stalls,
            "msgs_per_member_s": round(sent / len(live) / window, 3),
            "bytes_per_member_s": round(nbytes / len(live) / window, 1),
            "msgs_by_kind_per_member_s": {**{KINDS[k]: round(v / len(live) / window, 3)
                                             for k, v in enumerate(self.msgs)},
                                          "push-pull": round(pp_msgs, 4)},
            "push_pull_bytes_per_member_s": round(pp_bytes, 1),
            "max_health": max(n.swim.health for n in live),
            "events": self.events,
            "cpu_s": round(cpu, 1),
        }


def _pct(v: list[float], p: float) -> float | None:
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))
    return round(v[k], 3)


def simulate(sc: Scenario, cfg: SwimConfig) -> dict[str, Any]:
    """One run; memberlist's gossip is a one-way UDP message, ours a gRPC call whose
    reply carries the receiver's news back; memberlist's updates are unsigned."""
    ours = cfg is not MEMBERLIST
    return Sim(sc, cfg, gossip_replies=ours, signed=ours).run()


def _run(job: tuple[str, str, Scenario]) -> tuple[str, str, int, dict[str, Any]]:
    scenario, config, sc = job
    return scenario, config, sc.n, simulate(sc, CONFIGS[config])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="members, scenario 'loss'")
    ap.add_argument("--stall-sizes", default="100,1000", help="members, scenario 'stalls'")
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--stalls", type=float, default=30.0, help="stalls per member and hour")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from common import log, machine, write_result

    t_start = time.monotonic()

    def seconds(n: int) -> float:  # three crashes, or one at 10,000 (time is dear there)
        return 65.0 if n <= 3000 else 30.0

    jobs: list[tuple[str, str, Scenario]] = []
    for n in (int(x) for x in args.sizes.split(",") if x):
        for c in CONFIGS:
            jobs.append(("loss", c, Scenario(n, seconds(n), args.loss, stalls_per_hour=0.0,
                                             seed=args.seed)))
    for n in (int(x) for x in args.stall_sizes.split(",") if x):
        for c in CONFIGS:
            jobs.append(("stalls", c, Scenario(n, seconds(n), args.loss,
                                               stalls_per_hour=args.stalls, seed=args.seed)))
    jobs.sort(key=lambda j: -j[2].n)  # the longest first
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    with ProcessPoolExecutor(max(1, args.jobs)) as ex:
        for scenario, config, n, r in ex.map(_run, jobs):
            runs.setdefault(scenario, {}).setdefault(config, {})[str(n)] = r
            log(f"  {scenario:6s} {config:10s} N={n:5d}: crash seen by all: p50 "
                f"{r['detect_p50_s']} s, p99 {r['detect_p99_s']} s (slowest member "
                f"{r['detect_all_max_s']} s); false dead {r['false_dead_per_member_hour']}/"
                f"member-h; {r['msgs_per_member_s']} msg/s, {r['bytes_per_member_s']:.0f} B/s "
                f"per member ({r['cpu_s']} s CPU)")
    doc = {"benchmark": "swimsim", "machine": machine(),
           "scenarios": {
               "loss": {"loss": args.loss, "stalls_per_member_hour": 0.0},
               "stalls": {"loss": args.loss, "stalls_per_member_hour": args.stalls,
                          "stall_seconds": Scenario(1).stall_seconds},
               "common": {"latency_s": Scenario(1).latency, "crash_every_s":
                          Scenario(1).crash_every, "seed": args.seed}},
           "configs": {k: vars(v) for k, v in CONFIGS.items()}, "runs": runs,
           "wall_seconds": round(time.monotonic() - t_start, 1)}
    write_result("swimsim", doc)
    lo = runs.get("loss", {})
    for c, by_n in lo.items():
        ns = sorted(by_n, key=int)
        if len(ns) > 1:
            a, b = by_n[ns[0]]["msgs_per_member_s"], by_n[ns[-1]]["msgs_per_member_s"]
            print(f"{c}: messages per member per second {a} at {ns[0]} members, {b} at "
                  f"{ns[-1]} (x{b / a:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CONFIGS", "MEMBERLIST", "OURS", "Scenario", "Sim", "replace", "simulate"]
