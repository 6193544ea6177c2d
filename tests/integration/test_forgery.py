"""Nobody can forge a node's record (issue 11): attacks on a default sandbox and with TLS.

The attacker sends raw Membership calls (Gossip, Probe, PushPull, Leave) to n1
carrying news about n2: its own underlay address and VTEP MAC for n2 with the
highest lease revision and incarnation, unsigned (the old wire format) or
signed with a key of its own or of another member, a forged LEFT, opinions at
the maximal incarnation, replays of n2's genuine old statements, and a flood
of bad signatures. It does so from an outside host on the underlay (as a
stranger and speaking as member n3), from member n3's own host with n3's
signing key, and with n3's valid certificate under mutual TLS.

While it attacks, n1's VXLAN entries are watched (kernel notifications for
every change, plus polling): they never change, not even for a moment. Every
refusal is counted in overlay_membership_refused_total and logged at most
once per 10 s per reason; n2 stays programmed from etcd, alive, and pods
keep talking.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import sandbox_up, wait_until

from overlay.agent.localclient import local_leave, status_json
from overlay.membership.admission import VERIFY_BURST, VERIFY_RATE
from overlay.membership.signing import SIGNING_CONTEXT, NodeKey
from overlay.sandbox.sandbox import pid_alive
from overlay.v1 import overlay_pb2 as pb

HERE = Path(__file__).resolve().parent
ATTACK_MAC = "02:66:66:66:66:66"
TOP = 2**64 - 1
METHODS = ("Gossip", "Probe", "PushPull")
ALIVE, SUSPECT, DEAD, LEFT = (pb.PEER_STATE_ALIVE, pb.PEER_STATE_SUSPECT, pb.PEER_STATE_DEAD,
                              pb.PEER_STATE_LEFT)


# --- the attacker's tools -------------------------------------------------------------

class Attacker:
    """attacker.py in a namespace, aimed at `node`'s gRPC port."""

    def __init__(self, sb, ns, node, tls=()):
        self.p = subprocess.Popen(
            [*sb.exec_prefix(ns), sys.executable, str(HERE / "attacker.py"),
             f"{sb.node(node).underlay_ip}:7946", *map(str, tls)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.p.stdout.readline()) == {"ready": True}

    def call(self, method, msg):
        self.p.stdin.write(json.dumps({"method": f"/overlay.v1.Membership/{method}",
                                       "hex": msg.SerializeToString().hex()}) + "\n")
        self.p.stdin.flush()
        a = json.loads(self.p.stdout.readline())
        return a["code"], bytes.fromhex(a["hex"])

    def many(self, method, msgs):
        self.p.stdin.write(json.dumps({"method": f"/overlay.v1.Membership/{method}",
                                       "hexes": [m.SerializeToString().hex() for m in msgs]})
                           + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())["codes"]

    def close(self):
        if self.p.poll() is None:
            self.p.communicate(timeout=30)


def envelope(method, sender, updates, target="n1"):
    if method == "Gossip":
        return pb.GossipRequest(sender=sender, updates=updates)
    if method == "Probe":
        return pb.ProbeRequest(sender=sender, seq=7, target=target, updates=updates)
    return pb.PushPullRequest(sender=sender, members=updates)


def sign_with(key: NodeKey | None, statement: pb.Statement) -> pb.SignedStatement:
    data = statement.SerializeToString()
    k = key or NodeKey(NodeKey.generate())
    return pb.SignedStatement(statement=data, signature=k._key.sign(SIGNING_CONTEXT + data))


def forged_record(victim: dict, ip: str) -> pb.NodeRecord:
    return pb.NodeRecord(name=victim["name"], subnet=victim["subnet"], underlay_ip=ip,
                         vtep_mac=ATTACK_MAC, grpc_addr=f"{ip}:7946", backend="vxlan",
                         incarnation=TOP, lease_revision=2**62)


def forgeries(victim: dict, ip: str, member_key: NodeKey | None) -> dict[str, pb.MemberUpdate]:
    """What the attacker says about `victim` (its status record)."""
    rec = forged_record(victim, ip)
    real = pb.NodeRecord(name=victim["name"], subnet=victim["subnet"],
                         underlay_ip=victim["underlayIP"], vtep_mac=victim["vtepMAC"],
                         grpc_addr=victim["grpcAddr"], backend="vxlan", incarnation=TOP,
                         lease_revision=2**62)
    out = {
        # the attack of the issue: the old, unsigned format
        "unsigned record": pb.MemberUpdate(record=rec, state=ALIVE, incarnation=TOP,
                                           reporter=victim["name"]),
        "record signed by the attacker": pb.MemberUpdate(
            state=ALIVE, reporter=victim["name"],
            signed=sign_with(None, pb.Statement(record=rec, state=ALIVE))),
        "unsigned LEFT": pb.MemberUpdate(record=real, state=LEFT, incarnation=TOP,
                                         reporter=victim["name"]),
        "LEFT signed by the attacker": pb.MemberUpdate(
            state=LEFT, reporter=victim["name"],
            signed=sign_with(None, pb.Statement(record=real, state=LEFT))),
        "DEAD at the maximal incarnation": pb.MemberUpdate(
            record=pb.NodeRecord(name=victim["name"]), state=DEAD, incarnation=TOP,
            reporter="n3"),
        "SUSPECT at the maximal incarnation, signed by the attacker": pb.MemberUpdate(
            state=SUSPECT, reporter="n3",
            signed=sign_with(None, pb.Statement(record=real, state=ALIVE))),
    }
    if member_key is not None:  # a member signing for another node with its own key
        out["record signed by member n3"] = pb.MemberUpdate(
            state=ALIVE, reporter="n3", signed=sign_with(member_key, pb.Statement(
                record=rec, state=ALIVE)))
        out["LEFT signed by member n3"] = pb.MemberUpdate(
            state=LEFT, reporter="n3", signed=sign_with(member_key, pb.Statement(
                record=real, state=LEFT)))
    return out


def forged_leaves(victim: dict, member_key: NodeKey | None) -> list[pb.LeaveRequest]:
    real = pb.NodeRecord(name=victim["name"], subnet=victim["subnet"],
                         underlay_ip=victim["underlayIP"], vtep_mac=victim["vtepMAC"],
                         grpc_addr=victim["grpcAddr"], incarnation=TOP, lease_revision=2**62)
    out = [pb.LeaveRequest(name=victim["name"], incarnation=TOP),
           pb.LeaveRequest(name=victim["name"], incarnation=TOP, signed=sign_with(
               None, pb.Statement(record=real, state=LEFT)))]
    if member_key is not None:
        out.append(pb.LeaveRequest(name=victim["name"], incarnation=TOP, signed=sign_with(
            member_key, pb.Statement(record=real, state=LEFT))))
    return out


def genuine_statements(attacker: Attacker, name: str, sender: str = "n3") -> list:
    """What n1 relays about `name`: its signed statements, there for anyone to copy."""
    code, reply = attacker.call("PushPull", pb.PushPullRequest(sender=sender))
    assert code == "OK"
    return [m for m in pb.PushPullReply.FromString(reply).members
            if m.HasField("signed") and
            pb.Statement.FromString(m.signed.statement).record.name == name]


# --- watching the target ---------------------------------------------------------------

class KernelWatch:
    """Every neighbour and FDB notification on the target's VXLAN device, and a poll of
    its entries every 50 ms: what the data plane did while the attack ran."""

    def __init__(self, sb, node):
        self.sb, self.node = sb, node
        self.baseline = sb.kernel_entries(node)
        self.dev = f"dev {sb.vxlan_device} "
        ns = sb.node(node).netns
        self.mons = [subprocess.Popen([*sb.exec_prefix(ns), *cmd], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
                     for cmd in (["bridge", "monitor", "fdb"], ["ip", "monitor", "neigh"])]
        self.events: list[str] = []
        self.differ: list[dict] = []
        self.polls = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=(m,), daemon=True)
                         for m in self.mons]
        self._threads.append(threading.Thread(target=self._poll, daemon=True))
        for t in self._threads:
            t.start()
        time.sleep(0.5)  # the monitors are subscribed

    def _read(self, mon):
        for line in mon.stdout:
            words = line.replace("Deleted ", "").split()
            # our device's peer entries: FDB entries and IPv4 neighbours (not IPv6 ND)
            if self.dev in line and words and ("." in words[0] or words[0].count(":") == 5):
                self.events.append(line.strip())

    def _poll(self):
        while not self._stop.is_set():
            now = self.sb.kernel_entries(self.node)
            self.polls += 1
            if now != self.baseline:
                self.differ.append(now)
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        for m in self.mons:
            m.terminate()
            m.wait(10)
        for t in self._threads:
            t.join(10)
        for m in self.mons:
            m.stdout.close()
        assert self.events == [], f"the data plane changed during the attack: {self.events}"
        assert self.differ == [], f"entries differed from before: {self.differ[:2]}"
        assert self.polls > 3
        return self.polls


