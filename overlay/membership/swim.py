"""The SWIM membership protocol as pure data and decisions: no I/O, no clock.

The shell (`service.py`) and the simulator (`bench/swimsim.py`) move the
messages; everything they must decide is asked here, with the current
monotonic time passed in, so that the protocol is tested with a fake clock
and simulated at sizes one machine cannot run. The timers are the core's
too: the driver sleeps until `next_wake()`, calls `on_timer(now)` and does
what the returned `Due` says.

- Failure detection: one probe round per interval, round-robin over a list
  reshuffled every round (every member is probed within one round). A round
  sends a direct probe; without an answer by the probe timeout it asks
  `indirect_probes` helpers to probe too; without any answer by the end of
  the round the target becomes SUSPECT. A suspect that does not refute (by
  announcing a higher incarnation) within the suspicion timeout is DEAD.
- Work per member and round is constant: a round is the only thing that
  probes, so one suspicion never makes the cluster probe more. Members that
  hear of a new suspicion (about `suspect_probers` of them, whatever the
  cluster size) make the suspect their next target instead of the
  round-robin one: a crash is confirmed within an interval, and a live
  suspect learns from those probes that it is suspected and refutes.
- Suspicion timeout (Lifeguard, as in HashiCorp memberlist): long
  (`suspect_timeout_max`) while one member alone suspects, shrinking to
  `suspect_timeout` as `confirmations` other members independently fail to
  reach the suspect too; both grow with log10 of the cluster size.
- Local Health Awareness (Lifeguard, arXiv 1707.00788 section IV): a health
  score from 0 (healthy) to `health_max` rises when our own probes get
  neither acks nor the helpers' nacks, when we must refute a suspicion of
  ourselves, and when our timers fire late (we were starved of CPU); it
  falls with every direct ack. Probe interval and timeout, the gossip
  interval and our own suspicion timeouts are scaled by (1 + score): a node
  that is itself slow backs off instead of accusing healthy peers, and time
  we were stalled does not count against a suspect.
- Timeouts follow the round trips actually observed: the direct probe
  timeout is SRTT + 4 RTTVAR (RFC 6298), bounded by `probe_timeout` and
  `probe_timeout_max`, and the interval keeps its ratio to it.
- Dissemination: every state change is queued and piggybacked on probes and
  gossip messages, each at most `retransmit_limit(n)` times, least sent first.
- Merge: per member, a higher incarnation wins; at the same incarnation the
  stronger state wins (ALIVE < SUSPECT < DEAD < LEFT), so LEFT is final for an
  incarnation and only a new life of the node (a higher incarnation) undoes it.
- Members come from etcd (seeded at incarnation 0: never heard from) and from
  gossip; a member etcd no longer knows is forgotten once it is dead or left
  (after `reap_after`), and a tombstone keeps stale news from bringing it back.
- A record carries its `Proof`, the node's own signed statement of it, opaque
  here: the shell admits news only with a valid one (`admission.py`) and passes
  it on with every update about the node; our own is made by `sign` whenever
  our record, incarnation or leaving changes.

Everything a round or a timer does costs O(1) or O(changed members), never
O(cluster): the member pools below are kept up to date incrementally.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from overlay.errors import ConfigError
from overlay.model import NodeRecord

# At most this share of a probe interval waits for the direct ack; the rest is the
# helpers' (memberlist: 500 ms of 1 s).
TIMEOUT_SHARE = 0.6


class State(enum.IntEnum):
    """Values match overlay.v1.PeerState; the order is the precedence at equal incarnation."""

    ALIVE = 1
    SUSPECT = 2
    DEAD = 3
    LEFT = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Proof:
    """The node's signed statement of a record at an incarnation (overlay.v1
    SignedStatement), as received or made: relayed byte for byte. `key` is the public
    key that verified it (or made it)."""

    statement: bytes
    signature: bytes
    key: str = ""


@dataclass(frozen=True)
class Record:
    """A node's record as the node announces it: its lease facts and the etcd revision
    of the lease key it last read or wrote (0: unknown), with the node's proof of it
    (None: from etcd, or never signed)."""

    node: NodeRecord
    lease_revision: int = 0
    proof: Proof | None = field(default=None, compare=False)

    @cached_property
    def name(self) -> str:
        return self.node.node


@dataclass(frozen=True)
class Update:
    """One piece of membership news: `record` is in `state` at `incarnation`."""

    record: Record
    state: State
    incarnation: int
    reporter: str = ""

    @cached_property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True)
class SwimConfig:
    """Timings. The defaults detect a crashed node within 3 s at 10 nodes, do not
    declare a live node dead under 20% random packet loss (bench/membership.py), and
    keep every member's work per second flat in the cluster size (bench/swimsim.py)."""

    probe_interval: float = 0.5
    probe_timeout: float = 0.2         # floor of the direct-probe timeout
    probe_timeout_max: float = 1.0     # its ceiling while following round trips
    indirect_probes: int = 5
    suspect_timeout: float = 1.0       # once `confirmations` others suspect it too
    suspect_timeout_max: float = 3.0   # while only one member suspects it
    confirmed_log_factor: float = 0.5  # the confirmed timeout grows by log10(N) * this
    confirmations: int = 3
    suspect_probers: int = 3           # about this many members probe a new suspect next
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    gossip_sends: int = 6              # news is pushed by gossip until sent this often
    retransmit_mult: int = 4
    max_piggyback: int = 16
    push_pull_interval: float = 10.0   # at up to 32 members; longer in bigger clusters
    join_fanout: int = 16
    reap_after: float = 60.0
    health_max: int = 8                # Local Health Awareness; 0: off
    adaptive_timeout: bool = True      # the probe timeout follows observed round trips
    stall_threshold: float = 0.5       # a timer this late: we were starved of CPU
    probe_dead: bool = True            # keep probing dead members (they learn it, refute)

    def validate(self) -> None:
        if self.probe_interval <= 0:
            raise ConfigError("--probe-interval", "must be positive")
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ConfigError("--probe-timeout", "must be positive and below --probe-interval "
                              f"({self.probe_interval}s): the rest of the interval is left for "
                              "the indirect probes")
        if self.probe_timeout_max < self.probe_timeout:
            raise ConfigError("--probe-timeout", "exceeds its ceiling "
                              f"({self.probe_timeout_max}s)")
        if self.indirect_probes < 0:
            raise ConfigError("--indirect-probes", "must be >= 0")
        if self.suspect_timeout <= 0:
            raise ConfigError("--suspect-timeout", "must be positive")
        if self.suspect_timeout_max < self.suspect_timeout:
            raise ConfigError("--suspect-timeout-max", "must be at least --suspect-timeout "
                              f"({self.suspect_timeout}s)")
        if self.confirmations < 0 or self.suspect_probers < 0:
            raise ConfigError("confirmations", "must be >= 0")
        if self.push_pull_interval <= 0:
            raise ConfigError("--push-pull-interval", "must be positive")
        if self.gossip_interval <= 0 or self.gossip_fanout < 1:
            raise ConfigError("gossip", "interval must be positive and fan-out >= 1")
        if self.health_max < 0:
            raise ConfigError("health_max", "must be >= 0")
        if self.stall_threshold <= 0:
            raise ConfigError("stall_threshold", "must be positive")

    def suspicion_timeout(self, n: int, confirmations: int = 0,
                          could_confirm: int | None = None) -> float:
        """From `suspect_timeout_max` with no confirmation down to `suspect_timeout` with
        `confirmations` of them, or as many as the cluster can give (logarithmically, as
        Lifeguard); both longer in big clusters, where a refutation needs more hops: the
        unconfirmed one with log10(N) (memberlist's scale), the confirmed one slower
        (three independent members failed to reach it: a crash, not a lost packet)."""
        log_n = math.log10(max(n, 1))
        lo = self.suspect_timeout * max(1.0, log_n * self.confirmed_log_factor)
        hi = self.suspect_timeout_max * max(1.0, log_n)
        # No more confirmations can come than there are other live members to suspect
        # it (at most n - 2: not us, not the suspect), as Lifeguard: in a cluster of two,
        # the one survivor's suspicion is all there will ever be.
        expected = min(self.confirmations, n - 2 if could_confirm is None else could_confirm)
        if expected <= 0 or confirmations >= expected:
            return lo
        frac = math.log(confirmations + 1) / math.log(expected + 1)
        return max(lo, hi - (hi - lo) * frac)

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def push_pull_scale(self, n: int) -> int:
        """As memberlist: one full exchange per interval up to 32 members, then one more
        interval per doubling, so that the bytes a member sends per second (n records per
        exchange) grow like n / log n and not like n."""
        if n <= 32:
            return 1
        return math.ceil(math.log2(n) - 5) + 1


