"""Signed membership statements and the gate that admits news (issue 11).

Only a node can vouch for its own record: what others say about it counts only as
an opinion at an incarnation the node itself signed. Property tests throw arbitrary
and mutated messages at the decoding and the gate.
"""

import contextlib
import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.errors import ConfigError
from overlay.membership.admission import Claim, Gate, Reason, RefusalLog
from overlay.membership.signing import NodeKey, gate
from overlay.membership.swim import Record, State, Swim, Update
from overlay.membership.wire import claims_from_pb, parse_statement, update_pb
from overlay.model import NodeRecord
from overlay.v1 import overlay_pb2 as pb

KEYS = {f"n{i}": NodeKey(NodeKey.generate()) for i in range(1, 5)}
ATTACKER = NodeKey(NodeKey.generate())


def node(i, mac_last=None, ip=None):
    mac_last = i if mac_last is None else mac_last
    return NodeRecord(f"n{i}", IPv4Network(f"10.244.{i}.0/24"),
                      IPv4Address(ip or f"172.30.1.{10 + i}"), f"02:00:00:00:00:{mac_last:02x}",
                      f"172.30.1.{10 + i}:7946", public_key=KEYS[f"n{i}"].public)


def statement(i, inc, state=State.ALIVE, rev=5, key=None, **kw):
    """n<i>'s record signed (by its own key unless `key`), as a Record with its proof."""
    rec = Record(node(i, **kw), rev)
    k = key or KEYS[f"n{i}"]
    return Record(rec.node, rev, k.sign(rec, inc, state))


def claim(rec, state, reporter="n3", signature=None):
    c = Claim(state, reporter, rec.proof.statement, rec.proof.signature)
    if signature is not None:
        c = Claim(state, reporter, c.statement, signature)
    return c


def keyed_gate(me="n1", **kw):
    g = gate(me, **kw)
    g.set_keys({n: k.public for n, k in KEYS.items()})
    return g


def core(me=1):
    s = Swim(Record(node(me), 5), 100, rng=random.Random(1), sign=KEYS[f"n{me}"].sign)
    s.sync_etcd({f"n{i}": Record(node(i), 5) for i in range(1, 5)}, 0.0)
    return s


def admit(g, s, claims, sender="n3", now=0.0):
    updates, refused = g.admit(claims, sender, s.members, now)
    s.merge(updates, now)
    return updates, refused


# --- the node's own word ------------------------------------------------------------

def test_a_nodes_own_statement_is_admitted_with_its_record_and_incarnation():
    g, s = keyed_gate(), core()
    rec = statement(2, 7, mac_last=0x42)
    updates, refused = admit(g, s, [claim(rec, State.ALIVE, "n2")], sender="n2")
    assert refused == [] and [(u.name, u.state, u.incarnation) for u in updates] == [
        ("n2", State.ALIVE, 7)]
    m = s.members["n2"]
    assert m.incarnation == 7 and m.record.node.vtep_mac == "02:00:00:00:00:42"
    assert m.record.proof.key == KEYS["n2"].public
    # relayed on byte for byte
    assert update_pb(updates[0]).signed.statement == rec.proof.statement


def test_a_record_signed_by_anyone_else_is_refused():
    g, s = keyed_gate(), core()
    forged = statement(2, 2**64 - 1, key=ATTACKER, ip="172.30.2.11", rev=2**62)
    for sender in ("n3", "n2"):
        updates, refused = admit(g, s, [claim(forged, State.ALIVE, sender)], sender=sender)
        assert updates == [] and [r.reason for r in refused] == [Reason.BAD_SIGNATURE]
    # signed by another member (a compromised one speaking for n2)
    by_n3 = statement(2, 9, key=KEYS["n3"], ip="172.30.1.13")
    assert admit(g, s, [claim(by_n3, State.ALIVE)])[1][0].reason == Reason.BAD_SIGNATURE
    assert s.members["n2"].incarnation == 0 and s.members["n2"].record.node == node(2)


