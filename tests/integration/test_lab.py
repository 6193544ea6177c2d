"""The sandbox as a network lab (issue 16): every `overlayctl sandbox` subcommand that
changes a running sandbox, run as a user runs it (the CLI, a subprocess), checked by
what the user would see: namespaces, processes, etcd, ping, iperf, the watch table.
Each test leaves the shared sandbox as it found it. Then `sandbox chaos`: a 60 s run
with a fixed seed and 0 violations, an interrupted run that undoes its faults, and
`sandbox down` after a run killed outright.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sandbox_up, wait_until

from overlay.agent.localclient import status_json
from overlay.sandbox.observe import etcd_leases, process_state
from overlay.sandbox.sandbox import Sandbox, State, list_netns, pid_alive, tool


@pytest.fixture(scope="module")
def lab() -> Iterator[Sandbox]:
    """3 nodes x 2 pods, 3 etcd members, a short lease TTL (partitions longer than it fit in
    a short chaos run). The chaos tests come last: the very last one removes the sandbox."""
    with sandbox_up(3, 2, etcd_members=3, agent_args=["--lease-ttl", "6"]) as sb:
        yield sb


def ctl(sb: Sandbox, cmd: str, *args: str, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    """`overlayctl sandbox CMD --name <sb> ARGS...`; the test's view of the state reloaded."""
    p = subprocess.run([tool("overlayctl"), "sandbox", cmd, "--name", sb.name, *args],
                       capture_output=True, text=True, timeout=timeout, check=False)
    sb.state = State.load(sb.state_path)
    return p


def ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    return p.stdout


def refused(p: subprocess.CompletedProcess[str], *words: str) -> str:
    """A failed command: exit 1, one sentence on stderr naming `words`, no traceback."""
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[0]
    assert line.startswith("overlayctl sandbox "), p.stderr
    for w in words:
        assert w in line, (w, line)
    return line


def misused(p: subprocess.CompletedProcess[str], *words: str) -> str:
    """A value no run could use: a usage error (exit 2) naming `words`, before any change."""
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and not p.stdout, p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    return p.stderr


def pod_on(sb: Sandbox, node: str):
    return next(p for p in sb.st.pods if p.node == node)


def reaches(sb: Sandbox, src: str, dst: str) -> bool:
    return sb.ping(pod_on(sb, src).netns, pod_on(sb, dst).ip, timeout=1)


def peer_state(sb: Sandbox, observer: str, peer: str) -> str:
    peers = status_json(sb.status(observer))["peers"]
    return next((p["state"] for p in peers if p["name"] == peer), "")


def test_kill_restart_stop_cont_and_watch(lab):
    sb = lab
    pid = sb.node("n2").pid
    out = ok(ctl(sb, "node", "kill", "n2"))
    assert f"pid {pid}" in out and "SIGKILL" in out
    assert not pid_alive(pid)
    assert reaches(sb, "n1", "n2"), "pods must keep their network while the agent is down"
    refused(ctl(sb, "node", "kill", "n2"), "n2", "not running")
    out = ok(ctl(sb, "node", "restart", "n2"))
    assert "ready" in out and pid_alive(sb.node("n2").pid)

    pid3 = sb.node("n3").pid
    assert "SIGSTOP" in ok(ctl(sb, "node", "stop", "n3"))
    try:
        assert process_state(pid3) == "stopped"
        wait_until(lambda: peer_state(sb, "n1", "n3") in ("suspect", "dead"), 20, 0.2)
        frames = ok(ctl(sb, "watch", "--count", "2", "--interval", "0.3"))
    finally:
        assert "SIGCONT" in ok(ctl(sb, "node", "cont", "n3"))
    # Not a terminal: two frames one after the other, each a full table.
    assert frames.count("NODE  AGENT") == 2
    rows = {line.split()[0]: line.split() for line in frames.split("\n\n")[-1].splitlines()
            if line.startswith("n")}
    assert rows["n3"][1] == "stopped" and rows["n3"][4:] == ["?", "?", "-"]
    assert rows["n1"][1:3] == ["running", "yes"] and rows["n1"][5] == "alive"
    assert rows["n1"][6].rstrip("*") in ("suspect", "dead")
    assert process_state(pid3) == "running"
    wait_until(lambda: peer_state(sb, "n1", "n3") == "alive", 20, 0.2)


