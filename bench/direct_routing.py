#!/usr/bin/env python3
"""DirectRouting against VXLAN, on the routed sandbox (two underlay segments).

Two sandboxes side by side, each with two underlay segments joined by a
router namespace and one pod on each of n1 and n3 (segment 1) and n2
(segment 2): one with DirectRouting (flannel's Backend.DirectRouting), one
without. Measured in turn, interleaved so that the machine's load hits all
alike:

  direct     n1's pod -> n3's pod, same segment, DirectRouting: a plain route, no tunnel
  vxlan      the same pair in the sandbox without DirectRouting: VXLAN
  routed     n1's pod -> n2's pod across the router, with DirectRouting on: VXLAN
             (what DirectRouting leaves encapsulated)

No target: on veths the tunnel costs little next to the veth and bridge hops
(issue 14 quotes 6.98 vs 6.88 Gbit/s for routes built by hand), so what
matters is that the direct path works and is not slower. Results:
bench/results/direct_routing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

from common import CpuLoad, log, machine, ratio, require_root, sandbox, summary, write_result
from dataplane import PORT, iperf, ping_together


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    ap.add_argument("--reps", type=int, default=3, help="rounds (each runs every path once)")
    ap.add_argument("--pings", type=int, default=500, help="pings per path and round")
    args = ap.parse_args()
    require_root()
    t_start = time.monotonic()
    up = dict(nodes=3, pods_per_node=1, segments=2)
    with sandbox("bdr", direct_routing=True, **up) as dr, sandbox("bdv", **up) as vx:
        def pod(sb, node):  # type: ignore[no-untyped-def]
            return next(p for p in sb.st.pods if p.node == node)

        paths = {
            "direct": (dr, pod(dr, "n1").netns, pod(dr, "n3")),
            "vxlan": (vx, pod(vx, "n1").netns, pod(vx, "n3")),
            "routed": (dr, pod(dr, "n1").netns, pod(dr, "n2")),
        }
        direct_seen = {p.record.name: p.direct for p in dr.status("n1").peers}
        if direct_seen != {"n2": False, "n3": True}:
            raise RuntimeError(f"DirectRouting did not set up as expected: {direct_seen}")
        servers = []
        try:
            for sb, _src, dst in paths.values():
                servers.append(subprocess.Popen(
                    [*sb.exec_prefix(dst.netns), "iperf3", "-s", "-p", str(PORT), "-B", dst.ip],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            tput: dict[str, list[float]] = {n: [] for n in paths}
            rtts: dict[str, list[float]] = {n: [] for n in paths}
            busy: dict[str, list[float]] = {n: [] for n in paths}
            for rep in range(args.reps):
                order = list(paths) if rep % 2 == 0 else list(reversed(paths))
                for name in order:
                    sb, src, dst = paths[name]
                    cpu = CpuLoad()
                    r = iperf(sb, src, dst.ip, args.seconds)
                    busy[name].append(cpu.busy())
                    tput[name].append(r["gbps"])
                    log(f"  round {rep + 1} {name:7s} {r['gbps']:6.2f} Gbit/s "
                        f"(machine busy {busy[name][-1]:.0%})")
                for name in order:
                    sb, src, dst = paths[name]
                    got = ping_together(sb, {name: (src, dst.ip)}, args.pings)
                    rtts[name].append(statistics.median(got[name]))
                log(f"  round {rep + 1} RTT medians (ms): " + ", ".join(
                    f"{n} {rtts[n][-1]:.3f}" for n in paths))
        finally:
            for s in servers:
                s.terminate()
                s.wait(timeout=10)
    gbps = {n: summary(v) for n, v in tput.items()}
    rtt = {n: summary(v) for n, v in rtts.items()}
    paired = [round(a / b, 3) for a, b in zip(tput["direct"], tput["vxlan"], strict=True)]
    rtt_paired = [round(a / b, 3) for a, b in zip(rtts["direct"], rtts["vxlan"], strict=True)]
    doc = {
        "benchmark": "direct_routing",
        "machine": machine(),
        "config": {"iperf_seconds": args.seconds, "reps": args.reps, "pings": args.pings,
                   "segments": 2},
        "throughput_gbps": gbps,
        "rtt_ms_run_medians": rtt,
        "machine_busy_during_iperf": busy,
        "ratios": {
            "throughput_direct_vs_vxlan": round(statistics.median(paired), 3),
            "throughput_direct_vs_vxlan_per_rep": paired,
            "throughput_routed_vxlan_vs_vxlan": ratio(gbps["routed"]["median"],
                                                      gbps["vxlan"]["median"]),
            "rtt_direct_vs_vxlan": round(statistics.median(rtt_paired), 3),
            "rtt_direct_vs_vxlan_per_rep": rtt_paired,
        },
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    write_result("direct_routing", doc)
    print(json.dumps({"throughput_direct_vs_vxlan": doc["ratios"]["throughput_direct_vs_vxlan"],
                      "rtt_direct_vs_vxlan": doc["ratios"]["rtt_direct_vs_vxlan"],
                      "gbps": {n: round(g["median"], 2) for n, g in gbps.items()}}))


if __name__ == "__main__":
    main()