def test_a_record_without_statement_is_refused_whatever_it_claims():
    g, s = keyed_gate(), core()
    for state, inc in ((State.ALIVE, 2**64 - 1), (State.LEFT, 3), (State.SUSPECT, 2**64 - 1),
                       (State.DEAD, 5)):
        updates, refused = admit(g, s, [Claim(state, "n3", name="n2", incarnation=inc)])
        assert updates == [] and refused[0].reason == Reason.UNSIGNED
    assert s.members["n2"].incarnation == 0


def test_left_only_from_the_nodes_own_left_statement():
    g, s = keyed_gate(), core()
    admit(g, s, [claim(statement(2, 7), State.ALIVE, "n2")], sender="n2")
    # LEFT claimed over its ALIVE statement: refused
    _, refused = admit(g, s, [claim(statement(2, 7), State.LEFT)])
    assert refused[0].reason == Reason.MALFORMED and s.members["n2"].state == State.ALIVE
    # a LEFT statement signed by someone else: refused
    _, refused = admit(g, s, [claim(statement(2, 8, State.LEFT, key=ATTACKER), State.LEFT)])
    assert refused[0].reason == Reason.BAD_SIGNATURE and s.members["n2"].state == State.ALIVE
    # an opinion cannot turn a LEFT statement into anything else
    left = statement(2, 8, State.LEFT)
    _, refused = admit(g, s, [claim(left, State.DEAD)])
    assert refused[0].reason == Reason.MALFORMED
    _, refused = admit(g, s, [claim(left, State.LEFT)])
    assert refused == [] and s.members["n2"].state == State.LEFT


# --- opinions -----------------------------------------------------------------------

def test_opinions_flow_at_the_incarnation_the_node_signed():
    g, s = keyed_gate(), core()
    rec = statement(2, 7)
    admit(g, s, [claim(rec, State.SUSPECT, "n3")])
    m = s.members["n2"]
    assert (m.state, m.incarnation) == (State.SUSPECT, 7)
    admit(g, s, [claim(rec, State.DEAD, "n4")], sender="n4")
    assert s.members["n2"].state == State.DEAD
    # the node refutes with a new statement: alive again
    admit(g, s, [claim(statement(2, 8), State.ALIVE, "n2")], sender="n2")
    assert (s.members["n2"].state, s.members["n2"].incarnation) == (State.ALIVE, 8)


def test_unsigned_opinions_only_about_nodes_never_heard_from():
    g, s = keyed_gate(), core()
    updates, refused = admit(g, s, [Claim(State.SUSPECT, "n3", name="n2", incarnation=0)])
    assert refused == [] and s.members["n2"].state == State.SUSPECT
    assert s.members["n2"].record.node == node(2)  # our own (etcd's) record, not theirs
    admit(g, s, [claim(statement(2, 7), State.ALIVE, "n2")], sender="n2")
    updates, refused = admit(g, s, [Claim(State.DEAD, "n3", name="n2", incarnation=0)])
    assert updates == [] and refused == [] and s.members["n2"].state == State.ALIVE


def test_no_incarnation_jump_locks_a_node_out_of_refuting():
    """The attacker's highest incarnation never reaches the core; the node's next one wins."""
    g, s = keyed_gate(), core()
    admit(g, s, [claim(statement(2, 7), State.ALIVE, "n2")], sender="n2")
    top = 2**64 - 1
    attacks = [Claim(State.DEAD, "n3", name="n2", incarnation=top),
               Claim(State.ALIVE, "n3", name="n2", incarnation=top),
               claim(statement(2, top, key=ATTACKER), State.DEAD),
               claim(statement(2, top, State.LEFT, key=ATTACKER), State.LEFT)]
    updates, refused = admit(g, s, attacks)
    assert updates == [] and len(refused) == 4
    assert s.members["n2"].incarnation == 7
    admit(g, s, [claim(statement(2, 7), State.SUSPECT)])          # a real suspicion
    admit(g, s, [claim(statement(2, 8), State.ALIVE, "n2")], sender="n2")  # refuted
    assert (s.members["n2"].state, s.members["n2"].incarnation) == (State.ALIVE, 8)


