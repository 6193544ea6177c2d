"""The SWIM membership protocol as pure data and decisions: no I/O, no clock.

The shell (`service.py`) sends and receives the messages; everything it must
decide is asked here, with the current monotonic time passed in, so that the
protocol is tested with a fake clock.

- Failure detection: one peer is probed per interval, round-robin over a
  shuffled list (every member is probed within one round, unlike a random
  pick). A peer that answers neither directly nor through `indirect_probes`
  helpers becomes SUSPECT; a suspect that does not refute (by announcing a
  higher incarnation) within the suspicion timeout becomes DEAD.
- Suspicion timeout (Lifeguard, as in HashiCorp memberlist): long
  (`suspect_timeout_max`) while one member alone suspects, shrinking to
  `suspect_timeout` as `confirmations` other members independently fail to
  reach the suspect too. Members hearing of a suspicion probe the suspect at
  once (about `eager_probers` of them), so a crashed node is confirmed within
  a probe interval, while a node only hit by packet loss is reached by
  someone, learns it is suspected and refutes, with time to spare.
- Dissemination: every state change is queued and piggybacked on probes and
  gossip messages, each at most `retransmit_limit(n)` times, newest first.
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
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from overlay.errors import ConfigError
from overlay.model import NodeRecord


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

    @property
    def name(self) -> str:
        return self.node.node


@dataclass(frozen=True)
class Update:
    """One piece of membership news: `record` is in `state` at `incarnation`."""

    record: Record
    state: State
    incarnation: int
    reporter: str = ""

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True)
class SwimConfig:
    """Timings. The defaults detect a crashed node within 3 s at 10 nodes and do not
    declare a live node dead under 20% random packet loss (see bench/membership.py)."""

    probe_interval: float = 0.4
    probe_timeout: float = 0.2
    indirect_probes: int = 3
    suspect_timeout: float = 1.0       # once `confirmations` others suspect it too
    suspect_timeout_max: float = 3.0   # while only one member suspects it
    confirmations: int = 3
    eager_probers: int = 6
    gossip_interval: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    max_piggyback: int = 16
    push_pull_interval: float = 10.0
    join_fanout: int = 16
    reap_after: float = 60.0

    def validate(self) -> None:
        if self.probe_interval <= 0:
            raise ConfigError("--probe-interval", "must be positive")
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ConfigError("--probe-timeout", "must be positive and below --probe-interval "
                              f"({self.probe_interval}s): the rest of the interval is left for "
                              "the indirect probes")
        if self.indirect_probes < 0:
            raise ConfigError("--indirect-probes", "must be >= 0")
        if self.suspect_timeout <= 0:
            raise ConfigError("--suspect-timeout", "must be positive")
        if self.suspect_timeout_max < self.suspect_timeout:
            raise ConfigError("--suspect-timeout-max", "must be at least --suspect-timeout "
                              f"({self.suspect_timeout}s)")
        if self.confirmations < 0 or self.eager_probers < 0:
            raise ConfigError("confirmations", "must be >= 0")
        if self.push_pull_interval <= 0:
            raise ConfigError("--push-pull-interval", "must be positive")
        if self.gossip_interval <= 0 or self.gossip_fanout < 1:
            raise ConfigError("gossip", "interval must be positive and fan-out >= 1")

    def suspicion_timeout(self, n: int, confirmations: int = 0,
                          could_confirm: int | None = None) -> float:
        """From `suspect_timeout_max` with no confirmation down to `suspect_timeout` with
        `confirmations` of them, or as many as the cluster can give (logarithmically, as
        Lifeguard); both longer in big clusters, where a refutation needs more hops."""
        scale = max(1.0, math.log10(max(n, 1)))
        lo, hi = self.suspect_timeout * scale, self.suspect_timeout_max * scale
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


@dataclass
class Member:
    record: Record
    state: State
    incarnation: int
    since: float
    etcd: Record | None = None          # its lease as etcd holds it (None: no lease)
    suspect_deadline: float | None = None
    suspect_since: float = 0.0
    suspecters: set[str] = field(default_factory=set)  # who independently suspect it

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


@dataclass(frozen=True)
class Change:
    """What a call changed, for logs, metrics and the data plane."""

    name: str
    old: State | None       # None: the member is new
    new: State | None       # None: the member was forgotten
    record_changed: bool
    reporter: str = ""


@dataclass
class _Queued:
    update: Update
    transmits: int = 0


@dataclass
class Swim:
    me: Record
    incarnation: int
    cfg: SwimConfig = field(default_factory=SwimConfig)
    rng: random.Random = field(default_factory=random.Random)
    # Makes our proof of (record, incarnation, ALIVE or LEFT); None: unsigned (tests).
    sign: Callable[[Record, int, State], Proof] | None = None

    def __post_init__(self) -> None:
        if self.incarnation < 1:
            raise ValueError("a node's own incarnation starts at 1 (0 means 'never heard')")
        self._signed: tuple[Record, int, State] | None = None
        self.members: dict[str, Member] = {}
        self.leaving = False
        self.refutations = 0
        self._queue: dict[str, _Queued] = {}
        self._order: list[str] = []
        self._next = 0
        self._tombstones: dict[str, tuple[int, float]] = {}

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
        return 1 + sum(1 for m in self.members.values() if m.state != State.LEFT)

    # --- etcd's view ----------------------------------------------------------

    def sync_etcd(self, leases: Mapping[str, Record], now: float) -> list[Change]:
        """Align with the nodes holding a lease in etcd (name -> record with mod_revision)."""
        changes: list[Change] = []
        for name, rec in sorted(leases.items()):
            if name == self.name:
                continue
            m = self.members.get(name)
            if m is None:
                self._tombstones.pop(name, None)
                m = Member(rec, State.ALIVE, 0, now, etcd=rec)
                self.members[name] = m
                self._schedule(name)
                changes.append(Change(name, None, State.ALIVE, True, "etcd"))
                continue
            if m.etcd != rec:
                m.etcd = rec
                if not m.heard:
                    m.record = rec
                changes.append(Change(name, m.state, m.state, True, "etcd"))
        for name, m in list(self.members.items()):
            if name in leases or m.etcd is None:
                continue
            m.etcd = None
            if not m.heard or m.state == State.DEAD:
                # Never heard from, or dead and now its lease is gone too: it is gone.
                changes.append(self._forget(name, now))
            else:
                changes.append(Change(name, m.state, m.state, False, "etcd"))
        return changes

    # --- probing --------------------------------------------------------------

    def next_probe(self) -> Member | None:
        """The next member to probe: round-robin over a list reshuffled every round."""
        for _ in range(len(self._order) + 2):
            if self._next >= len(self._order):
                self._order = sorted(n for n, m in self.members.items() if m.probeable)
                self.rng.shuffle(self._order)
                self._next = 0
                if not self._order:
                    return None
            name = self._order[self._next]
            self._next += 1
            m = self.members.get(name)
            if m is not None and m.probeable:
                return m
        return None

    def helpers(self, target: str) -> list[Member]:
        """Up to `indirect_probes` alive members to ask to probe `target` for us."""
        cands = _by_name(m for n, m in self.members.items()
                         if n != target and m.state == State.ALIVE and m.addr)
        return self.rng.sample(cands, min(self.cfg.indirect_probes, len(cands)))

    def gossip_targets(self) -> list[Member]:
        """Members to push queued news to: alive and suspect ones (a suspect must hear
        that it is suspected, to refute)."""
        cands = _by_name(m for m in self.members.values()
                         if m.state in (State.ALIVE, State.SUSPECT) and m.addr)
        return self.rng.sample(cands, min(self.cfg.gossip_fanout, len(cands)))

    def push_pull_target(self) -> Member | None:
        """A random member for the periodic full exchange; dead ones too, so that a node
        that was only cut off learns it is believed dead and refutes."""
        cands = _by_name(m for m in self.members.values() if m.probeable)
        return self.rng.choice(cands) if cands else None

    def join_targets(self) -> list[Member]:
        cands = _by_name(m for m in self.members.values() if m.probeable)
        return self.rng.sample(cands, min(self.cfg.join_fanout, len(cands)))

    def probe_failed(self, name: str, now: float) -> list[Change]:
        """Neither the direct nor an indirect probe was answered: suspect it (or, if it
        is suspect already, confirm the suspicion)."""
        m = self.members.get(name)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return []
        return self._apply(Update(m.record, State.SUSPECT, m.incarnation, self.name), now)

    def should_probe_suspect(self) -> bool:
        """Heard of a new suspicion: probe the suspect now? (About `eager_probers`
        members do, whatever the cluster size.)"""
        others = max(1, len(self.members) - 1)
        return self.rng.random() < min(1.0, self.cfg.eager_probers / others)

    def tick(self, now: float) -> list[Change]:
        """Expire suspicions (-> DEAD) and forget what etcd dropped long enough ago."""
        changes: list[Change] = []
        # Every 0.1 s over every member: one loop that skips the alive ones first.
        expired, gone = [], []
        for name, m in self.members.items():
            st = m.state
            if st is State.ALIVE:
                continue
            if st is State.SUSPECT:
                if m.suspect_deadline is not None and now >= m.suspect_deadline:
                    expired.append(m)
            elif m.etcd is None and now - m.since >= self.cfg.reap_after:  # dead or left
                gone.append(name)
        for m in _by_name(expired):
            changes += self._apply(Update(m.record, State.DEAD, m.incarnation, self.name), now)
        for name in sorted(gone):
            changes.append(self._forget(name, now))
        for name, (_, until) in list(self._tombstones.items()):
            if now >= until:
                del self._tombstones[name]
        return changes

    # --- merging news ---------------------------------------------------------

    def merge(self, updates: Iterable[Update], now: float) -> list[Change]:
        changes: list[Change] = []
        for u in updates:
            changes += self._apply(u, now)
        return changes

    def _apply(self, u: Update, now: float) -> list[Change]:
        if u.name == self.name:
            self._about_me(u)
            return []
        tomb = self._tombstones.get(u.name)
        if tomb is not None and u.incarnation <= tomb[0]:
            return []
        m = self.members.get(u.name)
        if m is not None and u.state == m.state == State.SUSPECT \
                and u.incarnation == m.incarnation:
            return self._confirm(m, u, now)
        if m is None:
            self._tombstones.pop(u.name, None)
            m = Member(u.record, u.state, u.incarnation, now)
            self.members[u.name] = m
            if u.state == State.SUSPECT:
                self._suspect(m, u, now)
            self._schedule(u.name)
            self._enqueue(u)
            return [Change(u.name, None, u.state, True, u.reporter)]
        newer = u.incarnation > m.incarnation
        if not (newer or (u.incarnation == m.incarnation and u.state > m.state)):
            return []
        old = m.state
        record_changed = newer and u.record != m.record
        if newer:
            m.record = u.record
        m.incarnation = u.incarnation
        if u.state != m.state:
            m.state = u.state
            m.since = now
        if u.state == State.SUSPECT:
            self._suspect(m, u, now)
        else:
            m.suspect_deadline = None
            m.suspecters = set()
        self._enqueue(u)
        return [Change(u.name, old, u.state, record_changed, u.reporter)]

    def _suspect(self, m: Member, u: Update, now: float) -> None:
        m.suspect_since = now
        m.suspecters = {u.reporter} if u.reporter else set()
        m.suspect_deadline = now + self.cfg.suspicion_timeout(
            self.cluster_size(), 0, self._could_confirm(m))

    def _could_confirm(self, suspect: Member) -> int:
        """Members other than us and `suspect` that are alive or suspect themselves: the
        most confirmations that can come (dead ones waiting to be forgotten do not probe)."""
        live = (State.ALIVE, State.SUSPECT)
        return sum(1 for m in self.members.values() if m.state in live) - (
            1 if suspect.state in live else 0)

    def _confirm(self, m: Member, u: Update, now: float) -> list[Change]:
        """Another member independently suspects `m`: the deadline comes closer."""
        if not u.reporter or u.reporter in m.suspecters:
            return []
        m.suspecters.add(u.reporter)
        n = len(m.suspecters) - 1
        m.suspect_deadline = m.suspect_since + self.cfg.suspicion_timeout(
            self.cluster_size(), n, self._could_confirm(m))
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
            self.incarnation = u.incarnation + 1
            self.refutations += 1
            self._enqueue(self.self_update())

    def _forget(self, name: str, now: float) -> Change:
        m = self.members.pop(name)
        self._queue.pop(name, None)
        self._tombstones[name] = (m.incarnation, now + self.cfg.reap_after)
        return Change(name, m.state, None, True, "")

    def _schedule(self, name: str) -> None:
        """Put a new member at a random place among those not yet probed this round."""
        pos = self.rng.randint(self._next, len(self._order))
        self._order.insert(pos, name)

    # --- dissemination --------------------------------------------------------

    def _enqueue(self, u: Update) -> None:
        self._queue[u.name] = _Queued(u)   # replaces older news about the same member

    def pending(self) -> bool:
        return bool(self._queue)

    def piggyback(self, about: str | None = None, limit: int | None = None) -> list[Update]:
        """Queued news to attach to an outgoing message, least-sent first; news about
        `about` (the receiver) goes first so that a suspect learns it is suspected."""
        limit = self.cfg.max_piggyback if limit is None else limit
        if limit <= 0 or not self._queue:
            return []
        items = sorted(self._queue.values(),
                       key=lambda q: (q.update.name != about, q.transmits, q.update.name))
        out = []
        max_tx = self.cfg.retransmit_limit(self.cluster_size())
        for q in items[:limit]:
            out.append(q.update)
            q.transmits += 1
            if q.transmits >= max_tx:
                del self._queue[q.update.name]
        return out

    def full_state(self) -> list[Update]:
        """Everything we know, for push-pull: ourselves and every member we heard of."""
        out = [self.self_update()]
        out += [Update(m.record, m.state, m.incarnation, self.name)
                for _, m in sorted(self.members.items()) if m.heard]
        return out

    def counts(self) -> dict[State, int]:
        out = dict.fromkeys(State, 0)
        for m in self.members.values():
            out[m.state] += 1
        return out


def _by_name(members: Iterable[Member]) -> list[Member]:
    """Filtered first, then sorted: a deterministic order for the seeded random choices
    without sorting every member of a large cluster on every tick."""
    return sorted(members, key=lambda m: m.name)