@dataclass
class Member:
    record: Record
    state: State
    incarnation: int
    since: float
    etcd: Record | None = None          # its lease as etcd holds it (None: no lease)
    suspect_since: float = 0.0
    suspect_timeout: float = 0.0        # before our own health scaling
    suspecters: set[str] = field(default_factory=set)  # who independently suspect it
    reminded: bool = False              # our suspicion was sent out again at half time

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def heard(self) -> bool:
        """True once news that originated from the node itself arrived (incarnation known)."""
        return self.incarnation > 0

    @property
    def addr(self) -> str:
        """The node's gRPC address from the newest of its own record and its etcd lease."""
        if self.etcd is not None and (not self.heard or
                                      self.etcd.lease_revision > self.record.lease_revision):
            return self.etcd.node.grpc_addr
        return self.record.node.grpc_addr

    @property
    def probeable(self) -> bool:
        return self.state != State.LEFT and bool(self.addr)

    @property
    def suspect_deadline(self) -> float | None:
        """When the suspicion expires for a healthy observer (None: not suspect)."""
        if self.state != State.SUSPECT:
            return None
        return self.suspect_since + self.suspect_timeout


@dataclass(frozen=True)
class Change:
    """What a call changed, for logs, metrics and the data plane."""

    name: str
    old: State | None       # None: the member is new
    new: State | None       # None: the member was forgotten
    record_changed: bool
    reporter: str = ""

    @property
    def data_plane(self) -> bool:
        """True if what the data plane programs may differ: only records, arrivals,
        departures and graceful leaves matter, not alive/suspect/dead."""
        return (self.record_changed or self.old is None or self.new is None
                or State.LEFT in (self.old, self.new))