def test_reboot_gives_a_new_namespace_the_same_subnet_and_pods_back(lab):
    sb = lab
    before = sb.status("n3").self
    inode = os.stat(f"/run/netns/{sb.node('n3').netns}").st_ino
    (sb.node_dir("n3") / "run" / "marker").write_text("tmpfs")
    out = ok(ctl(sb, "node", "reboot", "n3"))
    assert "rebooted" in out and "2 pod(s) attached again" in out
    assert os.stat(f"/run/netns/{sb.node('n3').netns}").st_ino != inode
    assert not (sb.node_dir("n3") / "run" / "marker").exists(), "/run must not survive"
    after = sb.status("n3").self
    assert (after.subnet, after.vtep_mac) == (before.subnet, before.vtep_mac)
    p3 = pod_on(sb, "n3")
    assert p3.ip.rsplit(".", 1)[0] == before.subnet.rsplit(".", 1)[0]
    wait_until(lambda: reaches(sb, "n1", "n3") and reaches(sb, "n3", "n2"), 20, 0.2)


def test_node_add_and_remove(lab):
    sb = lab
    out = ok(ctl(sb, "node", "add", "n4"))
    assert "node n4 added" in out and "ready" in out
    subnet = sb.status("n4").self.subnet
    ok(ctl(sb, "pod", "add", "n4"))
    wait_until(lambda: reaches(sb, "n1", "n4"), 20, 0.2)
    refused(ctl(sb, "node", "add", "n4"), "exists already")
    out = ok(ctl(sb, "node", "remove", "n4"))
    assert "left the cluster" in out and "pod n4-p1 deleted" in out
    assert not {sb.ns("n4"), sb.ns("n4-p1")} & set(list_netns())
    assert all(lease.node != "n4" for lease in etcd_leases(sb)[0])
    wait_until(lambda: all(dst != subnet for dst, _ in sb.kernel_entries("n1")["route"]),
               20, 0.2)
    assert [h.name for h in sb.st.nodes] == ["n1", "n2", "n3"]


def test_pod_add_and_del(lab):
    sb = lab
    out = ok(ctl(sb, "pod", "add", "n1", "--pod", "web"))
    web = sb.pod("web")
    assert f"pod web added on n1: {web.ip}" in out
    assert sb.ping(pod_on(sb, "n2").netns, web.ip, timeout=2)
    ipam = sb.node_dir("n1") / "run" / "ipam" / "ip"
    assert (ipam / web.ip).exists()
    out = ok(ctl(sb, "pod", "del", "web"))
    assert "CNI DEL" in out and web.ip in out
    assert not (ipam / web.ip).exists() and web.netns not in list_netns()
    refused(ctl(sb, "pod", "del", "web"), "web")
    refused(ctl(sb, "pod", "add", "n9"), "n9")


def test_faults_partition_loss_bandwidth_heal(lab):
    sb = lab

    def nft() -> str:
        return sb.run_in(sb.st.underlay, "nft", "list", "ruleset").stdout.decode()

    def tbf(node: str) -> str:
        return sb.run_in(sb.node(node).netns, "tc", "qdisc", "show", "dev", "eth0"
                         ).stdout.decode()

    try:
        assert "partitioned" in ok(ctl(sb, "fault", "partition", "n2"))
        assert not reaches(sb, "n1", "n2")
        assert "30%" in ok(ctl(sb, "fault", "loss", "30"))
        assert "numgen random mod 100 < 30" in nft() and 'iifname "u-n2"' in nft()
        assert "1mbit" in ok(ctl(sb, "fault", "bandwidth", "n1", "1mbit"))
        assert "tbf" in tbf("n1") and "rate 1Mbit" in tbf("n1")
        refused(ctl(sb, "fault", "bandwidth", "n1", "fast"), "rate")
        misused(ctl(sb, "fault", "loss", "101"), "101", "between 0 and 100")
        refused(ctl(sb, "fault", "partition", "n9"), "n9")
    finally:
        out = ok(ctl(sb, "fault", "heal"))
    assert "partition of n2" in out and "30% loss" in out and "1mbit cap on n1" in out
    assert "drop" not in nft() and "tbf" not in tbf("n1")
    assert (sb.st.partitioned, sb.st.loss_percent, sb.st.bandwidth) == ([], 0, {})
    wait_until(lambda: reaches(sb, "n1", "n2"), 30, 0.2)
    assert "no underlay fault" in ok(ctl(sb, "fault", "heal"))