def test_a_suspected_node_refutes_with_a_statement_the_others_admit():
    n1, n2 = core(1), core(2)
    g1, g2 = keyed_gate("n1"), keyed_gate("n2")
    mine = n2.self_update()
    admit(g1, n1, [claim(mine.record, State.ALIVE, "n2")], sender="n2")
    assert n1.probe_failed("n2", 1.0)  # n1 suspects n2 at the incarnation n2 signed
    news = [u for u in n1.piggyback(about="n2") if u.name == "n2"]
    [c], _ = claims_from_pb([update_pb(u) for u in news])
    admit(g2, n2, [c], sender="n1")
    assert n2.incarnation == mine.incarnation + 1 and n2.refutations == 1
    refute = n2.self_update()
    assert refute.record.proof.statement != mine.record.proof.statement
    [c], _ = claims_from_pb([update_pb(refute)])
    admit(g1, n1, [c], sender="n2")
    assert n1.members["n2"].state == State.ALIVE


def test_a_replayed_old_statement_loses_to_the_newer_one():
    g, s = keyed_gate(), core()
    old = statement(2, 7, mac_last=0x07)
    new = statement(2, 9, mac_last=0x09, rev=6)
    admit(g, s, [claim(new, State.ALIVE, "n2")], sender="n2")
    n = g.verifications
    for state in (State.ALIVE, State.SUSPECT, State.DEAD):
        updates, refused = admit(g, s, [claim(old, state)])
        assert updates == [] and refused == []  # stale: ignored
    assert s.members["n2"].record.node.vtep_mac == "02:00:00:00:00:09"
    assert g.verifications == n, "stale news costs no verification"
    # also when the old statement was verified before the new one came
    g2, s2 = keyed_gate(), core()
    admit(g2, s2, [claim(old, State.ALIVE, "n2")], sender="n2")
    admit(g2, s2, [claim(new, State.ALIVE, "n2")], sender="n2")
    assert admit(g2, s2, [claim(old, State.DEAD)]) == ([], [])
    # a replayed LEFT of an earlier life too
    gone = statement(2, 8, State.LEFT)
    assert admit(g, s, [claim(gone, State.LEFT)]) == ([], [])
    assert s.members["n2"].state == State.ALIVE


# --- who may speak ------------------------------------------------------------------

def test_a_sender_without_lease_is_ignored_whole():
    g, s = keyed_gate(), core()
    good = claim(statement(2, 7), State.ALIVE, "n2")
    for sender in ("stranger", "n1", ""):
        updates, refused = admit(g, s, [good, good, good], sender=sender)
        assert updates == [] and [(r.reason, r.count) for r in refused] == [
            (Reason.NO_LEASE, 3)]
    assert s.members["n2"].incarnation == 0


def test_an_opinion_needs_a_reporter_holding_a_lease():
    g, s = keyed_gate(), core()
    _, refused = admit(g, s, [claim(statement(2, 7), State.SUSPECT, "n9")])
    assert refused[0].reason == Reason.NO_LEASE and s.members["n2"].incarnation == 0


def test_news_about_a_node_without_lease_is_ignored_and_without_key_refused():
    g, s = keyed_gate(), core()
    g.set_keys({"n1": KEYS["n1"].public, "n3": KEYS["n3"].public, "n2": ""})
    assert admit(g, s, [claim(statement(4, 7), State.ALIVE, "n4")]) == ([], [])
    _, refused = admit(g, s, [claim(statement(2, 7), State.ALIVE, "n2")])
    assert refused[0].reason == Reason.NO_KEY