def metrics(sb, node):
    code = ("import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:9181/metrics',timeout=5).read().decode())")
    out = sb.run_in(sb.node(node).netns, sys.executable, "-I", "-S", "-c", code).stdout.decode()
    got = {f"refused:{m[1]}": float(m[2]) for m in re.finditer(
        r'^overlay_membership_refused_total\{reason="([\w-]+)"\} (\S+)', out, re.M)}
    got.update({f"sig:{m[1]}": float(m[2]) for m in re.finditer(
        r'^overlay_membership_signature_ops_total\{op="(\w+)"\} (\S+)', out, re.M)})
    got.update({f"updates:{m[1]}": float(m[2]) for m in re.finditer(
        r'^overlay_gossip_updates_total\{result="(\w+)"\} (\S+)', out, re.M)})
    return got


def delta(after, before, key):
    return after.get(key, 0) - before.get(key, 0)


def refusal_lines(sb, node):
    lines = Path(sb.node(node).log).read_text().splitlines()
    out: dict[str, int] = {}
    for line in lines:
        m = re.search(r"membership: refused \d+ update\(s\).*?\[([\w-]+)\]", line)
        if m:
            out[m[1]] = out.get(m[1], 0) + 1
    return out


def peer_row(sb, node, name):
    return {p["name"]: p for p in status_json(sb.status(node))["peers"]}[name]


