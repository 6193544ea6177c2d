#!/usr/bin/env python3
"""Peer programming: from an empty node to every peer in the kernel, for 100, 1000, 5000 peers.

Reference: `ip -batch` (routes, neighbours) plus `bridge -batch` (FDB) applying
the same 3 x N entries, in the same order, to an identical fresh namespace.
Measured against it, in the same run, interleaved:

  kernel apply   NetlinkKernel.apply of the same ops (what the target is about)
  first pass     the agent's Reconciler from nothing: devices, diff, every entry,
                 one log line per change, as overlayd runs it
  no-op pass     a Reconciler pass with nothing to change (read back, diff)
  old loop       the same ops through a plain pyroute2 request/ack loop (before)
  overlayd       end to end: a new node's overlayd started with N leases in etcd,
                 until it logs "ready" (first reconcile done), with its breakdown;
                 then its idle CPU and RSS, and its own no-op pass time from
                 /metrics, at the production reconcile interval (10 s)

Target: kernel apply <= 2 x ip -batch at 5000 peers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    CpuLoad,
    http_get,
    log,
    machine,
    proc_cpu_seconds,
    proc_rss_bytes,
    python_in,
    ratio,
    remove_node,
    require_root,
    sandbox,
    sh,
    summary,
    write_result,
)
from fakepeers import CIDR, fake_records

from overlay.dataplane.desired import Entries, Fdb, Neigh, Op, desired, plan
from overlay.devnames import vxlan_name
from overlay.sandbox.sandbox import Sandbox, pid_alive

DEV = vxlan_name(1)


def batch_lines(ops: list[Op], dev: str = DEV) -> tuple[list[str], list[str]]:
    """The ops as `ip -batch` lines (neigh, route) and `bridge -batch` lines (fdb)."""
    ip_lines, br_lines = [], []
    for op in ops:
        e = op.entry
        if isinstance(e, Fdb):
            verb = "append" if op.action == "add" else "del"
            br_lines.append(f"fdb {verb} {e.mac} dev {dev} dst {e.dst} self permanent")
        elif isinstance(e, Neigh):
            if op.action == "add":
                ip_lines.append(f"neigh replace {e.ip} lladdr {e.mac} dev {dev} nud permanent")
            else:
                ip_lines.append(f"neigh del {e.ip} dev {dev}")
        elif op.action == "add":
            ip_lines.append(f"route replace {e.dst} via {e.via} dev {dev} onlink proto 159")
        else:
            ip_lines.append(f"route del {e.dst} dev {dev} proto 159")
    return ip_lines, br_lines


def fresh_ns(sb: Sandbox, tag: str, with_vxlan: bool = True) -> str:
    """A namespace with eth0 (a veth whose peer stays inside) and, optionally, overlay.1."""
    ns = sb.ns(tag)
    sh("ip", "netns", "del", ns, check=False)
    sh("ip", "netns", "add", ns)
    for cmd in ("link set lo up", "link add eth0 type veth peer name eth0p",
                "addr add 172.30.0.1/16 dev eth0", "link set eth0 up", "link set eth0p up"):
        sh("ip", "-n", ns, *cmd.split())
    if with_vxlan:
        for cmd in (f"link add {DEV} type vxlan id 1 local 172.30.0.1 dev eth0 dstport 8472 "
                    "nolearning", f"addr add 10.127.255.0/32 dev {DEV}", f"link set {DEV} up"):
            sh("ip", "-n", ns, *cmd.split())
    return ns


def drop_ns(ns: str) -> None:
    sh("ip", "netns", "del", ns, check=False)


def ip_batch(sb: Sandbox, n: int, workdir: Path) -> dict[str, Any]:
    ops = plan(desired(fake_records(n), "bench-node"), Entries())
    ip_lines, br_lines = batch_lines(ops)
    ipf, brf = workdir / f"ip-{n}.batch", workdir / f"bridge-{n}.batch"
    ipf.write_text("\n".join(ip_lines) + "\n")
    brf.write_text("\n".join(br_lines) + "\n")
    ns = fresh_ns(sb, "kref")
    try:
        # fdb first, as our plan orders them; each tool joins the namespace itself (-n).
        t0 = time.perf_counter()
        sh("bridge", "-n", ns, "-batch", str(brf))
        t1 = time.perf_counter()
        sh("ip", "-n", ns, "-batch", str(ipf))
        t2 = time.perf_counter()
        routes = len(sh("ip", "-n", ns, "route", "show", "dev", DEV, "proto", "159"
                        ).stdout.splitlines())
        return {"entries": len(ops), "seconds": t2 - t0, "bridge_s": t1 - t0, "ip_s": t2 - t1,
                "routes_in_kernel": routes}
    finally:
        drop_ns(ns)


def ours(sb: Sandbox, mode: str, n: int, *extra: str) -> dict[str, Any]:
    ns = fresh_ns(sb, "kours", with_vxlan=(mode != "reconcile"))
    try:
        out: dict[str, Any] = python_in(sb, ns, "peer_worker.py", mode, str(n), *extra)
        return out
    finally:
        drop_ns(ns)


# --- the agent, end to end ------------------------------------------------------------


def _ts(line: str) -> tuple[float, str] | None:
    try:
        doc = json.loads(line)
        t = datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return t.timestamp(), str(doc.get("msg", ""))
    except (ValueError, KeyError, TypeError):
        return None


def spawn_wall_time(pid: int) -> float:
    """When `pid` started, as a Unix time (10 ms resolution, from /proc)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    started_boot = start_ticks / os.sysconf("SC_CLK_TCK")
    import time as _t

    return _t.time() - (_t.clock_gettime(_t.CLOCK_BOOTTIME) - started_boot)