def test_a_new_key_in_etcd_invalidates_what_the_old_one_signed():
    g, s = keyed_gate(), core()
    rec = statement(2, 7)
    admit(g, s, [claim(rec, State.ALIVE, "n2")], sender="n2")
    rekeyed = NodeKey(NodeKey.generate())
    g.set_keys({**{n: k.public for n, k in KEYS.items()}, "n2": rekeyed.public})
    _, refused = admit(g, s, [claim(statement(2, 8), State.ALIVE, "n2")], sender="n2")
    assert refused[0].reason == Reason.BAD_SIGNATURE
    mine = statement(2, 9, key=rekeyed)
    updates, _ = admit(g, s, [claim(mine, State.ALIVE, "n2")], sender="n2")
    assert updates[0].record.proof.key == rekeyed.public


def test_leave_needs_the_nodes_own_left_statement():
    g, s = keyed_gate(), core()
    left = statement(2, 8, State.LEFT)
    assert g.admit_leave(None, "n2", s.members, 0.0)[1].reason == Reason.UNSIGNED
    u, r = g.admit_leave(claim(statement(2, 8, State.LEFT, key=ATTACKER), State.LEFT), "n2",
                         s.members, 0.0)
    assert u is None and r.reason == Reason.BAD_SIGNATURE
    u, r = g.admit_leave(claim(statement(3, 8, State.LEFT), State.LEFT), "n2", s.members, 0.0)
    assert u is None and r.reason == Reason.MALFORMED  # n3's leave, sent as n2's
    u, r = g.admit_leave(claim(left, State.LEFT), "stranger", s.members, 0.0)
    assert u is None and r.reason == Reason.NO_LEASE
    u, r = g.admit_leave(claim(left, State.LEFT), "n2", s.members, 0.0)
    assert r is None and (u.name, u.state, u.incarnation) == ("n2", State.LEFT, 8)


def test_the_rules_check_the_subjects_lease_key_with_the_check_they_are_given():
    """admission.Gate is pure: decoding and signature check are passed in. It asks the
    check about the key of the subject's lease (never the sender's), and the check's
    answer alone decides."""
    asked = []

    def says(verdict):
        def check(key, statement, signature):
            asked.append((key, statement, signature))
            return verdict
        return check

    rec = statement(2, 7, key=ATTACKER)  # signed by someone else: only the check knows
    for verdict in (False, True):
        g, s = Gate("n1", parse_statement, says(verdict)), core()
        g.set_keys({n: k.public for n, k in KEYS.items()})
        updates, refused = admit(g, s, [claim(rec, State.ALIVE, "n3")], sender="n3")
        assert asked[-1] == (KEYS["n2"].public, rec.proof.statement, rec.proof.signature)
        if verdict:
            assert refused == [] and s.members["n2"].incarnation == 7
        else:
            assert [r.reason for r in refused] == [Reason.BAD_SIGNATURE] and not updates
    assert len(asked) == 2


# --- cost ---------------------------------------------------------------------------

def test_each_statement_is_verified_once():
    g, s = keyed_gate(), core()
    rec = statement(2, 7)
    for i in range(100):
        admit(g, s, [claim(rec, (State.ALIVE, State.SUSPECT)[i % 2], "n3")])
    assert g.verifications == 1
    # the same statement with a garbage signature is the same verified content; it is
    # passed on with the signature that verified
    updates, _ = admit(g, s, [claim(rec, State.SUSPECT, signature=b"\0" * 64)])
    assert updates[0].record.proof.signature == rec.proof.signature and g.verifications == 1