@dataclass
class Probe:
    """One probe round. The driver sends the direct probe when the round starts, the
    indirect ones when `on_timer` names helpers, and reports answers with `probe_ack`
    and `probe_nack`; the round ends at `end_at` at the latest."""

    target: str
    addr: str
    seq: int
    started: float
    timeout_at: float       # no direct ack by then: ask helpers
    end_at: float           # no ack by then: the target is suspect
    helpers: tuple[str, ...] = ()
    indirect_sent: bool = False
    acked: bool = False
    nacks: int = 0
    done: bool = False

    @property
    def direct_timeout(self) -> float:
        return self.timeout_at - self.started

    def time_left(self, now: float) -> float:
        return max(0.0, self.end_at - now)


@dataclass
class Due:
    """What the driver must do now (from `on_timer`)."""

    probe: Probe | None = None                                 # new round: direct probe
    indirect: list[Member] = field(default_factory=list)       # ask them about `round`
    round: Probe | None = None
    gossip: list[Member] = field(default_factory=list)         # push queued news to them
    push_pull: Member | None = None                            # full exchange with it
    changes: list[Change] = field(default_factory=list)
    stalled: float = 0.0                                       # we ran this late (s)


@dataclass
class _Queued:
    update: Update
    transmits: int = 0


class _Pool:
    """A set of names with O(1) add, remove, random pick and position lookup, in a
    deterministic order. It may start from a shared, read-only `base` list (the
    simulator's roster): then only this pool's differences are stored."""

    __slots__ = ("_add", "_add_index", "_base", "_base_index", "_excluded")

    def __init__(self, base: list[str] | None = None,
                 base_index: dict[str, int] | None = None) -> None:
        self._base = base or []
        self._base_index = base_index or {}
        self._excluded: set[str] = set()
        self._add: list[str] = []
        self._add_index: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._base) - len(self._excluded) + len(self._add)

    def __contains__(self, name: object) -> bool:
        if name in self._base_index:
            return name not in self._excluded
        return name in self._add_index

    @property
    def span(self) -> int:
        """Positions 0 .. span-1 hold the members (and holes for excluded ones)."""
        return len(self._base) + len(self._add)

    def at(self, i: int) -> str | None:
        nb = len(self._base)
        if i < nb:
            name = self._base[i]
            return None if name in self._excluded else name
        i -= nb
        return self._add[i] if i < len(self._add) else None

    def add(self, name: str) -> None:
        if name in self._base_index:
            self._excluded.discard(name)
        elif name not in self._add_index:
            self._add_index[name] = len(self._add)
            self._add.append(name)

    def discard(self, name: str) -> None:
        if name in self._base_index:
            self._excluded.add(name)
            return
        i = self._add_index.pop(name, None)
        if i is None:
            return
        last = self._add.pop()
        if i < len(self._add):
            self._add[i] = last
            self._add_index[last] = i

    def sample(self, rng: random.Random, k: int, exclude: Iterable[str] = ()) -> list[str]:
        """Up to k distinct random names, none of `exclude`."""
        ex = {e for e in exclude if e in self}
        avail = len(self) - len(ex)
        k = min(k, avail)
        if k <= 0:
            return []
        span = self.span
        if k * 3 >= avail or avail * 2 < span:  # dense pick or many holes: filter first
            names = [n for n in (self.at(i) for i in range(span)) if n is not None]
            return rng.sample([n for n in names if n not in ex], k)
        out: list[str] = []
        seen = ex
        while len(out) < k:
            name = self.at(rng.randrange(span))
            if name is not None and name not in seen:
                seen.add(name)
                out.append(name)
        return out


class Roster:
    """Members known to many nodes alike, shared read-only by their `Swim` cores: the
    simulator starts thousands of nodes from one roster, each node then storing only
    the members its news changed (copy on write). A roster holds alive members that
    have an address, heard from at incarnation 1, with a lease."""

    def __init__(self, records: Iterable[Record], since: float = 0.0) -> None:
        self.members = {r.name: Member(r, State.ALIVE, 1, since, etcd=r) for r in records}
        if not all(m.addr for m in self.members.values()):
            raise ValueError("every member of a roster needs an address")
        self.names = list(self.members)
        self.index = {n: i for i, n in enumerate(self.names)}


class _Members(Mapping[str, "Member"]):
    """The member table: a shared roster's members, overridden by our own copies."""

    __slots__ = ("_base", "_gone", "_own")

    def __init__(self, base: dict[str, Member], own: dict[str, Member], gone: set[str]) -> None:
        self._base, self._own, self._gone = base, own, gone

    def __getitem__(self, name: str) -> Member:
        m = self._own.get(name)
        if m is not None:
            return m
        if name in self._gone:
            raise KeyError(name)
        return self._base[name]

    def get(self, name: str, default: Any = None) -> Any:
        m = self._own.get(name)
        if m is not None:
            return m
        if name in self._gone:
            return default
        return self._base.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._own or (name in self._base and name not in self._gone)

    def __iter__(self) -> Iterator[str]:
        for n in self._base:
            if n not in self._own and n not in self._gone:
                yield n
        yield from self._own

    def __len__(self) -> int:
        shadowed = sum(1 for n in self._own if n in self._base)
        gone = sum(1 for n in self._gone if n in self._base)
        return len(self._base) - gone + len(self._own) - shadowed