def test_a_node_back_from_a_partition_longer_than_its_lease_is_alive_for_good(lab):
    """Its lease expires, its peers forget it and close their channels to it; once healed
    it comes back with a new lease, and every view must settle on alive and stay there
    (a stub cached on the closed channel once failed every probe to it for good: suspect,
    alive, suspect... while the data plane, following etcd, hid it)."""
    import time

    sb = lab
    nodes = ("n1", "n2", "n3")

    def views() -> dict[tuple[str, str], str]:
        return {(o, p): peer_state(sb, o, p) for o in nodes for p in nodes if o != p}

    try:
        ok(ctl(sb, "fault", "partition", "n2"))
        wait_until(lambda: peer_state(sb, "n1", "n2") == "", 60, 0.5)  # forgotten
    finally:
        ok(ctl(sb, "fault", "heal"))
    logs = {n: Path(sb.node(n).log) for n in ("n1", "n3")}
    start = {n: log.stat().st_size for n, log in logs.items()}
    # Every view alive for 5 s in a row, within 90 s. The flapping never gave more than
    # about a second in a row; a busy machine may still cost a passing suspicion.
    deadline, since, v = time.monotonic() + 90, None, views()
    while time.monotonic() < deadline:
        v = views()
        if set(v.values()) != {"alive"}:
            since = None
        elif since is None:
            since = time.monotonic()
        elif time.monotonic() - since >= 5:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"views never all alive for 5 s in a row within 90 s: {v}")
    # The cause itself: calls through a stub whose channel was closed (dozens a second).
    for n, log in logs.items():
        with log.open(errors="replace") as f:
            f.seek(start[n])
            assert f.read().count("Channel is closed") < 3, n


def tcp_connections(sb: Sandbox, node: str, port: int) -> set[tuple[str, str]]:
    """(local, remote) of the node's established TCP connections to or from `port`."""
    out = sb.run_in(sb.node(node).netns, "ss", "-tnH", "state", "established").stdout.decode()
    conns = set()
    for line in out.splitlines():
        local, remote = (a.replace("[::ffff:", "").replace("]", "") for a in line.split()[-2:])
        if local.endswith(f":{port}") or remote.endswith(f":{port}"):
            conns.add((local, remote))
    return conns


def test_a_peer_that_vanished_without_a_word_leaves_no_connection_behind(lab):
    """n2 is rebooted while partitioned: its namespace goes before any FIN gets through,
    so n1 and n3 are left holding the server end of its old membership connections, which
    only answer and would never learn the other end is gone (a few per reboot, kept for
    good: the soak's fd growth). They must be closed within the keepalive bound."""
    from overlay.sandbox import lab as labmod

    sb = lab
    try:
        ok(ctl(sb, "fault", "partition", "n2"))
        labmod.power_off(sb, "n2")
    finally:
        ok(ctl(sb, "fault", "heal"))
        if "n2" in sb.st.powered_off:
            labmod.power_on(sb, "n2")

    def half_open() -> list[tuple[str, str, str]]:
        # A connection is half-open when no live node holds its other end.
        ends = {(n, c) for n in ("n1", "n2", "n3") for c in tcp_connections(sb, n, 7946)}
        held = {c for _, c in ends}
        return sorted((n, loc, rem) for n, (loc, rem) in ends if (rem, loc) not in held)

    # Keepalive: 20 s idle, then 10 s for the answer; 90 s leaves room for a busy machine.
    try:
        wait_until(lambda: not half_open(), 90, 1)
    except AssertionError:
        raise AssertionError(f"still half-open after 90 s (node, local, remote): "
                             f"{half_open()}") from None


def test_etcd_kill_and_restart(lab):
    sb = lab
    try:
        assert "2 of 3 members running, quorum kept" in ok(ctl(sb, "etcd", "kill", "etcd2"))
        assert "quorum LOST" in ok(ctl(sb, "etcd", "kill", "etcd3"))
        assert etcd_leases(sb)[1], "etcd answered without quorum"
        refused(ctl(sb, "etcd", "kill", "etcd3"), "etcd3", "not running")
        assert "quorum kept" in ok(ctl(sb, "etcd", "restart", "etcd3"))
    finally:
        if not pid_alive(sb.etcd_host("etcd2").pid):
            ok(ctl(sb, "etcd", "restart", "etcd2"))
        if not pid_alive(sb.etcd_host("etcd3").pid):
            ok(ctl(sb, "etcd", "restart", "etcd3"))
    assert all(pid_alive(h.pid) for h in sb.st.etcd)
    refused(ctl(sb, "etcd", "restart", "etcd1"), "running already")
    wait_until(lambda: len(etcd_leases(sb)[0]) == 3, 30, 0.3)


