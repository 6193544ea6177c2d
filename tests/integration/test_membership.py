"""Membership at 10 nodes with the default timings (issue: membership over gRPC).

One 10-node sandbox for the module: every peer alive with round trips measured
through gRPC and through the tunnel; no false "dead" under 20% random loss on
the underlay; a crashed host declared dead everywhere while its entries stay.

The bounds here have room for a busy machine (CI runs on the developer's): they
check the behaviour. The targets (dead everywhere within 3 s at 10 nodes) are
measured by bench/membership.py and bench/convergence.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import dump_logs, sandbox_up, wait_until

from overlay.agent.localclient import status_json
from overlay.sandbox.sandbox import Sandbox, tool

NODES = [f"n{i}" for i in range(1, 11)]


@pytest.fixture(scope="module")
def cluster10() -> Iterator[Sandbox]:
    with sandbox_up(10, 0) as sb:
        yield sb


@pytest.fixture
def logs_on_failure(cluster10: Sandbox, request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False):
        dump_logs(cluster10)


_pool = ThreadPoolExecutor(10)


def peer_states(sb: Sandbox, nodes: list[str] = NODES) -> dict[str, dict[str, dict]]:
    """node -> peer -> its row in `status --json` ({} if the agent does not answer)."""
    def one(n: str) -> tuple[str, dict[str, dict]]:
        try:
            return n, {p["name"]: p for p in status_json(sb.status(n, 1.0))["peers"]}
        except Exception:
            return n, {}
    return dict(_pool.map(one, nodes))


def loss_drops(sb: Sandbox) -> int:
    """Frames dropped so far by the random-loss rule of the sandbox's underlay faults."""
    out = sb.run_in(sb.st.underlay, "nft", "list", "table", "bridge", "ovs_faults").stdout
    m = re.search(r"numgen random mod 100 < \d+ counter packets (\d+)", out.decode())
    return int(m.group(1)) if m else 0


def all_alive(sb: Sandbox, nodes: list[str] = NODES, rtts: bool = False) -> bool:
    for n, peers in peer_states(sb, nodes).items():
        want = set(nodes) - {n}
        if set(peers) != want or any(p["state"] != "alive" for p in peers.values()):
            return False
        if rtts and any(p["grpcRttUs"] is None or p["tunnelRttUs"] is None
                        for p in peers.values()):
            return False
    return True


def test_every_node_sees_every_peer_alive_with_both_round_trips(cluster10, logs_on_failure):
    sb = cluster10
    took = wait_until(lambda: all_alive(sb, rtts=True), timeout=60, interval=0.2)
    print(f"all 90 peer views alive with gRPC and tunnel RTTs {took:.1f}s after the check began")
    # What an operator runs on a node. On a busy machine a peer may be suspect for a moment
    # between two commands (a late probe answer), so each view is asked until it shows
    # every peer alive; a peer that stays suspect or dead fails.
    docs: list[dict] = []

    def n1_json_all_alive() -> bool:
        p = sb.run_in(sb.node("n1").netns, tool("overlayctl"), "status", "--socket",
                      str(sb.agent_socket("n1")), "--json", check=False)
        try:
            docs.append(json.loads(p.stdout))
        except ValueError:  # no answer this time
            return False
        return all(peer["state"] == "alive" for peer in docs[-1]["peers"])

    wait_until(n1_json_all_alive, 30, 0.2)
    doc = docs[-1]
    assert doc["conditions"]["membership"] == {"ok": True, "message": "9 alive"}
    assert len(doc["peers"]) == 9
    for peer in doc["peers"]:
        assert peer["programmed"] and peer["inEtcd"]
        # measured, and plausible: below the 10 s a probe ever waits
        assert 0 < peer["grpcRttUs"] < 10_000_000 and 0 < peer["tunnelRttUs"] < 10_000_000
        assert peer["sinceUnixMs"] <= time.time() * 1000
    texts: list[str] = []

    def n1_table_all_alive() -> bool:
        texts.append(sb.run_in(sb.node("n1").netns, tool("overlayctl"), "status", "--socket",
                               str(sb.agent_socket("n1")), check=False).stdout.decode())
        return texts[-1].count(" alive ") == 9

    wait_until(n1_table_all_alive, 30, 0.2)
    header = next(line for line in texts[-1].splitlines() if line.startswith("PEER"))
    assert header.split() == ["PEER", "SUBNET", "UNDERLAY", "STATE", "GRPC", "RTT", "TUNNEL",
                              "RTT", "SINCE", "PROGRAMMED"]
    outs: list[str] = []

    def sandbox_status_all_alive() -> bool:
        outs.append(subprocess.run([tool("overlayctl"), "sandbox", "status", "--name", sb.name],
                                   capture_output=True, text=True, timeout=60).stdout)
        return outs[-1].count(" alive ") == 90

    wait_until(sandbox_status_all_alive, 60, 0.5)
    assert "TUNNEL RTT" in outs[-1]


