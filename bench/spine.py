#!/usr/bin/env python3
"""The spine's user-visible times: sandbox up, and drift repair.

- sandbox up: `Sandbox.up(3 nodes, 2 pods each)`, from nothing to a converged
  cluster (every node has programmed every peer, every pod attached), N runs.
- drift repair: on a 3-node sandbox whose agents run with the defaults
  (kernel notifications wake a pass; the periodic pass every 10 s), delete a
  peer's FDB entry, neighbour entry, route, and the whole VXLAN device by
  hand, and time until the entry (or the device with all its peers) is back,
  N times each.

Prints a table and writes bench/results/spine.json. Run as root:
    .venv/bin/python bench/spine.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from overlay.sandbox.sandbox import Sandbox

RESULTS = Path(__file__).resolve().parent / "results"


def name() -> str:
    return "bs" + secrets.token_hex(3)




def wait(cond: Any, timeout: float = 10.0) -> float:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("not repaired within 10 s")
        time.sleep(0.01)
    return time.perf_counter() - t0


def measure_up(runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        sb = Sandbox(name())
        try:
            t0 = time.perf_counter()
            sb.up(3, 2)
            out.append(time.perf_counter() - t0)
        finally:
            sb.down()
    return out


def measure_repair(runs: int) -> dict[str, list[float]]:
    sb = Sandbox(name())
    times: dict[str, list[float]] = {"fdb": [], "neigh": [], "route": [], "device": []}
    try:
        sb.up(3, 0)
        ns = sb.node("n1").netns
        peer = sb.status("n2").self
        net = peer.subnet.split("/")[0]
        fdb, neigh, route = (peer.vtep_mac, peer.underlay_ip), (net, peer.vtep_mac), \
            (peer.subnet, net)
        for _ in range(runs):
            sb.run_in(ns, "bridge", "fdb", "del", peer.vtep_mac, "dev", sb.vxlan_device, "dst",
                      peer.underlay_ip)
            times["fdb"].append(wait(lambda: fdb in sb.kernel_entries("n1")["fdb"]))
            sb.run_in(ns, "ip", "neigh", "del", net, "dev", sb.vxlan_device)
            times["neigh"].append(wait(lambda: neigh in sb.kernel_entries("n1")["neigh"]))
            sb.run_in(ns, "ip", "route", "del", peer.subnet)
            times["route"].append(wait(lambda: route in sb.kernel_entries("n1")["route"]))
            sb.run_in(ns, "ip", "link", "del", sb.vxlan_device)
            times["device"].append(wait(lambda: len(sb.kernel_entries("n1")["fdb"]) == 2
                                        and len(sb.kernel_entries("n1")["route"]) == 2))
            time.sleep(0.3)
    finally:
        sb.down()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    up = measure_up(args.runs)
    repair = measure_repair(args.runs)
    doc = {
        "sandbox_up_3x2_s": {"runs": up, "median": statistics.median(up)},
        "drift_repair_s": {k: {"runs": v, "median": statistics.median(v), "max": max(v)}
                           for k, v in repair.items()},
        "reconcile_interval_s": 10.0,
        "repair_trigger": "kernel notification",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spine.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"sandbox up, 3 nodes x 2 pods: median {doc['sandbox_up_3x2_s']['median']:.2f} s "
          f"over {args.runs} runs ({', '.join(f'{t:.2f}' for t in up)})")
    print("drift repair (from kernel notifications; periodic pass every 10 s; target < 2 s):")
    for k, v in doc["drift_repair_s"].items():
        print(f"  {k:7s} median {v['median']:.2f} s, max {v['max']:.2f} s")
    print(f"wrote {RESULTS / 'spine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