def assert_target_unharmed(sb, victim):
    row = peer_row(sb, "n1", victim["name"])
    assert row["programmed"] and row["source"] == "etcd", row
    assert (row["vtepMAC"], row["underlayIP"]) == (victim["vtepMAC"], victim["underlayIP"])
    # n2 is (again) alive: whatever was said about it, it could refute
    wait_until(lambda: peer_row(sb, "n1", victim["name"])["state"] == "alive", 15, 0.2)
    assert "stranger" not in {p["name"] for p in status_json(sb.status("n1"))["peers"]}


def run_forgeries(sb, attacker, sender, victim, attacker_ip, member_key=None):
    """Every forgery through every method, then the forged leaves; the answers."""
    codes: dict[str, int] = {}
    for what, u in forgeries(victim, attacker_ip, member_key).items():
        for method in METHODS:
            code, _ = attacker.call(method, envelope(method, sender, [u]))
            codes[code] = codes.get(code, 0) + 1
            assert code in ("OK", "PERMISSION_DENIED"), (what, method, code)
    for leave in forged_leaves(victim, member_key):
        code, _ = attacker.call("Leave", leave)
        codes[code] = codes.get(code, 0) + 1
    # the maximal incarnation beside n2's genuine statement: only the statement counts, and
    # n2 refutes the DEAD at the incarnation it signed
    for m in genuine_statements(attacker, victim["name"], sender if sender != "stranger"
                                else "n3"):
        u = pb.MemberUpdate(record=forged_record(victim, attacker_ip), state=DEAD,
                            incarnation=TOP, reporter="n3", signed=m.signed)
        attacker.call("Gossip", envelope("Gossip", sender, [u]))
    return codes


# --- the tests ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attacked():
    with sandbox_up(3, 1) as sb:
        yield sb, sb.add_outside_host("stranger")