def test_exec_in_nodes_pods_and_etcd(lab):
    sb = lab
    assert "overlay.1" in ok(ctl(sb, "exec", "n1", "--", "ip", "-br", "link", "show",
                                 "overlay.1"))
    p1 = pod_on(sb, "n1")
    assert p1.ip in ok(ctl(sb, "exec", p1.name, "--", "ip", "-4", "-br", "addr"))
    assert "/overlay/subnets/" in ok(ctl(sb, "exec", "etcd1", "--", "etcdctl", "get",
                                         "--prefix", "/overlay/", "--keys-only"))
    assert ctl(sb, "exec", "n2", "--", "sh", "-c", "exit 3").returncode == 3
    refused(ctl(sb, "exec", "nope", "--", "true"), "nope", "n1", "underlay")
    refused(ctl(sb, "exec", "n1"), "no command")


def test_iperf_between_pods(lab):
    sb = lab
    a, b = pod_on(sb, "n1"), pod_on(sb, "n2")
    out = ok(ctl(sb, "iperf", a.name, b.name, "--seconds", "1"))
    m = re.search(rf"{a.name} -> {b.name} \({b.ip}\): ([0-9.]+) [GMk]bit/s over 1s", out)
    assert m and float(m.group(1)) > 0, out
    # The server was ours and is gone.
    assert sb.run_in(b.netns, "ip", "netns", "identify").returncode == 0
    pids = subprocess.run(["ip", "netns", "pids", b.netns], capture_output=True,
                          text=True, check=False).stdout.split()
    assert pids == [], pids


def test_errors_are_sentences(lab):
    sb = lab
    refused(ctl(sb, "node", "kill", "nope"), "no node 'nope'")
    refused(ctl(sb, "node", "stop"), "needs the node's name")
    p = subprocess.run([tool("overlayctl"), "sandbox", "node", "--name", "zz9", "kill", "n1"],
                       capture_output=True, text=True, timeout=60, check=False)
    refused(p, "zz9", "not up")
    refused(ctl(sb, "chaos", "--seconds", "5", "--spare", "n7", "--report",
                str(sb.dir / "never")), "cannot spare n7")
    misused(ctl(sb, "chaos", "--overlap", "0"), "--overlap", "at least 1")
    misused(ctl(sb, "chaos", "--seconds", "90000"), "--seconds", "at most a day")
    misused(ctl(sb, "watch", "--interval", "0"), "--interval", "positive")
    misused(ctl(sb, "iperf", "a", "b", "--seconds", "601"), "--seconds", "at most 600")


# --- chaos ---------------------------------------------------------------------------


