"""Hostile input to the agents' gRPC membership API (issue 5, scenario 7), property-based.

A stranger on the underlay sends well-formed messages with hostile values
(unknown nodes, garbage subnets and MACs, huge incarnations, invalid states,
long lists) and plain garbage bytes to every Membership method. The agent
must stay up and ready, program no phantom peer (etcd decides who exists),
keep its file descriptors bounded, and the pods must keep talking.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from probes import GRPC_RELAY

from overlay.sandbox.sandbox import pid_alive
from overlay.v1 import overlay_pb2 as pb

METHODS = ["Probe", "IndirectProbe", "PushPull", "Leave", "Gossip"]
text = st.text(max_size=40)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
records = st.builds(
    pb.NodeRecord, name=st.one_of(text, st.sampled_from(["n1", "n9", ""])),
    subnet=st.one_of(text, st.sampled_from(["10.244.9.0/24", "0.0.0.0/0", "10.244.1.0/33"])),
    underlay_ip=st.one_of(text, st.sampled_from(["172.30.9.9", "::1", "999.1.1.1"])),
    vtep_mac=st.one_of(text, st.sampled_from(["02:00:00:00:00:09", "ff:ff:ff:ff:ff:ff"])),
    grpc_addr=text, backend=st.one_of(text, st.just("vxlan")), incarnation=u64,
    lease_revision=st.integers(min_value=-(2**63), max_value=2**63 - 1))
signed = st.one_of(st.none(), st.builds(
    pb.SignedStatement, signature=st.binary(max_size=80),
    statement=st.one_of(st.binary(max_size=200), st.builds(
        pb.Statement, record=records, state=st.integers(min_value=0, max_value=7)).map(
        lambda m: m.SerializeToString()))))
updates = st.builds(pb.MemberUpdate, record=st.one_of(st.none(), records),
                    state=st.integers(min_value=0, max_value=7), incarnation=u64,
                    reporter=text, signed=signed)


def message(method: str) -> st.SearchStrategy[bytes]:
    update_list = st.lists(updates, max_size=60)
    built = {
        "Probe": st.builds(pb.ProbeRequest, sender=text, seq=u64, updates=update_list,
                           target=text),
        "IndirectProbe": st.builds(pb.IndirectProbeRequest, sender=text, seq=u64,
                                   target=text, target_addr=st.one_of(
                                       text, st.sampled_from(["172.30.9.9:7946",
                                                              "127.0.0.1:1", "10.0.0.1:0"])),
                                   timeout_ms=st.integers(min_value=0, max_value=2**32 - 1)),
        "PushPull": st.builds(pb.PushPullRequest, sender=text, members=update_list),
        "Leave": st.builds(pb.LeaveRequest, name=st.one_of(text, st.sampled_from(["n9", "n2"])),
                           incarnation=u64, signed=signed),
    }.get(method)
    raw = st.binary(max_size=300)
    if built is None:  # methods added later: garbage only
        return raw
    return st.one_of(raw, built.map(lambda m: m.SerializeToString()))


@st.composite
def requests(draw):
    method = draw(st.sampled_from(METHODS))
    return f"/overlay.v1.Membership/{method}", draw(message(method))


def test_membership_api_survives_hostile_input(make_sandbox):
    sb = make_sandbox(2, 1)
    stranger = sb.add_outside_host("stranger")
    n1 = sb.node("n1")
    before = sb.kernel_entries("n1")
    fds_before = len(os.listdir(f"/proc/{n1.pid}/fd"))
    relay = subprocess.Popen([*sb.exec_prefix(stranger.netns), sys.executable, "-c", GRPC_RELAY,
                              f"{n1.underlay_ip}:7946"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes: dict[str, int] = {}
    assert relay.stdout is not None and relay.stdin is not None
    assert json.loads(relay.stdout.readline()) == {"ready": True}
    try:
        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(req=requests())
        def one(req):
            method, payload = req
            relay.stdin.write(json.dumps({"method": method, "hex": payload.hex()}) + "\n")
            relay.stdin.flush()
            answer = json.loads(relay.stdout.readline())
            codes[answer["code"]] = codes.get(answer["code"], 0) + 1
            assert answer["code"] != "UNAVAILABLE", "the agent stopped answering"

        one()
    finally:
        relay.communicate(timeout=30)  # closes stdin: the relay ends
    assert pid_alive(n1.pid), "the agent died"
    assert sb.status("n1").ready
    # No phantom peer in the kernel (etcd decides who exists), and n2 untouched: a Leave
    # or a record for n2 counts only signed by n2 (issue 11).
    assert sb.kernel_entries("n1") == before
    names = {p.record.name for p in sb.status("n1").peers if p.programmed}
    assert names == {"n2"}, names
    _, ok, total = sb.check()
    assert ok == total
    fds_after = len(os.listdir(f"/proc/{n1.pid}/fd"))
    assert fds_after <= fds_before + 10, (fds_before, fds_after)
    log = Path(n1.log).read_text()
    assert "Traceback" not in log, log[-3000:]
    print(f"\nSCENARIO | bad gRPC input | 300 hostile Membership calls from a non-member "
          f"(answers: {codes}) | agent alive and ready, no phantom peer programmed, fds "
          f"{fds_before}->{fds_after}, pods still reachable")


def test_indirect_probe_cannot_aim_the_agent_at_arbitrary_addresses(make_sandbox):
    """IndirectProbe names a target; the agent probes only members, at their known address."""
    from probes import TCP_COUNTER

    sb = make_sandbox(2, 0)
    stranger = sb.add_outside_host("stranger")
    counter = subprocess.Popen([*sb.exec_prefix(stranger.netns), sys.executable, "-c",
                                TCP_COUNTER, "7946", "6"], stdout=subprocess.PIPE, text=True)
    assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
    relay = subprocess.Popen([*sb.exec_prefix(stranger.netns), sys.executable, "-c", GRPC_RELAY,
                              f"{sb.node('n1').underlay_ip}:7946"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert relay.stdout is not None and relay.stdin is not None
    relay.stdout.readline()
    aim = f"{stranger.underlay_ip}:7946"
    for target in ("n9", "n2", "stranger"):
        req = pb.IndirectProbeRequest(sender="n2", seq=1, target=target, target_addr=aim,
                                      timeout_ms=4_000_000_000)
        relay.stdin.write(json.dumps({"method": "/overlay.v1.Membership/IndirectProbe",
                                      "hex": req.SerializeToString().hex()}) + "\n")
        relay.stdin.flush()
        assert json.loads(relay.stdout.readline())["code"] == "OK"
    relay.communicate(timeout=30)
    out, _ = counter.communicate(timeout=30)
    assert out.strip() == "0", f"the agent connected to the address a stranger named: {out}"
