#!/usr/bin/env python3
"""Membership at 10 nodes with the default timings: the issue's closing figures.

In one sandbox of --nodes nodes (no pods), measured:

  gossip traffic      per node and second, over --window s of steady state:
                      protobuf payload (the agents' overlay_gossip_bytes_total)
                      and wire bytes (nftables counters on the underlay bridge:
                      TCP port 7946, plus the tunnel probes in VXLAN), against
                      the same node's etcd traffic (TCP 2379) as the reference
  loss                20% random loss on the underlay for --loss-seconds s:
                      peers ever seen "dead" (must be none) and "suspect"
  detection           --crashes times, a host "loses power" (agent SIGKILLed,
                      every frame to or from it dropped on the underlay):
                      time until every other agent has declared it dead,
                      from the agents' own log time stamps (no polling that
                      would load them); median, against the 3 s target
  new-MAC convergence --mac-reps times, a node restarts with a new VTEP MAC
                      while etcd is frozen (SIGSTOP): time from its restart
                      until every peer's kernel has the new neighbour and FDB
                      entries; the reference is the same restart with etcd up,
                      interleaved in the same run

Writes bench/results/membership.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from overlay.agent.localclient import status_json
from overlay.membership.swim import SwimConfig
from overlay.sandbox.sandbox import Sandbox, SandboxError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
POOL = ThreadPoolExecutor(16)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"not within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - t0


def summary(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    return {"n": len(v), "median": round(statistics.median(v), 3), "min": round(v[0], 3),
            "max": round(v[-1], 3), "values": [round(x, 3) for x in values]}


def states(sb: Sandbox, nodes: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    def one(n: str) -> tuple[str, dict[str, dict[str, Any]]]:
        try:
            return n, {p["name"]: p for p in status_json(sb.status(n, 1.0))["peers"]}
        except Exception:
            return n, {}
    return dict(POOL.map(one, nodes))


def all_alive(sb: Sandbox, nodes: list[str]) -> bool:
    return all(set(peers) == set(nodes) - {n} and
               all(p["state"] == "alive" and p["tunnelRttUs"] for p in peers.values())
               for n, peers in states(sb, nodes).items())


def scrape_gossip_bytes(sb: Sandbox, node: str) -> dict[str, float]:
    code = ("import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:9181/metrics',timeout=5).read().decode())")
    out = sb.run_in(sb.node(node).netns, sys.executable, "-I", "-S", "-c", code).stdout.decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^overlay_gossip_bytes_total\{direction="(\w+)"\} (\S+)', out, re.M)}


COUNTERS = {"gossip_tcp_7946": "tcp dport 7946", "gossip_tcp_7946_back": "tcp sport 7946",
            "tunnel_udp_8472": "udp dport 8472", "etcd_tcp_2379": "tcp dport 2379",
            "etcd_tcp_2379_back": "tcp sport 2379"}


def counters_on(sb: Sandbox) -> None:
    rules = "\n".join(f"  {match} counter comment \"{name}\"" for name, match in COUNTERS.items())
    text = ("table bridge ovsbench {\n chain forward {\n  type filter hook forward priority -10;"
            f" policy accept;\n{rules}\n }}\n}}\n")
    sb.run_in(sb.st.underlay, "nft", "delete", "table", "bridge", "ovsbench", check=False)
    p = subprocess.run([*sb.exec_prefix(sb.st.underlay), "nft", "-f", "-"], input=text.encode(),
                       capture_output=True, check=False)
    if p.returncode:
        raise RuntimeError(f"nft: {p.stderr.decode()}")


def counters(sb: Sandbox) -> dict[str, int]:
    out = sb.run_in(sb.st.underlay, "nft", "list", "table", "bridge", "ovsbench").stdout.decode()
    return {m.group(2): int(m.group(1)) for m in re.finditer(
        r'counter packets \d+ bytes (\d+) comment "(\w+)"', out)}


def kernel_has(sb: Sandbox, node: str, vtep_ip: str, mac: str, underlay: str) -> bool:
    e = sb.kernel_entries(node)
    return (vtep_ip, mac) in e["neigh"] and (mac, underlay) in e["fdb"]


def traffic(sb: Sandbox, nodes: list[str], window: float) -> dict[str, Any]:
    counters_on(sb)
    a = dict(zip(nodes, POOL.map(lambda n: scrape_gossip_bytes(sb, n), nodes), strict=True))
    c0, t0 = counters(sb), time.monotonic()
    time.sleep(window)
    b = dict(zip(nodes, POOL.map(lambda n: scrape_gossip_bytes(sb, n), nodes), strict=True))
    c1, dt = counters(sb), time.monotonic() - t0
    out_rates = [(b[n]["out"] - a[n]["out"]) / dt for n in nodes]
    wire = {k: (c1.get(k, 0) - c0.get(k, 0)) / dt / len(nodes) for k in COUNTERS}
    gossip_wire = wire["gossip_tcp_7946"] + wire["gossip_tcp_7946_back"] + wire["tunnel_udp_8472"]
    etcd_wire = wire["etcd_tcp_2379"] + wire["etcd_tcp_2379_back"]
    return {
        "window_s": round(dt, 1),
        "payload_bytes_out_per_s_per_node": summary(out_rates),
        "wire_bytes_per_s_per_node": {k: round(v, 1) for k, v in wire.items()},
        "gossip_wire_bytes_per_s_per_node": round(gossip_wire, 1),
        "reference_etcd_wire_bytes_per_s_per_node": round(etcd_wire, 1),
        "ratio_gossip_wire_to_etcd_wire": round(gossip_wire / etcd_wire, 2) if etcd_wire else None,
    }


def log_ts(doc: dict[str, Any]) -> float:
    ts = doc["ts"]  # 2026-01-02T03:04:05.678Z
    return (time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            + float("0" + ts[19:-1]))


def suspicions(sb: Sandbox, nodes: list[str], since: float, until: float) -> list[float]:
    """How long each suspicion lasted until refuted (from every agent's log)."""
    out = []
    pat = re.compile(r"membership: (\S+) is (suspect|alive again|dead)")
    for n in nodes:
        open_: dict[str, float] = {}
        for line in Path(sb.node(n).log).read_text(errors="replace").splitlines():
            if "membership: " not in line:
                continue
            doc = json.loads(line)
            m = pat.search(doc["msg"])
            ts = log_ts(doc)
            if not m or not since <= ts <= until:
                continue
            if m.group(2) == "suspect":
                open_.setdefault(m.group(1), ts)
            elif m.group(1) in open_:
                out.append(ts - open_.pop(m.group(1)))
    return out


def loss(sb: Sandbox, nodes: list[str], seconds: float) -> dict[str, Any]:
    dead: dict[str, float] = {}
    suspect_views = polls = 0
    sb.set_faults(loss_percent=20)
    t_start = time.time()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            for n, peers in states(sb, nodes).items():
                for name, p in peers.items():
                    if p["state"] == "dead":
                        dead.setdefault(f"{n}->{name}", round(time.monotonic() - t0, 2))
                    suspect_views += p["state"] == "suspect"
            polls += 1
            time.sleep(0.25)
        out = sb.run_in(sb.st.underlay, "nft", "list", "table", "bridge",
                        "ovs_faults").stdout.decode()
        m = re.search(r"numgen random mod 100 < \d+ counter packets (\d+)", out)
        dropped = int(m.group(1)) if m else 0
    finally:
        sb.clear_faults()
    wait_for(lambda: all_alive(sb, nodes), 20, 0.2)
    episodes = suspicions(sb, nodes, t_start, time.time())
    return {"seconds": seconds, "loss_percent": 20, "frames_dropped": dropped,
            "status_polls": polls, "suspect_views": suspect_views, "false_dead": dead,
            "suspicion_episodes": len(episodes),
            "longest_suspicion_s": round(max(episodes), 3) if episodes else None,
            "suspicion_timeout_unconfirmed_s": SwimConfig().suspect_timeout_max,
            "suspicion_timeout_confirmed_s": SwimConfig().suspect_timeout}


def dead_times(sb: Sandbox, nodes: list[str], victim: str, since: float) -> dict[str, float]:
    """node -> seconds after `since` when its log first says `victim` is dead."""
    out: dict[str, float] = {}
    needle = f"membership: {victim} is dead"
    for n in nodes:
        for line in Path(sb.node(n).log).read_text(errors="replace").splitlines():
            if needle in line and (ts := log_ts(json.loads(line))) >= since:
                out[n] = ts - since
                break
    return out


def detection(sb: Sandbox, nodes: list[str], crashes: int) -> dict[str, Any]:
    alls, firsts = [], []
    for victim in nodes[-crashes:]:
        others = [n for n in nodes if n != victim]
        t_crash = time.time()
        sb.stop_agent(victim, signal.SIGKILL)
        sb.set_faults(partitioned=[victim])
        seen: dict[str, float] = {}
        try:
            for _ in range(100):  # look at the logs every 0.5 s, up to 50 s
                time.sleep(0.5)
                seen = dead_times(sb, others, victim, t_crash)
                if len(seen) == len(others):
                    break
            else:
                raise TimeoutError(f"{victim} not dead everywhere: {seen}")
        finally:
            sb.clear_faults()
            sb.start_agent(victim)
        alls.append(max(seen.values()))
        firsts.append(min(seen.values()))
        log(f"  crash of {victim}: dead on the first peer after {firsts[-1]:.2f}s, on all "
            f"{len(others)} after {alls[-1]:.2f}s")
        sb.wait_ready(victim, 60)
        wait_for(lambda: all_alive(sb, nodes), 30, 0.2)
    s = summary(alls)
    return {"all_peers_s": s, "first_peer_s": summary(firsts), "target_s": 3.0,
            "ratio_median_to_target": round(s["median"] / 3.0, 3)}


def new_mac_convergence(sb: Sandbox, nodes: list[str], reps: int) -> dict[str, Any]:
    frozen, etcd_up = [], []
    for i in range(reps):
        for with_etcd in (True, False):
            node = nodes[1 + (2 * i + with_etcd) % (len(nodes) - 1)]
            rec = sb.status(node).self
            vtep_ip = rec.subnet.split("/")[0]
            mac = "02:5e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(4))
            peers = [n for n in nodes if n != node]
            # the saved peers are what a start without etcd relies on
            wait_for(lambda node=node: (sb.node_dir(node) / "state" / "peers.json").exists(), 10)
            if not with_etcd:
                sb.signal_etcd(signal.SIGSTOP)
            try:
                sb.stop_agent(node, signal.SIGKILL)
                t0 = time.monotonic()
                sb.start_agent(node, ["--vtep-mac", mac])
                done: set[str] = set()

                def converged(peers: list[str] = peers, done: set[str] = done,
                              vtep_ip: str = vtep_ip, mac: str = mac,
                              underlay: str = rec.underlay_ip) -> bool:
                    todo = [n for n in peers if n not in done]
                    for n, ok in zip(todo, POOL.map(
                            lambda n: kernel_has(sb, n, vtep_ip, mac, underlay), todo),
                            strict=True):
                        if ok:
                            done.add(n)
                    return len(done) == len(peers)

                wait_for(converged, 30)
                took = time.monotonic() - t0
            finally:
                if not with_etcd:
                    sb.signal_etcd(signal.SIGCONT)
            (etcd_up if with_etcd else frozen).append(took)
            log(f"  {node} restarted with a new VTEP MAC, etcd {'up' if with_etcd else 'FROZEN'}"
                f": programmed on all {len(peers)} peers after {took:.2f}s")
            wait_for(lambda node=node: not status_json(sb.status(node))["degraded"], 60, 0.2)
            wait_for(lambda: all_alive(sb, nodes), 30, 0.2)
    f, u = summary(frozen), summary(etcd_up)
    return {"etcd_frozen_s": f, "reference_etcd_up_s": u, "target_s": 5.0,
            "ratio_frozen_to_etcd_up": round(f["median"] / u["median"], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--window", type=float, default=30.0, help="steady-state traffic window")
    ap.add_argument("--loss-seconds", type=float, default=30.0)
    ap.add_argument("--crashes", type=int, default=5)
    ap.add_argument("--mac-reps", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root: they build network namespaces")
    sb = Sandbox(f"bms{secrets.token_hex(2)}", progress=lambda m: None)
    nodes = [f"n{i}" for i in range(1, args.nodes + 1)]
    doc: dict[str, Any] = {
        "name": "membership",
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0],
                    "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "nodes": args.nodes,
        "timings": {k: v for k, v in vars(SwimConfig()).items()},
    }
    old = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        log(f"sandbox {sb.name}: {args.nodes} nodes")
        try:
            sb.up(args.nodes, 0, agent_args=["--log-format", "json"])
        except SandboxError as exc:
            raise RuntimeError(f"sandbox up failed at {exc.step}: {exc.message}\n{exc.log}"
                               ) from None
        doc["all_alive_after_up_s"] = round(wait_for(lambda: all_alive(sb, nodes), 60, 0.2), 2)
        log(f"steady-state traffic for {args.window:.0f}s ...")
        doc["traffic"] = traffic(sb, nodes, args.window)
        log(f"20% random loss for {args.loss_seconds:.0f}s ...")
        doc["loss"] = loss(sb, nodes, args.loss_seconds)
        log(f"{args.crashes} crashes ...")
        doc["detection"] = detection(sb, nodes, args.crashes)
        log(f"{args.mac_reps} x restart with a new VTEP MAC, etcd up then frozen ...")
        doc["new_mac_convergence"] = new_mac_convergence(sb, nodes, args.mac_reps)
    finally:
        sb.down()
        signal.signal(signal.SIGTERM, old)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "membership.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    t, d, c, lo = doc["traffic"], doc["detection"], doc["new_mac_convergence"], doc["loss"]
    rows = [
        ("figure", "value", "reference / target"),
        (f"crash detection, all {args.nodes - 1} peers (median of {d['all_peers_s']['n']})",
         f"{d['all_peers_s']['median']:.2f} s (max {d['all_peers_s']['max']:.2f})",
         f"target 3 s: ratio {d['ratio_median_to_target']}"),
        (f"new-MAC convergence, etcd frozen (median of {c['etcd_frozen_s']['n']})",
         f"{c['etcd_frozen_s']['median']:.2f} s (max {c['etcd_frozen_s']['max']:.2f})",
         f"etcd up: {c['reference_etcd_up_s']['median']:.2f} s, ratio "
         f"{c['ratio_frozen_to_etcd_up']}; target 5 s"),
        ("gossip payload sent per node",
         f"{t['payload_bytes_out_per_s_per_node']['median']:.0f} B/s", ""),
        ("gossip on the wire per node (TCP 7946 + tunnel probes)",
         f"{t['gossip_wire_bytes_per_s_per_node']:.0f} B/s",
         f"etcd traffic: {t['reference_etcd_wire_bytes_per_s_per_node']:.0f} B/s, ratio "
         f"{t['ratio_gossip_wire_to_etcd_wire']}"),
        (f"20% loss for {lo['seconds']:.0f} s: false dead",
         f"{len(lo['false_dead'])}", f"{lo['frames_dropped']} frames dropped"),
        ("  suspicions under loss: count, longest until refuted",
         f"{lo['suspicion_episodes']}, {lo['longest_suspicion_s']} s",
         f"timeout {lo['suspicion_timeout_unconfirmed_s']} s unconfirmed, "
         f"{lo['suspicion_timeout_confirmed_s']} s confirmed"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    log(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