def test_forged_records_leaves_and_incarnations_are_refused(attacked):
    """From an outside host (as a stranger and as member n3) and from n3's own host with
    n3's signing key: nothing changes n1's data plane; every refusal is counted."""
    sb, outside = attacked
    victim = status_json(sb.status("n2"))["node"]
    wait_until(lambda: peer_row(sb, "n1", "n2")["state"] == "alive", 15, 0.2)
    before = metrics(sb, "n1")
    lines_before = refusal_lines(sb, "n1")
    n3_key = NodeKey(_read_key(sb, "n3"))
    t0 = time.monotonic()
    watch = KernelWatch(sb, "n1")
    try:
        positions = [("outside host, as a stranger", outside.netns, "stranger", None),
                     ("outside host, as member n3", outside.netns, "n3", None),
                     ("member n3's host, with n3's key", sb.node("n3").netns, "n3", n3_key)]
        for label, ns, sender, key in positions:
            a = Attacker(sb, ns, "n1")
            try:
                codes = run_forgeries(sb, a, sender, victim, outside.underlay_ip, key)
            finally:
                a.close()
            print(f"{label}: answers {codes}")
        # and while n2 keeps talking to n1: nothing of the above sticks
        time.sleep(1.0)
    finally:
        polls = watch.stop()
    took = time.monotonic() - t0
    after = metrics(sb, "n1")
    for reason in ("no-lease", "unsigned", "bad-signature"):
        assert delta(after, before, f"refused:{reason}") > 0, (reason, after)
    lines = refusal_lines(sb, "n1")
    for reason, n in lines.items():
        # once per 10 s per reason (plus the first)
        assert n - lines_before.get(reason, 0) <= 2 + took / 10, (reason, lines)
    assert_target_unharmed(sb, victim)
    assert pid_alive(sb.node("n1").pid) and sb.status("n1").ready
    _, ok, total = sb.check()
    assert ok == total
    refused = {k[8:]: int(delta(after, before, k)) for k in after if k.startswith("refused:")}
    print(f"\nSCENARIO | forged records | forged records, LEFTs and maximal incarnations about "
          f"n2 via Gossip/Probe/PushPull/Leave from outside and from member n3 | n1's VXLAN "
          f"entries unchanged ({polls} polls + kernel notifications over {took:.1f}s), "
          f"refused {refused}, n2 alive and programmed from etcd")


def test_a_flood_of_bad_signatures_is_refused_cheaply(attacked):
    sb, outside = attacked
    victim = status_json(sb.status("n2"))["node"]
    before = metrics(sb, "n1")
    lines_before = refusal_lines(sb, "n1")
    pid = sb.node("n1").pid
    rec = forged_record(victim, outside.underlay_ip)
    msgs = []
    for i in range(200):  # 10,000 distinct statements, each news (a higher incarnation)
        ups = []
        for j in range(50):
            rec.incarnation = 10**15 + i * 50 + j
            ups.append(pb.MemberUpdate(state=ALIVE, reporter="n2", signed=pb.SignedStatement(
                statement=pb.Statement(record=rec, state=ALIVE).SerializeToString(),
                signature=os.urandom(64))))
        msgs.append(pb.GossipRequest(sender="n3", updates=ups))
    watch = KernelWatch(sb, "n1")
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    a = Attacker(sb, outside.netns, "n1")
    try:
        codes = a.many("Gossip", msgs)
    finally:
        a.close()
    took, cpu = time.monotonic() - t0, _cpu_seconds(pid) - cpu0
    time.sleep(0.5)
    watch.stop()
    after = metrics(sb, "n1")
    refused = delta(after, before, "refused:bad-signature") + delta(after, before,
                                                                    "refused:budget")
    verified = delta(after, before, "sig:verify")
    assert codes == {"OK": 200}, codes
    assert refused >= 10_000, (refused, after)
    # signature checks are budgeted: a burst, then VERIFY_RATE a second
    assert verified <= VERIFY_BURST + VERIFY_RATE * (took + 2), verified
    lines = refusal_lines(sb, "n1")
    for reason in ("bad-signature", "budget"):
        assert lines.get(reason, 0) - lines_before.get(reason, 0) <= 2 + took / 10, lines
    assert_target_unharmed(sb, victim)
    assert sb.status("n1").ready
    print(f"\nSCENARIO | flood of bad signatures | 10,000 bad statements about n2 in 200 "
          f"Gossip calls over {took:.1f}s | all refused ({int(refused)}), {int(verified)} "
          f"signature checks, n1 used {cpu:.2f} s of CPU, entries unchanged")


