#!/usr/bin/env python3
"""Convergence: a node joining a 3- and a 10-node cluster, and a node crashing.

Join: a cluster of N-1 nodes with one pod each; `overlayd` starts on a new
node (t0 = its process start, from /proc). Measured, from the agents' own
JSON log timestamps and ping's per-reply timestamps (no polling of the
agents while they work):

  peers programmed   the last existing node has added the route to the new node
  ready              the new node's agent is ready (its first reconcile done)
  pod added          a pod on it was attached through the CNI plugin (as a
                     runtime does once the node is ready)
  all reached        every existing pod has had a ping reply from that pod

The joined node is then removed (agent stopped, lease key deleted) so every
repetition joins a cluster of the same size.

Crash: when the agents' status reports peer states (the membership protocol),
a node's agent is killed and its underlay link taken down (the host is gone);
measured is the time until every other agent reports it PEER_STATE_DEAD. The
node is then restored. Without peer states in the status, this is recorded as
not available in this build.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    CpuLoad,
    log,
    machine,
    ratio,
    remove_node,
    require_root,
    sandbox,
    sh,
    summary,
    write_result,
)

from overlay.sandbox.sandbox import Pod, Sandbox, kill_and_wait, pid_alive
from overlay.v1 import overlay_pb2 as pb

AGENT_ARGS = ["--log-format", "json"]


def log_events(path: Path) -> list[tuple[float, str]]:
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            doc = json.loads(line)
            t = datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        except (ValueError, KeyError, TypeError):
            continue
        out.append((t.timestamp(), str(doc.get("msg", ""))))
    return out


def first_event(path: Path, pattern: str, after: float = 0.0) -> float | None:
    rx = re.compile(pattern)
    for t, msg in log_events(path):
        if t >= after - 0.001 and rx.search(msg):
            return t
    return None


def wait_event(path: Path, pattern: str, pid: int, timeout: float, after: float = 0.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = first_event(path, pattern, after)
        if t is not None:
            return t
        if not pid_alive(pid):
            raise RuntimeError(f"overlayd exited before logging {pattern!r}")
        time.sleep(0.02)
    raise RuntimeError(f"no {pattern!r} in {path} after {timeout:.0f}s")


def spawn_wall_time(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    started_boot = start_ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started_boot)


def first_replies(sb: Sandbox, pods: list[Pod], dst: str, timeout: float) -> dict[str, float]:
    """For each pod, the Unix time of its first ping reply from `dst` (ping -D)."""
    got: dict[str, float] = {}
    rx = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")

    def run(pod: Pod) -> None:
        p = subprocess.Popen([*sb.exec_prefix(pod.netns), "ping", "-n", "-D", "-i", "0.02",
                              "-w", str(int(timeout)), dst],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert p.stdout is not None
            for line in p.stdout:
                m = rx.match(line)
                if m:
                    got[pod.name] = float(m.group(1))
                    break
        finally:
            kill_and_wait(p, signal.SIGTERM, 5)
            if p.stdout is not None:
                p.stdout.close()

    threads = [threading.Thread(target=run, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return got


def join(sb: Sandbox, name: str, timeout: float = 60) -> dict[str, Any]:
    existing = list(sb.st.nodes)
    old_pods = list(sb.st.pods)
    cpu = CpuLoad()
    h = sb.add_node(name, wait=False)
    t0 = spawn_wall_time(h.pid)
    t_ready = wait_event(Path(h.log), rf"node {name} ready", h.pid, timeout)
    pod = sb.add_pod(name)
    t_pod = time.time()
    replies = first_replies(sb, old_pods, pod.ip, timeout=10)
    missing = [p.name for p in old_pods if p.name not in replies]
    programmed = {}
    for e in existing:
        t = first_event(Path(e.log), rf"add route \S+ via \S+ onlink \(peer {name} is a member\)",
                        after=t0)
        programmed[e.name] = None if t is None else t - t0
    out = {
        "nodes_after_join": len(existing) + 1,
        "ready_s": t_ready - t0,
        "pod_added_s": t_pod - t0,
        "all_reached_s": (max(replies.values()) - t0) if replies and not missing else None,
        "reached_s": {k: v - t0 for k, v in sorted(replies.items())},
        "unreached": missing,
        "peers_programmed_s": programmed,
        "last_peer_programmed_s": (max(v for v in programmed.values() if v is not None)
                                   if all(v is not None for v in programmed.values()) else None),
        "machine_busy": cpu.busy(),
    }
    return out


def has_peer_states(sb: Sandbox) -> bool:
    for h in sb.st.nodes:
        st = sb.status(h.name)
        if any(p.state != pb.PEER_STATE_UNSPECIFIED for p in st.peers):
            return True
    return False


def peer_state(sb: Sandbox, observer: str, peer: str) -> int | None:
    try:
        st = sb.status(observer, timeout=1.0)
    except Exception:
        return None
    for p in st.peers:
        if p.record.name == peer:
            return int(p.state)
    return None


def crash(sb: Sandbox, victim: str, timeout: float = 60) -> dict[str, Any]:
    others = [h.name for h in sb.st.nodes if h.name != victim]
    h = sb.node(victim)
    cpu = CpuLoad()
    t0 = time.time()
    os.kill(h.pid, signal.SIGKILL)
    sh("ip", "-n", h.netns, "link", "set", "eth0", "down")
    dead_at: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(dead_at) < len(others) and time.monotonic() < deadline:
        for o in others:
            if o not in dead_at and peer_state(sb, o, victim) == pb.PEER_STATE_DEAD:
                dead_at[o] = time.time() - t0
        time.sleep(0.05)
    out = {"victim": victim, "nodes": len(others) + 1, "observers": len(others),
           "all_dead_s": max(dead_at.values()) if len(dead_at) == len(others) else None,
           "first_dead_s": min(dead_at.values()) if dead_at else None,
           "dead_s": dict(sorted(dead_at.items())), "machine_busy": cpu.busy()}
    # Restore: the host comes back, the agent restarts, everyone sees it alive again.
    sh("ip", "-n", h.netns, "link", "set", "eth0", "up")
    sb.stop_agent(victim)
    sb.start_agent(victim)
    sb.wait_ready(victim, 60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(peer_state(sb, o, victim) == pb.PEER_STATE_ALIVE for o in others):
            break
        time.sleep(0.2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3,10", help="cluster sizes after the join")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    require_root()
    t_start = time.monotonic()
    sizes = [int(x) for x in args.sizes.split(",")]
    joins: dict[str, Any] = {}
    crashes: dict[str, Any] = {}
    membership = False
    for size in sizes:
        with sandbox("bcv", nodes=size - 1, pods_per_node=1, agent_args=AGENT_ARGS) as sb:
            runs = []
            for rep in range(args.reps):
                name = f"n{size + rep}"
                r = join(sb, name)
                runs.append(r)
                log(f"  join of {name} into {size - 1} nodes: peers programmed "
                    f"{_fmt(r['last_peer_programmed_s'])}, ready {_fmt(r['ready_s'])}, "
                    f"pod added {_fmt(r['pod_added_s'])}, all {size - 1} pods reached "
                    f"{_fmt(r['all_reached_s'])}")
                remove_node(sb, name)
            joins[str(size)] = {
                "runs": runs,
                "all_reached_s": summary([r["all_reached_s"] for r in runs
                                          if r["all_reached_s"] is not None]),
                "ready_s": summary([r["ready_s"] for r in runs]),
                "last_peer_programmed_s": summary([r["last_peer_programmed_s"] for r in runs
                                                   if r["last_peer_programmed_s"] is not None]),
                "failures": sum(r["all_reached_s"] is None for r in runs),
            }
            membership = has_peer_states(sb)
            if membership:
                # The joiners were removed: crash at the size this run is named after.
                while len(sb.st.nodes) < size:
                    sb.add_node(f"n{size + args.reps + len(sb.st.nodes)}", wait=True)
                cruns = []
                for rep in range(args.reps):
                    victim = sb.st.nodes[1 + rep % (len(sb.st.nodes) - 1)].name
                    c = crash(sb, victim)
                    cruns.append(c)
                    log(f"  crash of {victim} at {c['nodes']} nodes: all peers say dead after "
                        f"{_fmt(c['all_dead_s'])}")
                crashes[str(size)] = {
                    "runs": cruns,
                    "all_dead_s": summary([c["all_dead_s"] for c in cruns
                                           if c["all_dead_s"] is not None]),
                    "failures": sum(c["all_dead_s"] is None for c in cruns),
                }
    doc: dict[str, Any] = {
        "benchmark": "convergence",
        "machine": machine(),
        "join": joins,
        "crash": crashes if membership else None,
        "crash_note": None if membership else (
            "not available in this build: the agents' status reports no peer states "
            "(membership protocol not merged); a crashed node stays programmed until its etcd "
            "lease expires (--lease-ttl, 60 s by default)"),
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    if len(sizes) >= 2:
        a, b = str(sizes[0]), str(sizes[-1])
        doc["ratios"] = {
            f"all_reached_{b}_vs_{a}_nodes": ratio(joins[b]["all_reached_s"].get("median", 0),
                                                   joins[a]["all_reached_s"].get("median", 0)),
        }
        if membership:
            doc["ratios"][f"crash_detect_{b}_vs_{a}_nodes"] = ratio(
                crashes[b]["all_dead_s"].get("median", 0), crashes[a]["all_dead_s"].get("median",
                                                                                        0))
    write_result("convergence", doc)
    print(json.dumps({s: joins[s]["all_reached_s"].get("median") for s in joins}))


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}s"


if __name__ == "__main__":
    main()