def wait_log(path: Path, pattern: str, pid: int, timeout: float) -> dict[str, float]:
    """Timestamps of the agent's milestones, once `pattern` is logged."""
    marks: dict[str, float] = {}
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            got = _ts(line)
            if got is None:
                continue
            t, msg = got
            if msg.startswith("network config:"):
                marks.setdefault("config", t)
            elif re.match(r"subnet \S+: (leased|this node's lease)", msg):
                marks.setdefault("leased", t)
            elif rx.search(msg):
                marks["ready"] = t
                return marks
        if not pid_alive(pid):
            raise RuntimeError(f"overlayd exited before {pattern!r}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"no {pattern!r} in {path} after {timeout:.0f}s")


def metrics(sb: Sandbox, ns: str) -> dict[str, float]:
    out = {}
    for line in http_get(sb, ns, "http://127.0.0.1:9181/metrics").splitlines():
        if line.startswith("overlay_reconcile_duration_seconds_sum "):
            out["sum"] = float(line.split()[1])
        elif line.startswith("overlay_reconcile_duration_seconds_count "):
            out["count"] = float(line.split()[1])
    return out


def kernel_counts(ns: str) -> dict[str, int]:
    routes = sh("ip", "-n", ns, "route", "show", "dev", DEV, "proto", "159").stdout
    neighs = sh("ip", "-n", ns, "neigh", "show", "dev", DEV, "nud", "permanent").stdout
    fdbs = sh("bridge", "-n", ns, "fdb", "show", "dev", DEV).stdout
    return {"routes": len(routes.splitlines()), "neighs": len(neighs.splitlines()),
            "fdbs": sum(1 for line in fdbs.splitlines() if " dst " in line)}


def agent_run(sb: Sandbox, name: str, n: int, idle_seconds: float) -> dict[str, Any]:
    extra = ["--log-format", "json"]  # the production reconcile interval
    h = sb.add_node(name, wait=False, extra_args=extra)
    t_spawn = spawn_wall_time(h.pid)
    marks = wait_log(Path(h.log), rf"node {name} ready", h.pid, timeout=240)
    counts = kernel_counts(h.netns)
    time.sleep(3)  # let the first periodic passes and the watch settle
    m0, c0, w0 = metrics(sb, h.netns), proc_cpu_seconds(h.pid), time.monotonic()
    time.sleep(idle_seconds)
    m1, c1, w1 = metrics(sb, h.netns), proc_cpu_seconds(h.pid), time.monotonic()
    rss = proc_rss_bytes(h.pid)
    passes = m1.get("count", 0) - m0.get("count", 0)
    out = {
        "peers": n,
        "ready_s": marks["ready"] - t_spawn,
        "start_to_config_s": marks.get("config", t_spawn) - t_spawn,
        "config_to_lease_s": marks.get("leased", marks["ready"]) - marks.get("config", t_spawn),
        "lease_to_ready_s": marks["ready"] - marks.get("leased", marks["ready"]),
        "kernel": counts,
        "all_programmed": counts == {"routes": n, "neighs": n, "fdbs": n},
        "idle_cpu_fraction": round((c1 - c0) / (w1 - w0), 4),
        "idle_seconds": round(w1 - w0, 1),
        "rss_bytes": rss,
        "noop_pass_s_in_agent": ((m1.get("sum", 0) - m0.get("sum", 0)) / passes
                                 if passes else None),
        "passes_in_window": passes,
    }
    # The local status RPC, as `overlayctl status` calls it (stalls the agent while it runs).
    t = time.perf_counter()
    try:
        sb.status(name, timeout=120)
        out["status_rpc_s"] = time.perf_counter() - t
    except Exception as exc:
        out["status_rpc_s"] = None
        out["status_rpc_error"] = str(exc).splitlines()[0][:200]
    remove_node(sb, name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,5000", help="peer counts, ascending")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each kernel-level run")
    ap.add_argument("--idle-seconds", type=float, default=15, help="idle window per agent run")
    args = ap.parse_args()
    require_root()
    sizes = sorted(int(x) for x in args.sizes.split(","))
    t_start = time.monotonic()
    results: dict[str, Any] = {"sizes": sizes, "kernel": {}, "agent": {}}
    with sandbox("bpp", nodes=0, pods_per_node=0, cidr=CIDR) as sb:
        workdir = sb.dir / "batches"
        workdir.mkdir(parents=True, exist_ok=True)
        for n in sizes:
            runs: dict[str, list[Any]] = {"ip_batch": [], "apply": [], "reconcile": []}
            load = []
            for rep in range(args.reps):
                cpu = CpuLoad()
                first, second = ("ip_batch", "apply") if rep % 2 == 0 else ("apply", "ip_batch")
                for what in (first, second):
                    if what == "ip_batch":
                        runs[what].append(ip_batch(sb, n, workdir))
                    else:
                        runs[what].append(ours(sb, "apply", n))
                runs["reconcile"].append(ours(sb, "reconcile", n, "3"))
                load.append(cpu.busy())
            loop = ours(sb, "loop", n)
            ref = summary([r["seconds"] for r in runs["ip_batch"]])
            app = summary([r["apply_s"] for r in runs["apply"]])
            first_pass = summary([r["first_pass_s"] for r in runs["reconcile"]])
            noop = summary([x for r in runs["reconcile"] for x in r["noop_pass_s"]])
            obs = summary([r["observe_s"] for r in runs["apply"]])
            ok = all(r["kernel_matches"] and not r["error_count"] for r in runs["apply"]) and all(
                r["first_ok"] and r["sampled_programmed"] for r in runs["reconcile"])
            results["kernel"][str(n)] = {
                "entries": 3 * n,
                "ip_batch_s": ref, "apply_s": app, "observe_s": obs,
                "first_pass_s": first_pass, "noop_pass_s": noop, "old_loop_s": loop["apply_s"],
                "ratio_apply_vs_ip_batch": ratio(app["median"], ref["median"]),
                "ratio_first_pass_vs_ip_batch": ratio(first_pass["median"], ref["median"]),
                "ratio_old_loop_vs_ip_batch": ratio(loop["apply_s"], ref["median"]),
                "ratio_noop_pass_vs_ip_batch": ratio(noop["median"], ref["median"]),
                "all_correct": ok, "machine_busy": load, "runs": runs,
            }
            log(f"  {n:5d} peers: ip -batch {ref['median']:.3f}s, apply {app['median']:.3f}s "
                f"({app['median'] / ref['median']:.2f}x), first pass {first_pass['median']:.3f}s, "
                f"no-op pass {noop['median']:.3f}s, old loop {loop['apply_s']:.2f}s "
                f"({loop['apply_s'] / ref['median']:.1f}x), correct={ok}")
        have = 0
        etcd_ns = sb.st.etcd[0].netns
        for i, n in enumerate(sizes, start=1):
            if n > have:
                put = python_in(sb, etcd_ns, "fakepeers.py", "put", "--count", str(n),
                                "--start", str(have + 1))
                have = n
                log(f"  {put['written']} fake leases written in {put['seconds']:.1f}s")
            cpu = CpuLoad()
            run = agent_run(sb, f"n{i}", n, args.idle_seconds)
            run["machine_busy"] = cpu.busy()
            results["agent"][str(n)] = run
            log(f"  overlayd with {n} peers: ready {run['ready_s']:.2f}s after start "
                f"(config {run['start_to_config_s']:.2f}s, lease {run['config_to_lease_s']:.2f}s,"
                f" list+first reconcile {run['lease_to_ready_s']:.2f}s), idle CPU "
                f"{run['idle_cpu_fraction']:.1%}, RSS {run['rss_bytes'] / 2**20:.0f} MiB, "
                f"all programmed={run['all_programmed']}")
            if not run["all_programmed"]:
                raise RuntimeError(f"overlayd did not program all {n} peers: {run['kernel']}")
    big = str(sizes[-1])
    k = results["kernel"][big]
    a = results["agent"][big]
    results["agent"][big]["ratio_ready_vs_ip_batch"] = ratio(a["ready_s"],
                                                            k["ip_batch_s"]["median"])
    r_apply = k["ratio_apply_vs_ip_batch"]
    results.update({
        "benchmark": "peer_programming",
        "machine": machine(),
        "targets": [
            {"id": "peers.apply", "what": f"programming {big} peers ({3 * int(big)} entries): "
             "NetlinkKernel.apply vs ip -batch + bridge -batch", "ratio": r_apply, "op": "<=",
             "threshold": 2.0, "met": r_apply is not None and r_apply <= 2.0},
        ],
        "info": [
            {"id": "peers.first_pass", "what": f"agent reconcile pass from an empty node, {big} "
             "peers (devices, diff, apply, logs) vs ip -batch",
             "ratio": k["ratio_first_pass_vs_ip_batch"]},
            {"id": "peers.noop_pass", "what": f"reconcile pass with nothing to change, {big} "
             "peers, seconds", "value": k["noop_pass_s"]["median"]},
            {"id": "peers.old_loop", "what": f"plain pyroute2 request/ack loop vs ip -batch, "
             f"{big} peers", "ratio": k["ratio_old_loop_vs_ip_batch"]},
        ],
        "wall_seconds": round(time.monotonic() - t_start, 1),
    })
    write_result("peer_programming", results)
    print(json.dumps({"apply_vs_ip_batch": {n: results["kernel"][str(n)]["ratio_apply_vs_ip_batch"]
                                            for n in sizes}}))


if __name__ == "__main__":
    sys.exit(main())