class Swim:
    def __init__(self, me: Record, incarnation: int, cfg: SwimConfig | None = None,
                 rng: random.Random | None = None, roster: Roster | None = None,
                 sign: Callable[[Record, int, State], Proof] | None = None) -> None:
        if incarnation < 1:
            raise ValueError("a node's own incarnation starts at 1 (0 means 'never heard')")
        self.me = me
        self.incarnation = incarnation
        self.cfg = cfg or SwimConfig()
        self.rng = rng or random.Random()
        base = roster.members if roster is not None else {}
        names, index = (roster.names, roster.index) if roster is not None else ([], {})
        self._base = base
        self._own: dict[str, Member] = {}
        self._gone: set[str] = {me.name} & base.keys()
        self.members: Mapping[str, Member] = _Members(base, self._own, self._gone)
        # Makes our proof of (record, incarnation, ALIVE or LEFT); None: unsigned (tests,
        # the simulator).
        self.sign = sign
        self._signed: tuple[Record, int, State] | None = None
        self.leaving = False
        self.refutations = 0
        self.health = 0                     # Local Health Awareness score
        self.stalls = 0                     # times our timers ran late
        self.srtt: float | None = None      # smoothed direct-probe round trip (s)
        self.rttvar = 0.0
        self._queue: dict[str, _Queued] = {}
        self._sent: dict[int, dict[str, _Queued]] = {}   # transmits -> queued, oldest first
        self._tx_for, self._tx = -1, 0
        self._corrections: list[Update] = []   # for the sender of what we merged last
        self._priority: list[str] = []
        self._tombstones: dict[str, tuple[int, float]] = {}
        # Kept up to date by _index(): who can be probed, asked for help, gossiped to
        # (roster members are alive with an address until our own copy says otherwise).
        self._indexed: dict[str, tuple[State, bool]] = {}
        self._counts = dict.fromkeys(State, 0)
        self._counts[State.ALIVE] = len(base) - len(self._gone)
        self._probeable = _Pool(names, index)   # not left, has an address
        self._alive = _Pool(names, index)       # alive, has an address: helpers
        self._talk = _Pool(names, index)        # alive or suspect, has an address: gossip
        for pool in (self._probeable, self._alive, self._talk):
            pool.discard(me.name)
        self._suspects: set[str] = set()
        self._reapable: set[str] = set()   # dead or left, without a lease
        # Round-robin: round k visits pool positions (a*i + b) mod span, a random
        # permutation per round that needs no list of the members.
        self._rr = (1, 0, 0, 0)   # (a, b, span, next i)
        self._inserts: list[str] = []  # joined during the round: placed at random
        # Timers (None: not armed); `_now` is the latest time any call passed in.
        self._now = 0.0
        self._started = False
        self._probe_at = 0.0
        self._gossip_at: float | None = None
        self._push_pull_at = 0.0
        self._seq = 0
        self.round: Probe | None = None
        self._pull: str | None = None

    # --- this node ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.me.name

    def self_update(self) -> Update:
        state = State.LEFT if self.leaving else State.ALIVE
        if self.sign is not None and self._signed != (self.me, self.incarnation, state):
            # Signed once per change of record, incarnation or state, not per message.
            self.me = replace(self.me, proof=self.sign(self.me, self.incarnation, state))
            self._signed = (self.me, self.incarnation, state)
        return Update(self.me, state, self.incarnation, self.name)

    def set_self(self, record: Record) -> bool:
        """Our record changed (new lease, new revision): announce it at a new incarnation."""
        if record == self.me:
            return False
        self.me = record
        self.incarnation += 1
        self._enqueue(self.self_update())
        return True

    def leave(self) -> Update:
        """Graceful leave: LEFT at a new incarnation, final for this life of the node."""
        self.leaving = True
        self.incarnation += 1
        u = self.self_update()
        self._enqueue(u)
        return u

    def cluster_size(self) -> int:
        c = self._counts
        return 1 + c[State.ALIVE] + c[State.SUSPECT] + c[State.DEAD]

    def _max_tx(self) -> int:
        n = self.cluster_size()
        if n != self._tx_for:
            self._tx_for, self._tx = n, self.cfg.retransmit_limit(n)
        return self._tx

    def _mut(self, name: str) -> Member:
        """Our own, changeable copy of a member (a roster's members are shared)."""
        m = self._own.get(name)
        if m is None:
            b = self._base[name]
            m = self._own[name] = Member(b.record, b.state, b.incarnation, b.since, b.etcd)
        return m

    # --- Local Health Awareness and round trips ------------------------------------

    def _health(self, delta: int) -> None:
        self.health = max(0, min(self.cfg.health_max, self.health + delta))

    def observe_rtt(self, rtt: float) -> None:
        """A direct probe was answered after `rtt` seconds (RFC 6298 estimator)."""
        rtt = max(0.0, min(rtt, 2 * self.cfg.probe_timeout_max))
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def probe_timing(self) -> tuple[float, float]:
        """(direct-probe timeout, probe interval) now. Health scales both; the timeout
        also follows the observed round trips, within the share of the interval that
        leaves the helpers time (`TIMEOUT_SHARE`): round trips longer than that fail
        probes, and the failures worsen our health, which slows everything down. Only
        health moves the interval, so that the rate of samples, and with it how fast
        the estimate comes back down after a storm, does not depend on the estimate."""
        cfg = self.cfg
        scale = 1 + self.health
        interval = cfg.probe_interval * scale
        timeout = cfg.probe_timeout * scale
        if cfg.adaptive_timeout and self.srtt is not None:
            rto = min(cfg.probe_timeout_max, self.srtt + 4 * self.rttvar)
            timeout = max(timeout, min(rto, TIMEOUT_SHARE * interval))
        return timeout, interval

    def gossip_interval(self) -> float:
        return self.cfg.gossip_interval * (1 + self.health)

    def push_pull_interval(self) -> float:
        return self.cfg.push_pull_interval * self.cfg.push_pull_scale(self.cluster_size())

    # --- etcd's view ----------------------------------------------------------

    def sync_etcd(self, leases: Mapping[str, Record], now: float) -> list[Change]:
        """Align with the nodes holding a lease in etcd (name -> record with mod_revision)."""
        self._now = now
        changes: list[Change] = []
        for name, rec in sorted(leases.items()):
            if name == self.name:
                continue
            m = self.members.get(name)
            if m is None:
                self._tombstones.pop(name, None)
                m = self._own[name] = Member(rec, State.ALIVE, 0, now, etcd=rec)
                self._gone.discard(name)
                self._index(m)
                self._schedule(name)
                changes.append(Change(name, None, State.ALIVE, True, "etcd"))
                continue
            if m.etcd != rec:
                m = self._mut(name)
                m.etcd = rec
                if not m.heard:
                    m.record = rec
                self._index(m)
                changes.append(Change(name, m.state, m.state, True, "etcd"))
        for name, m in list(self.members.items()):
            if name in leases or m.etcd is None:
                continue
            m = self._mut(name)
            m.etcd = None
            self._index(m)
            if not m.heard or m.state == State.DEAD:
                # Never heard from, or dead and now its lease is gone too: it is gone.
                changes.append(self._forget(name, now))
            else:
                changes.append(Change(name, m.state, m.state, False, "etcd"))
        return changes

    # --- member pools -----------------------------------------------------------

    def _index(self, m: Member) -> None:
        """Re-file `m` in the pools and counts after its state or address changed."""
        self._file(m)
        name = m.name
        has_addr = bool(m.addr)
        key = (m.state, has_addr)
        old = self._indexed.get(name)
        if old is None and name in self._base and name not in self._gone:
            old = (State.ALIVE, True)
        if old == key:
            return
        if old is not None:
            self._counts[old[0]] -= 1
        self._counts[m.state] += 1
        self._indexed[name] = key
        for pool, member in ((self._probeable, m.state != State.LEFT and has_addr),
                             (self._alive, m.state == State.ALIVE and has_addr),
                             (self._talk, m.state in (State.ALIVE, State.SUSPECT) and has_addr)):
            if member:
                pool.add(name)
            else:
                pool.discard(name)

    def _file(self, m: Member) -> None:
        """Keep the sets the timers look at: suspects, and what may be forgotten."""
        if m.state == State.SUSPECT:
            self._suspects.add(m.name)
        else:
            self._suspects.discard(m.name)
        if m.etcd is None and m.state in (State.DEAD, State.LEFT):
            self._reapable.add(m.name)
        else:
            self._reapable.discard(m.name)

    def _unindex(self, name: str) -> None:
        old = self._indexed.pop(name, None)
        if old is None and name in self._base and name not in self._gone:
            old = (State.ALIVE, True)
        if old is not None:
            self._counts[old[0]] -= 1
        for pool in (self._probeable, self._alive, self._talk):
            pool.discard(name)
        self._suspects.discard(name)
        self._reapable.discard(name)

    def _pick(self, pool: _Pool, k: int, exclude: Iterable[str] = ()) -> list[Member]:
        return [self.members[n] for n in pool.sample(self.rng, k, exclude)]

    # --- probing --------------------------------------------------------------

    def next_probe(self) -> Member | None:
        """The next member to probe: a suspect we were asked to check first, else
        round-robin over a list reshuffled every round."""
        while self._priority:
            m = self.members.get(self._priority.pop(0))
            if m is not None and m.state == State.SUSPECT and m.probeable:
                return m
        pool = self._probeable
        for _ in range(2 * pool.span + len(self._inserts) + 2):
            a, b, span, i = self._rr
            left = span - i
            if left <= 0 and not self._inserts:
                span = pool.span
                if not span:
                    return None
                # a multiplier far from +-1, so that a round is no sweep in order
                a = 1
                for _ in range(64):
                    c = self.rng.randrange(span // 4, 3 * span // 4 + 1) if span > 4 else 1
                    if math.gcd(c, span) == 1:
                        a = c
                        break
                self._rr = (a, self.rng.randrange(span), span, 0)
                continue
            if self._inserts and self.rng.random() * (left + len(self._inserts)) < len(
                    self._inserts):
                name: str | None = self._inserts.pop(self.rng.randrange(len(self._inserts)))
            else:
                self._rr = (a, b, span, i + 1)
                name = pool.at((a * i + b) % span)
            m = self.members.get(name) if name is not None else None
            if m is not None and m.probeable and (self.cfg.probe_dead or m.state != State.DEAD):
                return m
        return None

    def helpers(self, target: str) -> list[Member]:
        """Up to `indirect_probes` alive members to ask to probe `target` for us."""
        return self._pick(self._alive, self.cfg.indirect_probes, (target,))

    def gossip_targets(self) -> list[Member]:
        """Members to push queued news to: alive and suspect ones (a suspect must hear
        that it is suspected, to refute)."""
        return self._pick(self._talk, self.cfg.gossip_fanout)

    def push_pull_target(self) -> Member | None:
        """A random member for the periodic full exchange; dead ones too, so that a node
        that was only cut off learns it is believed dead and refutes."""
        picked = self._pick(self._probeable, 1)
        return picked[0] if picked else None

    def join_targets(self) -> list[Member]:
        return self._pick(self._probeable, self.cfg.join_fanout)

    def start_probe(self, now: float) -> Probe | None:
        """Begin a probe round now (normally `on_timer` does, at the interval)."""
        self._now = now
        m = self.next_probe()
        if m is None:
            return None
        timeout, interval = self.probe_timing()
        self._seq += 1
        p = Probe(m.name, m.addr, self._seq, now, now + timeout, now + interval)
        self.round = p
        return p

    def probe_ack(self, seq: int, now: float, direct: bool = True,
                  incarnation: int | None = None) -> None:
        """The target of round `seq` answered (directly, or through a helper). Its
        incarnation, when ahead of what we know after merging its news, asks for a
        full exchange with it: it has news we missed."""
        self._now = now
        p = self.round
        if p is None or p.seq != seq or p.done:
            return
        p.acked = p.done = True
        if direct:
            self.observe_rtt(now - p.started)
            self._health(-1)
        m = self.members.get(p.target)
        if incarnation is not None and m is not None and incarnation > m.incarnation:
            self._pull = p.target

    def probe_nack(self, seq: int) -> None:
        """A helper of round `seq` answered that it could not reach the target either:
        the helper, at least, hears us."""
        p = self.round
        if p is not None and p.seq == seq and not p.done:
            p.nacks += 1

    def finish_probe(self, p: Probe, now: float) -> list[Change]:
        """End a round that got no ack: suspect the target. Our health worsens by the
        helpers that did not answer at all (or by one if there were none): if nobody
        answers us, we are the likelier culprit."""
        self._now = now
        if p.done:
            return []
        p.done = True
        if p.helpers:
            self._health(len(p.helpers) - p.nacks)
        else:
            self._health(1)
        return self.probe_failed(p.target, now)

    def probe_failed(self, name: str, now: float) -> list[Change]:
        """Neither the direct nor an indirect probe was answered: suspect it (or, if it
        is suspect already, confirm the suspicion)."""
        m = self.members.get(name)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return []
        return self._apply(Update(m.record, State.SUSPECT, m.incarnation, self.name), now)

    # --- timers -----------------------------------------------------------------

    def _expiry(self, m: Member) -> float:
        """When our suspicion of `m` ends in DEAD: later while we are unhealthy."""
        return m.suspect_since + m.suspect_timeout * (1 + self.health)

    def _heartbeat(self) -> float:
        """The next step of the probe schedule: always armed, and always from a time an
        `on_timer` call gave, so that running late behind it means we were not running."""
        p = self.round
        if p is not None and not p.done:  # the next round waits for this one
            return p.end_at if p.indirect_sent else p.timeout_at
        return self._probe_at

    def next_wake(self) -> float:
        """When `on_timer` must run next."""
        t = self._heartbeat()
        if self._gossip_at is not None:
            t = min(t, self._gossip_at)
        t = min(t, self._push_pull_at)
        if self._suspects:
            scale = 1 + self.health
            for name in self._suspects:
                m = self._own[name]
                at = m.suspect_since + m.suspect_timeout * scale
                if at < t:
                    t = at
        for name in self._reapable:
            at = self._own[name].since + self.cfg.reap_after
            if at < t:
                t = at
        return t

    def start(self, now: float) -> None:
        """Arm the timers: the first probe within an interval, the first push-pull
        within a push-pull interval (spread, so that nodes started together do not
        move in step)."""
        self._now = now
        self._started = True
        _, interval = self.probe_timing()
        self._probe_at = now + self.rng.random() * interval
        self._push_pull_at = now + self.push_pull_interval() * (0.5 + self.rng.random() / 2)
        if self._fresh():
            self._gossip_at = now + self.gossip_interval()

    def on_timer(self, now: float) -> Due:
        """Everything due at `now`: the probe round's steps, a new round, gossip,
        push-pull, expired suspicions, members to forget. A timer found more than
        `stall_threshold` late means we were not running (CPU starvation, SIGSTOP):
        our health worsens, the round in flight proves nothing, and the time we lost
        is given back to every suspect."""
        if not self._started:
            self.start(now)
        due = Due()
        late = now - self._heartbeat()
        self._now = now
        if late > self.cfg.stall_threshold:
            due.stalled = late
            self.stalls += 1
            self._health(1)
            for name in self._suspects:
                self._own[name].suspect_since += late
            if self.round is not None and not self.round.done:
                self.round.done = True  # inconclusive: we, not the target, were away
            self._probe_at = max(self._probe_at, now)
            # What was disseminated meanwhile (a refutation) may have passed us by.
            self._pull = "*"
        p = self.round
        if p is not None and not p.done:
            if now >= p.end_at:
                due.changes += self.finish_probe(p, now)
            elif not p.indirect_sent and now >= p.timeout_at:
                p.indirect_sent = True
                target = self.members.get(p.target)
                if target is not None and target.state in (State.ALIVE, State.SUSPECT):
                    helpers = self.helpers(p.target)
                    p.helpers = tuple(h.name for h in helpers)
                    due.indirect, due.round = helpers, p
        if now >= self._probe_at and (self.round is None or self.round.done):
            due.probe = self.start_probe(now)
            _, interval = self.probe_timing()
            self._probe_at = now + interval
        if self._gossip_at is not None and now >= self._gossip_at:
            fresh = self._fresh()
            self._gossip_at = now + self.gossip_interval() if fresh else None
            if fresh:
                due.gossip = self.gossip_targets()
        if now >= self._push_pull_at or self._pull == "*":
            self._push_pull_at = now + self.push_pull_interval() * (0.8 + 0.4 * self.rng.random())
            due.push_pull = self.push_pull_target()
        elif self._pull is not None:
            due.push_pull = self.members.get(self._pull)
        self._pull = None
        due.changes += self.tick(now)
        return due

    def tick(self, now: float) -> list[Change]:
        """Expire suspicions (-> DEAD) and forget what etcd dropped long enough ago."""
        self._now = now
        changes: list[Change] = []
        expired, gone = [], []
        for name in self._suspects:
            m = self._own[name]
            if now >= self._expiry(m):
                expired.append(m)
            elif not m.reminded and now >= (m.suspect_since + self._expiry(m)) / 2:
                # Half time: send the suspicion out once more, to one member. One that
                # has heard the refutation we may have missed answers with it (see
                # `merge`); one that holds the same suspicion does nothing with it.
                m.reminded = True
                self._enqueue(Update(m.record, State.SUSPECT, m.incarnation,
                                     min(m.suspecters) if m.suspecters else self.name), sends=1)
        for name in self._reapable:
            if now >= self._own[name].since + self.cfg.reap_after:
                gone.append(name)
        for m in sorted(expired, key=lambda m: m.name):
            changes += self._apply(Update(m.record, State.DEAD, m.incarnation, self.name), now)
        for name in sorted(gone):
            changes.append(self._forget(name, now))
        if self._tombstones:
            for name, (_, until) in list(self._tombstones.items()):
                if now >= until:
                    del self._tombstones[name]
        return changes

    # --- merging news ---------------------------------------------------------

    def merge(self, updates: Iterable[Update], now: float) -> list[Change]:
        """Merge what a message carried. Where it was older than what we know (a
        refutation or a new life the sender missed), the answer to it, `news_for` the
        sender, carries our newer word: one missed broadcast must not leave a stale
        suspicion behind to expire into a false DEAD."""
        self._now = now
        self._corrections = []
        changes: list[Change] = []
        for u in updates:
            changes += self._apply(u, now)
        return changes

    def _apply(self, u: Update, now: float) -> list[Change]:
        name = u.name
        m = self._own.get(name)
        if m is None and name not in self._gone:
            m = self._base.get(name)
        if m is not None and (u.incarnation < m.incarnation or (
                u.incarnation == m.incarnation and u.state <= m.state)):
            # Old news, or the same: at most a confirmation of a suspicion.
            if u.state == m.state == State.SUSPECT and u.incarnation == m.incarnation:
                return self._confirm(m, u, now)
            if u.incarnation < m.incarnation and m.heard and \
                    len(self._corrections) < self.cfg.max_piggyback:
                self._corrections.append(Update(m.record, m.state, m.incarnation, self.name))
            return []
        if name == self.name:
            self._about_me(u)
            return []
        tomb = self._tombstones.get(name)
        if tomb is not None and u.incarnation <= tomb[0]:
            return []
        if m is None:
            self._tombstones.pop(u.name, None)
            m = self._own[u.name] = Member(u.record, u.state, u.incarnation, now)
            self._gone.discard(u.name)
            self._index(m)
            if u.state == State.SUSPECT:
                self._suspect(m, u, now)
            self._schedule(u.name)
            self._enqueue(u)
            return [Change(u.name, None, u.state, True, u.reporter)]
        newer = u.incarnation > m.incarnation
        if not (newer or (u.incarnation == m.incarnation and u.state > m.state)):
            return []
        old = m.state
        m = self._mut(u.name)
        record_changed = newer and u.record != m.record
        if newer:
            m.record = u.record
        m.incarnation = u.incarnation
        if u.state != m.state:
            m.state = u.state
            m.since = now
        self._index(m)
        if u.state == State.SUSPECT:
            self._suspect(m, u, now)
        else:
            m.suspecters = set()
        self._enqueue(u)
        return [Change(u.name, old, u.state, record_changed, u.reporter)]

    def _suspect(self, m: Member, u: Update, now: float) -> None:
        m.suspect_since = now
        m.reminded = False
        m.suspecters = {u.reporter} if u.reporter else set()
        m.suspect_timeout = self.cfg.suspicion_timeout(self.cluster_size(), 0,
                                                       self._could_confirm(m))
        if u.reporter != self.name and self.cfg.suspect_probers:
            # Check it ourselves at our next round (about `suspect_probers` members do):
            # no extra probe, only another target.
            others = max(1, self._counts[State.ALIVE] + self._counts[State.SUSPECT] - 1)
            if self.rng.random() < min(1.0, self.cfg.suspect_probers / others):
                self._priority = [*self._priority[-1:], m.name]  # the newest two

    def _could_confirm(self, suspect: Member) -> int:
        """Members other than us and `suspect` that are alive or suspect themselves: the
        most confirmations that can come (dead ones waiting to be forgotten do not probe)."""
        live = self._counts[State.ALIVE] + self._counts[State.SUSPECT]
        return live - (1 if suspect.state in (State.ALIVE, State.SUSPECT) else 0)

    def _confirm(self, m: Member, u: Update, now: float) -> list[Change]:
        """Another member independently suspects `m`: the deadline comes closer."""
        if not u.reporter or u.reporter in m.suspecters:
            return []
        m.suspecters.add(u.reporter)
        n = len(m.suspecters) - 1
        m.suspect_timeout = self.cfg.suspicion_timeout(self.cluster_size(), n,
                                                       self._could_confirm(m))
        if n <= self.cfg.confirmations:
            self._enqueue(u)  # others may not have this confirmation yet
        return [Change(m.name, State.SUSPECT, State.SUSPECT, False, u.reporter)]

    def _about_me(self, u: Update) -> None:
        """News about ourselves: refute a suspicion, a death, a stale leave or a higher
        incarnation of a previous life by announcing a yet higher incarnation."""
        if self.leaving:
            return
        if u.incarnation > self.incarnation or (
                u.incarnation == self.incarnation and u.state != State.ALIVE):
            if u.state != State.ALIVE:
                self._health(1)  # suspected: perhaps we are the slow one
            self.incarnation = u.incarnation + 1
            self.refutations += 1
            self._enqueue(self.self_update())

    def _forget(self, name: str, now: float) -> Change:
        m = self.members[name]
        self._unindex(name)
        self._own.pop(name, None)
        if name in self._base:
            self._gone.add(name)
        self._dequeue(name)
        self._tombstones[name] = (m.incarnation, now + self.cfg.reap_after)
        return Change(name, m.state, None, True, "")

    def _schedule(self, name: str) -> None:
        """Probe a new member at a random place among those not yet probed this round."""
        self._inserts.append(name)

    # --- dissemination --------------------------------------------------------

    def _enqueue(self, u: Update, sends: int | None = None) -> None:
        """Queue `u` for `sends` transmissions (default: the retransmit limit)."""
        self._dequeue(u.name)  # replaces older news about the same member
        q = self._queue[u.name] = _Queued(u, 0 if sends is None else max(0, self._max_tx() - sends))
        self._sent.setdefault(q.transmits, {})[u.name] = q
        if self._started and self._gossip_at is None and q.transmits < self.cfg.gossip_sends:
            self._gossip_at = self._now + self.gossip_interval()

    def _fresh(self) -> bool:
        """News sent fewer than `gossip_sends` times: worth a gossip round of its own.
        Its later sends ride on the messages that go out anyway (probes, answers), so
        that a gossip round per item, not per send, is what news costs."""
        return bool(self._sent) and min(self._sent) < self.cfg.gossip_sends

    def _dequeue(self, name: str) -> None:
        q = self._queue.pop(name, None)
        if q is not None:
            bucket = self._sent[q.transmits]
            del bucket[name]
            if not bucket:
                del self._sent[q.transmits]

    def pending(self) -> bool:
        return bool(self._queue)

    def piggyback(self, about: str | None = None, limit: int | None = None) -> list[Update]:
        """Queued news to attach to an outgoing message, least-sent first (the oldest
        first among equals); news about `about` (the receiver) goes first so that a
        suspect learns it is suspected."""
        limit = self.cfg.max_piggyback if limit is None else limit
        if limit <= 0 or not self._queue:
            return []
        first = self._queue.get(about) if about is not None else None
        items = [first] if first is not None else []
        for t in sorted(self._sent) if len(self._sent) > 1 else self._sent:
            for q in self._sent[t].values():
                if len(items) >= limit:
                    break
                if q is not first:
                    items.append(q)
            if len(items) >= limit:
                break
        out = []
        max_tx = self._max_tx()
        for q in items:
            name = q.update.name
            bucket = self._sent[q.transmits]
            del bucket[name]
            if not bucket:
                del self._sent[q.transmits]
            out.append(q.update)
            q.transmits += 1
            if q.transmits >= max_tx:
                del self._queue[name]
            else:
                self._sent.setdefault(q.transmits, {})[name] = q
        return out

    def news_for(self, about: str) -> list[Update]:
        """What to attach to a message to `about`: queued news, plus what we believe
        about it if that is suspect or dead (it must learn it, to refute)."""
        updates = self.piggyback(about=about)
        m = self.members.get(about)
        if m is not None and m.state in (State.SUSPECT, State.DEAD) and \
                not any(u.name == about for u in updates):
            updates.append(Update(m.record, m.state, m.incarnation, self.name))
        if self._corrections:
            names = {u.name for u in updates}
            updates += [u for u in self._corrections if u.name not in names]
            self._corrections = []
        return updates

    def full_state(self, roster: bool = True) -> list[Update]:
        """Everything we know, for push-pull: ourselves and every member we heard of.
        Without `roster`, only what differs from the shared roster (the simulator:
        a roster entry is the oldest news there is, so merging it changes nothing)."""
        out = [self.self_update()]
        items = self.members.items() if roster else self._own.items()
        out += [Update(m.record, m.state, m.incarnation, self.name)
                for _, m in sorted(items) if m.heard]
        return out

    def counts(self) -> dict[State, int]:
        return dict(self._counts)