def chaos(sb: Sandbox, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([tool("overlayctl"), "sandbox", "chaos", "--name", sb.name, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def until_line(p: subprocess.Popen[str], needle: str, seen: list[str]) -> None:
    assert p.stdout is not None
    for line in p.stdout:  # bounded: the run itself is
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} never printed:\n{''.join(seen)}")


def in_effect(sb: Sandbox, node: str, state: str, **faults: list[str]) -> bool:
    sb.state = State.load(sb.state_path)
    return process_state(sb.node(node).pid) == state and all(
        getattr(sb.st, k) == v for k, v in faults.items())


def test_chaos_60s_fixed_seed_no_violation(lab, tmp_path):
    sb = lab
    p = chaos(sb, "--seconds", "60", "--seed", "16", "--overlap", "2", "--heal-bound", "60",
              "--report", str(tmp_path / "r"))
    out, _ = p.communicate(timeout=400)
    sb.state = State.load(sb.state_path)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert p.returncode == 0 and doc["result"] == "pass", out
    assert doc["violations"] == [] and not doc["interrupted"] and not doc["stopped"]
    assert len(doc["faults"]) >= 6 and len(doc["kinds_seen"]) >= 8, doc["kinds_seen"]
    assert all(f["heal_s"] is not None for f in doc["faults"])
    md = (tmp_path / "r.md").read_text()
    assert "PASS" in md.splitlines()[0] and "## Violations" in md
    assert "PASS:" in out and "0 violations" in out
    # Independent of the runner: every fault undone, every pod reaches every pod.
    assert (sb.st.partitioned, sb.st.loss_percent, sb.st.bandwidth, sb.st.powered_off) == \
        ([], 0, {}, [])
    assert all(process_state(h.pid) == "running" for h in (*sb.st.nodes, *sb.st.etcd))
    _, reachable, total = sb.check()
    assert reachable == total == 30
    h = doc["heal"]
    print(f"\nSCENARIO | chaos 60 s | seed 16, overlap 2: {len(doc['faults'])} faults of "
          f"{len(doc['kinds_seen'])} kinds in {len(doc['rounds'])} rounds | 0 violations; heal "
          f"median {h['median_s']} s, worst {h['max_s']} s (bound 60 s)")


def test_chaos_interrupted_undoes_every_fault(lab, tmp_path):
    from overlay.sandbox.invariants import violations
    from overlay.sandbox.observe import observe

    sb = lab
    # Seed 52 starts with agent-stop n2 (4.5 s) and, 0.1 s later, a partition of n3 (9.8 s).
    p = chaos(sb, "--seconds", "60", "--seed", "52", "--overlap", "2",
              "--report", str(tmp_path / "i"))
    seen: list[str] = []
    try:
        until_line(p, "round 1: partition n3", seen)
        wait_until(lambda: in_effect(sb, "n2", "stopped", partitioned=["n3"]), 10, 0.05)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, "".join(seen) + out
    doc = json.loads((tmp_path / "i.json").read_text())
    assert doc["interrupted"] and doc["result"] == "interrupted"
    sb.state = State.load(sb.state_path)
    assert sb.st.partitioned == [] and process_state(sb.node("n2").pid) == "running"
    assert "drop" not in sb.run_in(sb.st.underlay, "nft", "list", "ruleset").stdout.decode()
    wait_until(lambda: violations(observe(sb)) == [], 60, 0.5)


def test_down_after_a_chaos_run_killed_outright(lab, tmp_path):
    sb = lab
    # Seed 5 starts with agent-stop n2 and, 0.8 s later, a reboot of n1 (powered off).
    p = chaos(sb, "--seconds", "60", "--seed", "5", "--overlap", "2",
              "--report", str(tmp_path / "k"))
    seen: list[str] = []
    try:
        until_line(p, "round 1: node-reboot n1", seen)
        wait_until(lambda: in_effect(sb, "n2", "stopped", powered_off=["n1"]), 10, 0.05)
    finally:
        p.kill()  # no finally of its own runs: the faults stay
        p.communicate(timeout=60)
    pids = [h.pid for h in (*sb.st.nodes, *sb.st.etcd) if h.pid]
    out = subprocess.run([tool("overlayctl"), "sandbox", "down", "--name", sb.name],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "removed" in out.stdout, out
    assert not [n for n in list_netns() if n.startswith(sb.prefix)]
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not sb.dir.exists()


def test_chaos_on_a_dual_stack_cluster_checks_both_families(tmp_path):
    """The invariants per family: IPv6 leases (a dual-stack record's claim key), routes,
    neighbours, addresses and pings too, not the IPv4 half only."""
    from overlay.sandbox.invariants import violations
    from overlay.sandbox.observe import observe

    with sandbox_up(3, 1, etcd_members=3, ip_family="dual",
                    agent_args=["--lease-ttl", "6"]) as sb:
        obs = observe(sb)
        assert obs.probed == 3 * 2 * 2 and violations(obs, (4, 6)) == []
        assert {lease.family for lease in obs.leases} == {4, 6} and len(obs.leases) == 6
        assert all(len([r for r in n.routes if ":" in r]) == 2 for n in obs.nodes)
        p = chaos(sb, "--seconds", "30", "--seed", "16", "--overlap", "2",
                  "--report", str(tmp_path / "d"))
        out, _ = p.communicate(timeout=300)
        doc = json.loads((tmp_path / "d.json").read_text())
        assert p.returncode == 0 and doc["violations"] == [], out
        assert len(doc["faults"]) >= 4
        restarted = [h.pid for h in State.load(sb.state_path).nodes]
    # The chaos run restarted agents under PIDs this test's Sandbox object never saw:
    # `down` reads them from the state file and stops them all.
    assert not any(pid_alive(pid) for pid in restarted), restarted


def test_down_leaves_alone_a_process_that_took_a_recorded_pid():
    """The agent died long ago and its PID went to someone else's process (here one in
    the root namespace): `sandbox down` must not signal it."""
    from overlay.sandbox.sandbox import kill_and_wait

    with sandbox_up(1, 0) as sb:
        h = sb.st.nodes[0]
        kill_and_wait(h.pid, signal.SIGKILL, 10)
        stranger = subprocess.Popen(["sleep", "120"])
        try:
            h.pid = stranger.pid
            sb.save()
            sb.down()
            assert stranger.poll() is None, "down killed a process that was not its own"
            assert not any(n.startswith(sb.prefix) for n in list_netns())
        finally:
            stranger.kill()
            stranger.wait()