def test_the_cache_keeps_one_statement_per_node_and_none_of_departed_nodes():
    """Every restart or refutation brings a new statement; only the newest matters (an
    older one is stale news), so memory stays one statement per member however long a
    node lives."""
    g, s = keyed_gate(), core()
    for inc in range(1, 201):
        for node in (2, 3):
            admit(g, s, [claim(statement(node, inc), State.ALIVE, "n3")])
    assert g.verifications == 400 and g.cached == 2
    # the newest is still a cache hit
    admit(g, s, [claim(statement(2, 200), State.SUSPECT, "n3")])
    assert g.verifications == 400
    # an older word verified late (its subject unknown here) is admitted but not kept
    g2 = keyed_gate()
    g2.admit([claim(statement(2, 9), State.ALIVE, "n3")], "n3", {}, 0.0)
    updates, _ = g2.admit([claim(statement(2, 4), State.ALIVE, "n3")], "n3", {}, 0.0)
    assert [u.incarnation for u in updates] == [4] and g2.cached == 1
    updates, _ = g2.admit([claim(statement(2, 9), State.ALIVE, "n3")], "n3", {}, 0.0)
    assert [u.incarnation for u in updates] == [9] and g2.verifications == 2
    # a node whose lease is gone takes its statement with it
    g.set_keys({n: k.public for n, k in KEYS.items() if n != "n2"})
    assert g.cached == 1


def test_a_repeated_bad_signature_is_verified_once():
    g, s = keyed_gate(), core()
    forged = claim(statement(2, 50, key=ATTACKER), State.ALIVE)
    for _ in range(50):
        assert admit(g, s, [forged])[1][0].reason == Reason.BAD_SIGNATURE
    assert g.verifications == 1


def test_verifications_beyond_the_budget_are_refused_unread():
    g, s = keyed_gate(rate=10, burst=20), core()
    g.set_keys({n: k.public for n, k in KEYS.items()})
    flood = [claim(statement(2, 100 + i, key=ATTACKER), State.ALIVE) for i in range(50)]
    _, refused = admit(g, s, flood, now=0.0)
    reasons = [r.reason for r in refused]
    assert reasons.count(Reason.BAD_SIGNATURE) == 20 and reasons.count(Reason.BUDGET) == 30
    assert g.verifications == 20
    # a second later: ten more checks; the real node's word gets through
    updates, _ = admit(g, s, [claim(statement(2, 7), State.ALIVE, "n2")], sender="n2", now=1.0)
    assert updates and g.verifications == 21


def test_signing_happens_only_when_our_record_or_incarnation_changes():
    s = core()
    k = KEYS["n1"]
    n = k.signatures
    for _ in range(50):
        s.self_update()
    assert k.signatures == n + 1
    s.set_self(Record(node(1, mac_last=0x99), 6))
    s.self_update()
    s.self_update()
    assert k.signatures == n + 2
    s.leave()
    assert s.self_update().state == State.LEFT and k.signatures == n + 3


# --- logging ------------------------------------------------------------------------

def test_refusals_are_logged_once_per_interval_per_reason_with_a_count():
    g, s = keyed_gate(), core()
    rl = RefusalLog(10.0)
    forged = [claim(statement(2, 50 + i, key=ATTACKER), State.ALIVE) for i in range(30)]
    lines = []
    for t in range(30):
        _, refused = g.admit([forged[t]], "n3", s.members, float(t))
        unsigned = Claim(State.ALIVE, "n3", name="n2", incarnation=9)
        _, more = g.admit([unsigned], "n3", s.members, float(t))
        lines += rl.add(refused + more, "ipv4:172.30.2.11:4242", float(t))
    lines += rl.flush(45.0)
    bad = [x for x in lines if "[bad-signature]" in x]
    assert len(bad) == 4 and len([x for x in lines if "[unsigned]" in x]) == 4
    assert "refused 1 update(s)" in bad[0] and "refused 10 update(s) in the last 10s" in bad[1]
    assert "172.30.2.11" in bad[0] and "'n2'" in bad[0]
    assert rl.flush(100.0) == []


# --- decoding, property-based --------------------------------------------------------

