"""Who may say what in the membership protocol: signed statements and the admission of news.

Only a node may vouch for its own record. Each node has an ed25519 key (in
its state dir, next to its VTEP MAC) and publishes the public half in its
etcd lease value, so etcd, already the authority on who owns which subnet,
also binds each node name to its key. A node signs a `Statement` (its
record, lease revision and incarnation; ALIVE, or LEFT when it leaves) once
per change, not per message; every update about it carries that statement,
passed on byte for byte by whoever relays it.

`Gate.admit` turns what a peer sent (`wire.Claim`s) into core updates, and
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
flood of bad signatures) are refused unread. Pure: no I/O, time passed in.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from overlay.errors import ConfigError
from overlay.membership.swim import Member, Proof, Record, State, Update
from overlay.membership.wire import Claim, parse_statement, statement_bytes
from overlay.model import PUBLIC_KEY_PREFIX

# Domain separation: the node key signs nothing else that could be replayed as this.
SIGNING_CONTEXT = b"overlay.v1.Statement\x00"
# Verifications per second in the long run, and how many may come at once (a join's
# push-pull brings every member's statement once; the burst grows with the cluster).
VERIFY_RATE = 100.0
VERIFY_BURST = 1000
CACHE_SIZE = 4096


def encode_public_key(raw: bytes) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def decode_public_key(value: str) -> bytes:
    return base64.b64decode(value[len(PUBLIC_KEY_PREFIX):], validate=True)


class NodeKey:
    """This node's signing key."""

    def __init__(self, private: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self._key = Ed25519PrivateKey.from_private_bytes(private)
        self.public = encode_public_key(self._key.public_key().public_bytes_raw())
        self.signatures = 0

    @staticmethod
    def generate() -> bytes:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.generate().private_bytes_raw()

    def sign(self, rec: Record, incarnation: int, state: State) -> Proof:
        st = statement_bytes(rec, incarnation, state)
        self.signatures += 1
        return Proof(st, self._key.sign(SIGNING_CONTEXT + st), self.public)


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

    def __init__(self, me: str, rate: float = VERIFY_RATE, burst: int = VERIFY_BURST,
                 cache_size: int = CACHE_SIZE) -> None:
        self.me = me
        self.keys: dict[str, str] = {}
        self.rate, self.burst, self.cache_size = rate, burst, cache_size
        self._tokens = float(burst)
        self._refilled: float | None = None
        self._verified: dict[bytes, _Verified] = {}
        self._rejected: dict[tuple[bytes, bytes], str] = {}
        self._public: dict[str, Any] = {}
        self.verifications = 0

    def set_keys(self, keys: Mapping[str, str]) -> None:
        self.keys = dict(keys)
        for k in list(self._public):
            if k not in self.keys.values():
                del self._public[k]

    # --- admission --------------------------------------------------------------

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
                st = parse_statement(c.statement)
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
            if not self._verify(key, c.statement, c.signature):
                why = (f"statement at incarnation {st.incarnation} not signed by the key of "
                       f"{name}'s lease")
                self._remember(self._rejected, (c.statement, c.signature), why)
                return Refusal(Reason.BAD_SIGNATURE, sender, name, why)
            rec = Record(st.record.node, st.record.lease_revision,
                         Proof(c.statement, c.signature, key))
            v = _Verified(name, rec, st.incarnation, st.state)
            self._remember(self._verified, c.statement, v)
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

    # --- verification -----------------------------------------------------------

    def _verify(self, key: str, statement: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        pub = self._public.get(key)
        if pub is None:
            try:
                pub = Ed25519PublicKey.from_public_bytes(decode_public_key(key))
            except ValueError:
                return False
            self._public[key] = pub
        self.verifications += 1
        try:
            pub.verify(signature, SIGNING_CONTEXT + statement)
        except InvalidSignature:
            return False
        return True

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