def test_no_false_dead_under_20_percent_random_loss(cluster10, logs_on_failure):
    sb = cluster10
    wait_until(lambda: all_alive(sb), timeout=60, interval=0.2)  # a suspicion may linger
    seen_dead: dict[tuple[str, str], float] = {}
    suspects = 0
    sb.set_faults(loss_percent=20)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            for n, peers in peer_states(sb).items():
                for name, p in peers.items():
                    if p["state"] == "dead":
                        seen_dead.setdefault((n, name), time.monotonic() - t0)
                    suspects += p["state"] == "suspect"
            time.sleep(0.25)
        dropped = loss_drops(sb)
        # the rule really drops about a fifth: pings between two hosts lose ~1 in 3
        ping = sb.run_in(sb.node("n1").netns, "ping", "-n", "-q", "-c", "100", "-i", "0.01",
                         "-W", "1", sb.node("n2").underlay_ip, check=False).stdout.decode()
    finally:
        sb.clear_faults()
    loss = int(ping.split("% packet loss")[0].rsplit(" ", 1)[1])
    print(f"20% loss for 30s: {dropped} frames dropped, ping loss {loss}%, suspect "
          f"observations {suspects}, dead {seen_dead}")
    assert dropped > 500 and 15 <= loss <= 60, ping
    assert seen_dead == {}, f"declared dead while only packets were lost: {seen_dead}"
    wait_until(lambda: all_alive(sb), timeout=60, interval=0.2)


# Declared dead everywhere within this long: the protocol allows 3 s when nobody confirms
# (--suspect-timeout-max) after the probe that found it silent; 5x that for a busy machine.
# The 3 s target at 10 nodes is bench/membership.py's.
DEAD_WITHIN = 15.0


def test_crashed_host_is_declared_dead_everywhere_and_keeps_its_entries(cluster10,
                                                                        logs_on_failure):
    sb = cluster10
    victim, others = "n10", NODES[:-1]
    rec = sb.status(victim).self
    wait_until(lambda: all_alive(sb), timeout=60, interval=0.2)  # a suspicion may linger
    # a host losing power: its agent dies and it drops off the underlay without a word
    sb.stop_agent(victim, signal.SIGKILL)
    sb.set_faults(partitioned=[victim])
    t0 = time.monotonic()
    dead_at: dict[str, float] = {}

    def everyone_knows() -> bool:
        for n, peers in peer_states(sb, others).items():
            if n not in dead_at and peers.get(victim, {}).get("state") == "dead":
                dead_at[n] = time.monotonic() - t0
        return len(dead_at) == len(others)

    try:
        # polling every 0.25 s: faster polling loads the agents it measures
        wait_until(everyone_knows, timeout=DEAD_WITHIN + 15, interval=0.25)
        slowest = max(dead_at.values())
        print(f"crash of {victim} known as dead on all 9 peers after {slowest:.2f}s "
              f"(first {min(dead_at.values()):.2f}s; the 3 s target is bench/membership.py's)")
        assert slowest <= DEAD_WITHIN, dead_at
        # dead, not gone: its subnet stays programmed while its lease is in etcd
        views = peer_states(sb, ["n1"])["n1"]
        assert views[victim]["state"] == "dead"
        assert views[victim]["programmed"] and views[victim]["inEtcd"]
        e = sb.kernel_entries("n1")
        assert (rec.vtep_mac, rec.underlay_ip) in e["fdb"]
        assert (rec.subnet, rec.subnet.split("/")[0]) in e["route"]
        # the others are not taken for dead with it (one may be suspect for a moment)
        assert all(p["state"] != "dead" for n, p in views.items() if n != victim), views
    finally:
        sb.clear_faults()
        sb.start_agent(victim)
    sb.wait_ready(victim, 30)
    took = wait_until(lambda: all_alive(sb), timeout=60, interval=0.2)
    print(f"{victim} alive again everywhere {took:.1f}s after its agent was ready")


def own_dead_verdicts(sb: Sandbox) -> list[str]:
    """'X is dead' lines the agents logged on their own judgement (not heard from a peer)."""
    return [f"{n}: {line}" for n in NODES
            for line in Path(sb.node(n).log).read_text(errors="replace").splitlines()
            if " is dead: " in line and "reported by" not in line]


def test_agents_stopped_together_come_back_without_declaring_each_other_dead(
        cluster10, logs_on_failure):
    """Every agent SIGSTOPped at once (the whole machine starved): when they run again,
    every timer is late at once. None may take that for the others' death, and the
    cluster is calm again by itself."""
    sb = cluster10
    wait_until(lambda: all_alive(sb), timeout=15, interval=0.2)
    before = own_dead_verdicts(sb)
    pids = [sb.node(n).pid for n in NODES]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(4)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    took = wait_until(lambda: all_alive(sb), timeout=60, interval=0.5)
    print(f"all 90 views alive {took:.1f}s after 4s with every agent stopped")
    assert own_dead_verdicts(sb)[len(before):] == []
    assert any("timers ran" in Path(sb.node(n).log).read_text() for n in NODES)


def test_agents_stopped_in_turn_the_cluster_recovers_by_itself(cluster10, logs_on_failure):
    """A rolling overload: each agent stopped for 1.5 s, two at a time, one after the
    other. Afterwards every view is alive again within a bounded time."""
    sb = cluster10
    wait_until(lambda: all_alive(sb), timeout=15, interval=0.2)
    pids = [sb.node(n).pid for n in NODES]
    stopped: list[int] = []
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            time.sleep(0.75)
            if len(stopped) == 2:
                os.kill(stopped.pop(0), signal.SIGCONT)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    took = wait_until(lambda: all_alive(sb), timeout=60, interval=0.5)
    print(f"all 90 views alive {took:.1f}s after the last agent ran again")