GENUINE = statement(2, 7)
SETTINGS = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.binary(max_size=400))
def test_any_bytes_as_a_statement_are_a_config_error_or_a_statement(data):
    with contextlib.suppress(ConfigError):
        parse_statement(data)


@SETTINGS
@given(statement=st.binary(max_size=300), signature=st.binary(min_size=64, max_size=64),
       state=st.sampled_from(list(State)), reporter=st.text(max_size=10))
def test_arbitrary_signed_claims_are_never_admitted(statement, signature, state, reporter):
    g, s = keyed_gate(), core()
    updates, _ = g.admit([Claim(state, reporter, statement, signature)], "n3", s.members, 0.0)
    assert updates == []


@SETTINGS
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7),
       cut=st.integers(min_value=0, max_value=600), which=st.sampled_from(["flip", "cut"]),
       state=st.sampled_from([State.ALIVE, State.SUSPECT, State.DEAD]))
def test_a_mutated_signed_update_admits_nothing_but_the_genuine_statement(pos, bit, cut, which,
                                                                        state):
    wire = bytearray(update_pb(Update(GENUINE, state, 7, "n3")).SerializeToString())
    if which == "flip":
        wire[pos % len(wire)] ^= 1 << bit
    else:
        del wire[cut % len(wire):]
    try:
        m = pb.MemberUpdate.FromString(bytes(wire))
    except Exception:  # undecodable: the servicer refuses it earlier
        return
    claims, _ = claims_from_pb([m])
    g, s = keyed_gate(), core()
    updates, _ = g.admit(claims, "n3", s.members, 0.0)
    for u in updates:  # a flip in the opinion or the reporter may pass; the record may not
        assert (u.record, u.incarnation) == (Record(GENUINE.node.with_(public_key=""), 5), 7)
        assert u.record.proof.statement == GENUINE.proof.statement


records = st.builds(
    pb.NodeRecord, name=st.sampled_from(["n2", "n3", "n9", "", "bad name"]),
    subnet=st.sampled_from(["10.244.2.0/24", "10.244.2.1/24", "x"]),
    underlay_ip=st.sampled_from(["172.30.2.11", "::1", "999.1.1.1"]),
    vtep_mac=st.sampled_from(["02:00:00:00:00:09", "ff:ff:ff:ff:ff:ff", ""]),
    grpc_addr=st.sampled_from(["172.30.2.11:7946", "nohost", ""]),
    backend=st.sampled_from(["", "vxlan", "gre"]),
    incarnation=st.integers(min_value=0, max_value=2**64 - 1),
    lease_revision=st.integers(min_value=-(2**63), max_value=2**63 - 1))


@SETTINGS
@given(rec=records, state=st.integers(min_value=0, max_value=6),
       signer=st.sampled_from(["own", "attacker", "n3"]))
def test_statements_are_admitted_only_valid_and_signed_by_their_subject(rec, state, signer):
    from overlay.membership.signing import SIGNING_CONTEXT

    data = pb.Statement(record=rec, state=state).SerializeToString()
    key = {"own": KEYS.get(rec.name), "attacker": ATTACKER, "n3": KEYS["n3"]}[signer]
    if key is None:
        key = ATTACKER
    sig = key._key.sign(SIGNING_CONTEXT + data)
    g, s = keyed_gate(), core()
    updates, refused = g.admit([Claim(State.ALIVE if state != State.LEFT else State.LEFT,
                                      rec.name, data, sig)], "n3", s.members, 0.0)
    try:
        parsed = parse_statement(data)
    except ConfigError:
        parsed = None
    genuine = parsed is not None and KEYS.get(parsed.record.name) is key
    if updates:
        assert genuine and updates[0].incarnation == parsed.incarnation
        assert updates[0].record == parsed.record
    elif genuine and parsed.record.name in KEYS and parsed.record.name != "n1":
        pytest.fail(f"a valid statement signed by its subject was refused: {refused}")