def test_replayed_statements_lose_to_the_newer_ones(make_sandbox):
    """n2's genuine statements, copied before it changed its VTEP MAC and before it left
    and came back, replayed to n1 afterwards: n1 keeps n2's newest record."""
    sb = make_sandbox(3, 0)
    outside = sb.add_outside_host("stranger")
    wait_until(lambda: peer_row(sb, "n1", "n2")["state"] == "alive", 15, 0.2)
    a = Attacker(sb, outside.netns, "n1")
    try:
        # n1 knows n2 from etcd at once; n2's own signed statement comes by gossip, which
        # may take a few rounds on a busy machine.
        wait_until(lambda: genuine_statements(a, "n2"), 30, 0.5)
        old_alive = genuine_statements(a, "n2")
        assert old_alive, "n1 relays n2's statement"
        # n2 comes back with a new VTEP MAC
        sb.stop_agent("n2")
        sb.start_agent("n2", ["--vtep-mac", "02:42:42:00:00:22"])
        sb.wait_ready("n2")
        wait_until(lambda: peer_row(sb, "n1", "n2")["vtepMAC"] == "02:42:42:00:00:22" and
                   peer_row(sb, "n1", "n2")["state"] == "alive", 15, 0.2)
        # n2 leaves (n1 keeps its signed LEFT) and joins again
        pid = sb.node("n2").pid
        local_leave(sb.agent_socket("n2"))
        wait_until(lambda: not pid_alive(pid), 15)
        wait_until(lambda: peer_row(sb, "n1", "n2")["state"] == "left", 10, 0.1)
        def left_statements() -> list:
            return [m for m in genuine_statements(a, "n2")
                    if pb.Statement.FromString(m.signed.statement).state == LEFT]

        wait_until(left_statements, 30, 0.5)
        old_left = left_statements()
        assert old_left, "n1 relays n2's LEFT"
        sb.start_agent("n2")
        sb.wait_ready("n2")
        wait_until(lambda: peer_row(sb, "n1", "n2")["programmed"] and
                   peer_row(sb, "n1", "n2")["state"] == "alive", 15, 0.2)
        victim = status_json(sb.status("n2"))["node"]
        before = metrics(sb, "n1")
        watch = KernelWatch(sb, "n1")
        sent = 0
        try:
            for m in [*old_alive, *old_left]:
                for method in METHODS:
                    for state in ((LEFT,) if m in old_left else (ALIVE, SUSPECT, DEAD)):
                        u = pb.MemberUpdate(state=state, reporter="n3", signed=m.signed)
                        code, _ = a.call(method, envelope(method, "n3", [u]))
                        assert code == "OK"
                        sent += 1
            leave = pb.LeaveRequest(name="n2", incarnation=TOP, signed=old_left[0].signed)
            assert a.call("Leave", leave)[0] == "OK"
            time.sleep(1.0)
        finally:
            watch.stop()
        after = metrics(sb, "n1")
        # old news: ignored unread (a signature check each would show as refused or admitted)
        assert delta(after, before, "updates:ignored") >= sent, (sent, after)
    finally:
        a.close()
    assert_target_unharmed(sb, victim)
    print("\nSCENARIO | replay | n2's statements from before its MAC change and its LEFT "
          "from before it rejoined, replayed to n1 | n1's entries unchanged, n2 alive with "
          "its newest record")


def test_a_member_with_a_valid_certificate_cannot_speak_for_another_node(make_sandbox):
    """Mutual TLS: n3's certificate and key, used to relay forgeries about n2."""
    sb = make_sandbox(3, 0, tls=True)
    outside = sb.add_outside_host("stranger")
    wait_until(lambda: peer_row(sb, "n1", "n2")["state"] == "alive", 15, 0.2)
    victim = status_json(sb.status("n2"))["node"]
    pki = sb.dir / "pki"
    tls = ("n1", pki / "n3.crt", pki / "n3.key", pki / "ca.crt")
    before = metrics(sb, "n1")
    watch = KernelWatch(sb, "n1")
    a = Attacker(sb, outside.netns, "n1", tls)
    try:
        codes = run_forgeries(sb, a, "n3", victim, outside.underlay_ip,
                              NodeKey(_read_key(sb, "n3")))
        # speaking as n2 with n3's certificate is refused at the door
        code, _ = a.call("Gossip", envelope("Gossip", "n2", []))
        assert code == "PERMISSION_DENIED"
        time.sleep(1.0)
    finally:
        a.close()
        watch.stop()
    after = metrics(sb, "n1")
    assert codes.get("OK", 0) > 0
    for reason in ("unsigned", "bad-signature"):
        assert delta(after, before, f"refused:{reason}") > 0, (reason, after)
    assert_target_unharmed(sb, victim)
    print(f"\nSCENARIO | compromised member (mutual TLS) | n3's certificate relaying forged "
          f"records, LEFTs and incarnations about n2 | refused {codes}, entries unchanged")


def _read_key(sb, node) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (sb.node_dir(node) / "state" / "node.key").read_bytes(), password=None)
    return key.private_bytes_raw()  # type: ignore[union-attr]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
