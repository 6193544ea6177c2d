#!/usr/bin/env python3
"""Membership at scale on this machine: calm at 10 to 50 nodes, and recovery from overload.

For each size (--sizes, default 10,20,30,50), one sandbox of that many nodes with
one pod each, measured one after the other in the same run:

  up          `sandbox up` wall time, and how long after the agents started every
              agent was ready with every peer programmed (the sandbox's figures)
  settled     seconds after `up` until every agent sees every peer alive
  idle        CPU each agent used over --window s of idle (/proc/<pid>/stat, the
              nft children it waits for included), as a fraction of one core:
              mean, median, max; the whole machine's busy share beside it
              (other engineers' work included: the figures are per process)
  views       peer views not alive at the end of the window (0 when calm)
  messages    membership messages each agent sent per second (its metrics)
  threads     where the agents' CPU went: the asyncio thread (our Python) and
              gRPC's own threads, summed over all agents

At the largest size, --overload: recovery from overload, twice:

  hogs        --hogs busy loops per core at nice --hog-nice (ahead of the agents)
              for --hog-seconds (bounded in time, and killed by PID): the agents
              starve; then the time until every view is alive again
  stops       every agent SIGSTOPped in turn for --stop-seconds, two at a time:
              then the time from the last SIGCONT until every view is alive
  freeze      every agent SIGSTOPped at once for --freeze-seconds: all their
              timers are late together; then the time until every view is alive

Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import CpuLoad, http_get, log, machine, require_root, sandbox, summary, write_result

from overlay.agent.localclient import status_json
from overlay.sandbox.sandbox import Sandbox

POOL = ThreadPoolExecutor(8)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = True) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread kind of one process: 'asyncio' (the main thread) or the
    thread's name (gRPC names its own)."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        kind = "asyncio (main thread)" if tid == str(pid) else (
            "grpc aio poller" if name == "overlayd" else name)
        out[kind] = out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def views(sb: Sandbox) -> dict[str, int]:
    """Peer views by state over every agent ('no answer' for an agent that did not)."""
    def one(n: str) -> list[str] | None:
        try:
            return [p["state"] for p in status_json(sb.status(n, 3.0))["peers"]]
        except Exception:
            return None
    counts: dict[str, int] = {}
    for states in POOL.map(one, [h.name for h in sb.st.nodes]):
        if states is None:
            counts["no answer"] = counts.get("no answer", 0) + 1
            continue
        for s in states:
            counts[s] = counts.get(s, 0) + 1
    return counts


def all_alive(counts: dict[str, int], n: int) -> bool:
    return counts.get("alive", 0) == n * (n - 1) and len(counts) == 1


def wait_alive(sb: Sandbox, timeout: float) -> tuple[float | None, dict[str, int]]:
    """Seconds until every view is alive (None: not within timeout), and the worst
    moment seen meanwhile (most views not alive)."""
    n = len(sb.st.nodes)
    t0 = time.monotonic()
    worst: dict[str, int] = {}
    while time.monotonic() - t0 < timeout:
        c = views(sb)
        if all_alive(c, n):
            return round(time.monotonic() - t0, 1), worst
        if n * (n - 1) - c.get("alive", 0) > n * (n - 1) - worst.get("alive", n * (n - 1)):
            worst = c
        time.sleep(0.5)
    return None, worst


def messages(sb: Sandbox) -> dict[str, float]:
    """Membership messages sent so far, by type, summed over the agents."""
    pat = re.compile(r'^overlay_gossip_messages_total\{direction="out",type="([\w-]+)"\} (\S+)'
                     r'|^overlay_gossip_messages_total\{type="([\w-]+)",direction="out"\} (\S+)',
                     re.M)

    def one(ns: str) -> dict[str, float]:
        text = http_get(sb, ns, "http://127.0.0.1:9181/metrics")
        return {(m.group(1) or m.group(3)): float(m.group(2) or m.group(4))
                for m in pat.finditer(text)}
    out: dict[str, float] = {}
    for d in POOL.map(one, [h.netns for h in sb.st.nodes]):
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


def calm(sb: Sandbox, up_s: float, window: float, settle: float) -> dict[str, Any]:
    """One size: until settled, then an idle window."""
    n = len(sb.st.nodes)
    settled, _ = wait_alive(sb, 180)
    time.sleep(settle)  # the status polls above are work too: let it pass
    agents = {h.name: h.pid for h in sb.st.nodes}
    etcd = sb.st.etcd[0].pid
    m0 = messages(sb)
    cpu = CpuLoad()
    c0 = {k: cpu_seconds(p) for k, p in agents.items()}
    t0s = {k: threads(p) for k, p in agents.items()}
    e0, w0 = cpu_seconds(etcd), time.monotonic()
    time.sleep(window)
    dt = time.monotonic() - w0
    c1 = {k: cpu_seconds(p) for k, p in agents.items()}
    t1s = {k: threads(p) for k, p in agents.items()}
    e1, busy = cpu_seconds(etcd), cpu.busy()
    m1 = messages(sb)
    end_views = views(sb)
    per_agent = [(c1[k] - c0[k]) / dt for k in agents]
    kinds: dict[str, float] = {}
    for k in agents:
        for kind, v in t1s[k].items():
            kinds[kind] = kinds.get(kind, 0.0) + (v - t0s[k].get(kind, 0.0)) / dt / n
    s = summary(per_agent)
    doc = {
        "nodes": n,
        "up_s": round(up_s, 1),
        "settled_after_up_s": settled,
        "window_s": round(dt, 1),
        "agent_cpu": {k: round(v, 5) if isinstance(v, float) else v for k, v in s.items()
                      if k != "values"},
        "agent_cpu_values": [round(v, 5) for v in per_agent],
        "agent_cpu_by_thread": {k: round(v, 5) for k, v in sorted(kinds.items(),
                                                                   key=lambda kv: -kv[1])},
        "etcd_cpu": round((e1 - e0) / dt, 4),
        "machine_busy": busy,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "views_at_end": end_views,
        "non_alive_views_at_end": n * (n - 1) - end_views.get("alive", 0),
        "messages_per_agent_s": {k: round((m1.get(k, 0) - m0.get(k, 0)) / dt / n, 3)
                                 for k in sorted(m1)},
        "sandbox_timings": sb.timings,
    }
    return doc


def hogs(sb: Sandbox, seconds: float, per_core: int, nice: int) -> dict[str, Any]:
    """Busy loops, `per_core` per core, for `seconds`: then how long until calm again."""
    count = per_core * (os.cpu_count() or 1)
    code = (f"import os, time\nos.nice({nice})\nend = time.monotonic() + {seconds}\n"
            "while time.monotonic() < end: pass")
    ns = sb.st.nodes[0].netns
    procs = [subprocess.Popen([*sb.exec_prefix(ns), sys.executable, "-c", code])
             for _ in range(count)]
    t_start = time.monotonic()
    worst = views_during(sb, seconds)
    for p in procs:
        try:
            p.wait(timeout=max(1.0, seconds - (time.monotonic() - t_start) + 5))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    recovered, after = wait_alive(sb, 120)
    return {"hogs": count, "nice": nice, "seconds": seconds, "worst_during": worst,
            "worst_after": after, "recovered_after_s": recovered}


def views_during(sb: Sandbox, seconds: float) -> dict[str, int]:
    t0 = time.monotonic()
    n = len(sb.st.nodes)
    worst: dict[str, int] = {}
    while time.monotonic() - t0 < seconds:
        c = views(sb)
        if n * (n - 1) - c.get("alive", 0) > n * (n - 1) - worst.get("alive", n * (n - 1)):
            worst = c
        time.sleep(1.0)
    return worst


def stops(sb: Sandbox, stop: float) -> dict[str, Any]:
    """SIGSTOP every agent in turn, two at a time, for `stop` s each (SIGCONT always)."""
    pids = [h.pid for h in sb.st.nodes]
    stopped: list[tuple[float, int]] = []
    t0 = time.monotonic()
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            stopped.append((time.monotonic() + stop, pid))
            time.sleep(stop / 2)
            while stopped and stopped[0][0] <= time.monotonic():
                os.kill(stopped.pop(0)[1], signal.SIGCONT)
        while stopped:
            time.sleep(max(0.0, stopped[0][0] - time.monotonic()))
            os.kill(stopped.pop(0)[1], signal.SIGCONT)
    finally:
        for _, pid in stopped:
            os.kill(pid, signal.SIGCONT)
    took = time.monotonic() - t0
    recovered, after = wait_alive(sb, 120)
    return {"agents": len(pids), "stop_s": stop, "disturbance_s": round(took, 1),
            "worst_after": after, "recovered_after_s": recovered}


def freeze(sb: Sandbox, seconds: float) -> dict[str, Any]:
    """Every agent SIGSTOPped at once for `seconds` (SIGCONT always)."""
    pids = [h.pid for h in sb.st.nodes]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    recovered, after = wait_alive(sb, 120)
    return {"agents": len(pids), "seconds": seconds, "worst_after": after,
            "recovered_after_s": recovered}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,20,30,50")
    ap.add_argument("--window", type=float, default=30.0, help="idle window, seconds")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before the window")
    ap.add_argument("--overload", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--hog-seconds", type=float, default=20.0)
    ap.add_argument("--hogs", type=int, default=8, help="busy loops per core")
    ap.add_argument("--hog-nice", type=int, default=-5)
    ap.add_argument("--freeze-seconds", type=float, default=5.0)
    ap.add_argument("--stop-seconds", type=float, default=2.0)
    args = ap.parse_args()
    require_root()
    t_start = time.monotonic()
    sizes = [int(x) for x in args.sizes.split(",")]
    runs: dict[str, Any] = {}
    overload: dict[str, Any] = {}
    for n in sizes:
        t0 = time.monotonic()
        with sandbox("bsc", nodes=n, pods_per_node=1) as sb:
            doc = calm(sb, time.monotonic() - t0, args.window, args.settle)
            runs[str(n)] = doc
            a = doc["agent_cpu"]
            log(f"  {n} nodes: up {doc['up_s']} s, all alive {doc['settled_after_up_s']} s "
                f"later; idle agent CPU mean {a['mean']:.2%} (median {a['median']:.2%}, max "
                f"{a['max']:.2%}) of a core, machine {doc['machine_busy']:.0%} busy; "
                f"{doc['non_alive_views_at_end']} views not alive")
            if args.overload and n == max(sizes):
                log(f"  overload at {n} nodes: {args.hogs * (os.cpu_count() or 1)} busy loops "
                    f"for {args.hog_seconds:.0f} s ...")
                overload["hogs"] = hogs(sb, args.hog_seconds, args.hogs, args.hog_nice)
                log(f"    every view alive again {overload['hogs']['recovered_after_s']} s "
                    "after the hogs ended")
                log(f"  overload at {n} nodes: every agent SIGSTOPped in turn for "
                    f"{args.stop_seconds} s ...")
                overload["stops"] = stops(sb, args.stop_seconds)
                log(f"    every view alive again {overload['stops']['recovered_after_s']} s "
                    "after the last SIGCONT")
                log(f"  overload at {n} nodes: every agent SIGSTOPped at once for "
                    f"{args.freeze_seconds} s ...")
                overload["freeze"] = freeze(sb, args.freeze_seconds)
                log(f"    every view alive again {overload['freeze']['recovered_after_s']} s "
                    "after the SIGCONT")
                overload["nodes"] = n
    lo, hi = runs[str(sizes[0])], runs[str(sizes[-1])]
    doc = {
        "benchmark": "scale",
        "machine": machine(),
        "runs": runs,
        "overload": overload or None,
        "target_agent_cpu": 0.01,
        "ratios": {f"agent_cpu_{sizes[-1]}_vs_{sizes[0]}_nodes": round(
            hi["agent_cpu"]["mean"] / lo["agent_cpu"]["mean"], 3) if lo["agent_cpu"]["mean"]
            else None},
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    write_result("scale", doc)
    print(" ".join(f"{n}:{runs[n]['agent_cpu']['mean']:.4f}" for n in runs))


if __name__ == "__main__":
    main()
