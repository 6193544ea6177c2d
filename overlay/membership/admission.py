"""Who may say what in the membership protocol: the admission of news (issue 11).

Only a node may vouch for its own record. Each node signs a `Statement` (its
record, lease revision and incarnation; ALIVE, or LEFT when it leaves) with
the key its etcd lease publishes, once per change; every update about it
carries that statement, passed on byte for byte by whoever relays it
(`signing.py` makes and checks the signatures, `wire.py` the bytes).

`Gate.admit` turns what a peer sent (`Claim`s) into core updates, and
refuses, with a reason, anything that is not one of these:

- the subject's own statement, verified against the key of the subject's
  lease: it alone can change a node's record or raise its incarnation, so
  nobody can announce details for another node, make it LEFT, or push its
  incarnation out of its reach (only it can sign a higher one);
- an opinion (SUSPECT, DEAD) at the incarnation of a statement it carries,
  or at incarnation 0 about a node never heard from: liveness news keeps
  flowing from every member, and the subject refutes it with a new
  statement;
- sent by a node holding a lease (the sender, and the reporter of an
  opinion): a stranger's messages are ignored whole.

A replayed statement is an old incarnation and loses to the newer one. A
verification is done once per distinct statement (cached by its bytes);
stale news is dropped without one, and verifications beyond a budget (a
flood of bad signatures) are refused unread.

Pure, like swim.py: no I/O, time passed in, and decoding a statement and
checking a signature are passed in too (`signing.gate` gives the real ones:
protobuf and ed25519), so the rules are tested without either.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from overlay.errors import ConfigError
from overlay.membership.swim import Member, Proof, Record, State, Update

# Verifications per second in the long run, and how many may come at once (a join's
# push-pull brings every member's statement once; the burst grows with the cluster).
VERIFY_RATE = 100.0
VERIFY_BURST = 1000
CACHE_SIZE = 4096


@dataclass(frozen=True)
class Statement:
    """What a node signed (overlay.v1.Statement), decoded and validated."""

    record: Record          # without proof
    incarnation: int
    state: State            # ALIVE or LEFT


class Claim(NamedTuple):
    """One MemberUpdate as received: `statement` and `signature` empty when unsigned,
    then `name` and `incarnation` are what the unsigned form says. (A tuple: made for
    every update received, so cheap to make.)"""

    state: State
    reporter: str
    statement: bytes = b""
    signature: bytes = b""
    name: str = ""
    incarnation: int = 0

    @property
    def signed(self) -> bool:
        return bool(self.statement or self.signature)


# A serialized Statement, validated (ConfigError names what is wrong).
Parse = Callable[[bytes], Statement]
# Whether `signature` over the statement's bytes verifies with `key` (as published:
# "ed25519:<base64>").
Verify = Callable[[str, bytes, bytes], bool]


class Reason(enum.StrEnum):
    """Why news was refused (the `reason` label of overlay_membership_refused_total)."""

    MALFORMED = "malformed"          # undecodable, or a state its statement does not allow
    UNSIGNED = "unsigned"            # a record, a state or an incarnation without a statement
    BAD_SIGNATURE = "bad-signature"  # not signed with the key of the subject's lease
    NO_LEASE = "no-lease"            # the sender or the reporter holds no lease
    NO_KEY = "no-key"                # the subject's lease has no key: nothing can verify it
    BUDGET = "budget"                # beyond the verification budget (a flood)


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    sender: str
    subject: str
    detail: str
    count: int = 1


@dataclass(frozen=True)
class _Verified:
    name: str
    record: Record          # with its proof
    incarnation: int
    state: State            # the statement's: ALIVE or LEFT


class Gate:
    """Admission of membership news; `keys` follows etcd: every lease holder's name and
    published key ("" for none)."""

    def __init__(self, me: str, parse: Parse, verify: Verify, rate: float = VERIFY_RATE,
                 burst: int = VERIFY_BURST, cache_size: int = CACHE_SIZE) -> None:
        self.me = me
        self._parse, self._check = parse, verify
        self.keys: dict[str, str] = {}
        self.rate, self.burst, self.cache_size = rate, burst, cache_size
        self._tokens = float(burst)
        self._refilled: float | None = None
        # One statement per node, its newest: an older one is stale news, never admitted
        # again, so caching it would only grow with every restart and refutation.
        self._verified: dict[bytes, _Verified] = {}
        self._newest: dict[str, bytes] = {}
        self._rejected: dict[tuple[bytes, bytes], str] = {}
        self.verifications = 0

    def set_keys(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)
        for name in [n for n in self._newest if n not in self.keys]:
            self._verified.pop(self._newest.pop(name), None)

    @property
    def cached(self) -> int:
        """Verified statements kept (at most one per lease holder)."""
        return len(self._verified)

    def admit(self, claims: Iterable[Claim], sender: str, members: Mapping[str, Member],
              now: float) -> tuple[list[Update], list[Refusal]]:
        claims = list(claims)
        if not claims:
            return [], []
        if sender == self.me or sender not in self.keys:
            why = "claims to be us" if sender == self.me else "holds no lease"
            return [], [Refusal(Reason.NO_LEASE, sender, "", f"sender {sender[:64]!r} {why}",
                                len(claims))]
        updates: list[Update] = []
        refused: list[Refusal] = []
        for c in claims:
            out = self._one(c, sender, members, now)
            if isinstance(out, Refusal):
                refused.append(out)
            elif out is not None:
                updates.append(out)
        return updates, refused

    def _one(self, c: Claim, sender: str, members: Mapping[str, Member], now: float
             ) -> Update | Refusal | None:
        if not c.signed:
            return self._unsigned(c, sender, members)
        v = self._verified.get(c.statement)
        if v is None or v.record.proof is None or v.record.proof.key != self.keys.get(v.name):
            try:
                st = self._parse(c.statement)
            except ConfigError as exc:
                return Refusal(Reason.MALFORMED, sender, "", str(exc))
            name = st.record.name
            if name not in self.keys:
                return None  # no lease: nothing about it matters here (it left, or never was)
            key = self.keys[name]
            if not key:
                return Refusal(Reason.NO_KEY, sender, name, "its lease publishes no key")
            m = members.get(name)
            if m is not None and st.incarnation < m.incarnation:
                return None  # stale news: not worth a verification
            bad = self._rejected.get((c.statement, c.signature))
            if bad is not None:
                return Refusal(Reason.BAD_SIGNATURE, sender, name, bad)
            if not self._spend(now):
                return Refusal(Reason.BUDGET, sender, name,
                               f"more than {self.rate:.0f} signature checks a second")
            self.verifications += 1
            if not self._check(key, c.statement, c.signature):
                why = (f"statement at incarnation {st.incarnation} not signed by the key of "
                       f"{name}'s lease")
                self._remember(self._rejected, (c.statement, c.signature), why)
                return Refusal(Reason.BAD_SIGNATURE, sender, name, why)
            rec = Record(st.record.node, st.record.lease_revision,
                         Proof(c.statement, c.signature, key))
            v = _Verified(name, rec, st.incarnation, st.state)
            self._cache(c.statement, v)
        else:
            m = members.get(v.name)
            if m is not None and v.incarnation < m.incarnation:
                return None  # stale news, verified long ago
        # (A known statement with another signature is the same verified content: the
        # record passes on with the signature that verified.)
        if (c.state == State.LEFT) != (v.state == State.LEFT):
            return Refusal(Reason.MALFORMED, sender, v.name,
                           f"{c.state.label} with a statement saying {v.state.label}")
        if c.state in (State.SUSPECT, State.DEAD) and c.reporter not in self.keys:
            return Refusal(Reason.NO_LEASE, sender, v.name,
                           f"reporter {c.reporter[:64]!r} holds no lease")
        return Update(v.record, c.state, v.incarnation, c.reporter)

    def _unsigned(self, c: Claim, sender: str, members: Mapping[str, Member]
                  ) -> Update | Refusal | None:
        """Without a statement: only an opinion about a node nobody has heard from."""
        if c.incarnation != 0 or c.state not in (State.SUSPECT, State.DEAD):
            return Refusal(Reason.UNSIGNED, sender, c.name[:64],
                           f"{c.state.label} at incarnation {c.incarnation} without the "
                           "node's signed statement")
        if c.reporter not in self.keys:
            return Refusal(Reason.NO_LEASE, sender, c.name[:64],
                           f"reporter {c.reporter[:64]!r} holds no lease")
        m = members.get(c.name)
        if m is None or m.heard:
            return None  # not a member, us, or heard from since: nothing at incarnation 0
        return Update(m.record, c.state, 0, c.reporter)

    def admit_leave(self, claim: Claim | None, name: str, members: Mapping[str, Member],
                    now: float) -> tuple[Update | None, Refusal | None]:
        """A Leave RPC from `name`: its own LEFT statement, or nothing."""
        if claim is None:
            return None, Refusal(Reason.UNSIGNED, name[:64], name[:64],
                                 "leave without the node's signed statement")
        updates, refused = self.admit([claim], name, members, now)
        if refused:
            return None, refused[0]
        if updates and (updates[0].name != name or updates[0].state != State.LEFT):
            return None, Refusal(Reason.MALFORMED, name[:64], updates[0].name,
                                 "a leave must carry the leaving node's own LEFT statement")
        return (updates[0] if updates else None), None

    def _spend(self, now: float) -> bool:
        """Token bucket: `rate` verifications a second, up to `burst` (or twice the number
        of lease holders, for a join into a large cluster) at once."""
        burst = max(self.burst, 2 * len(self.keys))
        if self._refilled is not None:
            self._tokens = min(burst, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _cache(self, statement: bytes, v: _Verified) -> None:
        old = self._newest.get(v.name)
        if old is not None:
            prev = self._verified.get(old)
            if prev is not None and prev.incarnation > v.incarnation:
                return  # an older word verified late: admitted, not kept
            self._verified.pop(old, None)
        # No size cap needed: one entry per lease holder, departed ones dropped in set_keys.
        self._newest[v.name] = statement
        self._verified[statement] = v

    def _remember(self, cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= max(self.cache_size, 2 * len(self.keys)):
            del cache[next(iter(cache))]  # the oldest entry
        cache[key] = value


class RefusalLog:
    """Refusals, logged at most once per `interval` per reason (with a count and the
    latest example) and counted by the caller for the metric."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._pending: dict[Reason, tuple[int, Refusal, str]] = {}
        self._logged: dict[Reason, float] = {}

    def add(self, refusals: Iterable[Refusal], peer: str, now: float) -> list[str]:
        """Lines to log now."""
        out = []
        for r in refusals:
            n, _, _ = self._pending.get(r.reason, (0, r, peer))
            self._pending[r.reason] = (n + r.count, r, peer)
            last = self._logged.get(r.reason)
            if last is None or now - last >= self.interval:
                out.append(self._line(r.reason, now - last if last is not None else None))
                self._logged[r.reason] = now
        return out

    def flush(self, now: float) -> list[str]:
        """Lines for refusals held back longer than the interval (none came since)."""
        out = []
        for reason in list(self._pending):
            if now - self._logged[reason] >= self.interval:
                out.append(self._line(reason, now - self._logged[reason]))
                self._logged[reason] = now
        return out

    def _line(self, reason: Reason, since: float | None) -> str:
        n, r, peer = self._pending.pop(reason)
        where = f" ({peer})" if peer else ""
        about = f" about {r.subject!r}" if r.subject else ""
        span = f" in the last {since:.0f}s" if since is not None else ""
        return (f"membership: refused {n} update(s){span} [{reason}], latest from "
                f"{r.sender[:64]!r}{where}{about}: {r.detail[:200]}")
