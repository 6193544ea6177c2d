#!/usr/bin/env python3
"""Runs every benchmark, then writes bench/results/REPORT.md (`make bench`).

Each script runs as its own process with a time limit, so one failure is
reported and the others still run; the report says which failed and why.
bench/cni_latency.py (CNI ADD/DEL latency against the reference plugins) is
run too when it is in the tree; its JSON results in bench/results/ join the
report.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

# (script, arguments, time limit in seconds[, name of the run when a script runs twice]).
# scale.py and swimsim.py (issue 12) take about 8 and 10 minutes of the run on a quiet
# 2-core machine.
# The chaos soak (bench/soak.py) takes 45 minutes (last: the other figures do not
# wait for it); the whole run about 75 minutes.
PLAN: list[tuple[str, list[str], int] | tuple[str, list[str], int, str]] = [
    ("spine.py", [], 180),
    ("dataplane.py", [], 420),
    # IPv6 pods over an IPv6 underlay against flannel-v6.1's layout built by hand
    ("dataplane.py", ["--family", "ipv6", "--reps", "3", "--together", "1"], 300,
     "dataplane_ipv6"),
    ("direct_routing.py", [], 240),
    ("peer_programming.py", [], 300),
    ("convergence.py", [], 240),
    ("cni_latency.py", [], 300),
    ("footprint.py", [], 480),
    ("membership.py", [], 300),
    ("signing.py", [], 180),
    ("scale.py", [], 1200),
    ("swimsim.py", [], 1500),
    ("soak.py", [], 3300),
]
QUICK: dict[str, list[str]] = {
    "spine.py": ["--runs", "1"],
    "cni_latency.py": ["--calls", "10", "--pods", "20"],
    "dataplane.py": ["--seconds", "2", "--reps", "1", "--pings", "50", "--together", "1"],
    "direct_routing.py": ["--seconds", "2", "--reps", "1", "--pings", "50"],
    "peer_programming.py": ["--sizes", "100,1000", "--reps", "1", "--idle-seconds", "3"],
    "convergence.py": ["--reps", "1"],
    "footprint.py": ["--peers", "10,1000", "--window", "6", "--settle", "1"],
    "membership.py": ["--nodes", "5", "--window", "5", "--loss-seconds", "5", "--crashes", "1",
                      "--mac-reps", "1"],
    "signing.py": ["--n", "200", "--reps", "2", "--nodes", "3", "--window", "5"],
    "scale.py": ["--sizes", "5,10", "--window", "5", "--settle", "2", "--hog-seconds", "3",
                 "--stop-seconds", "0.5", "--freeze-seconds", "1"],
    "swimsim.py": ["--sizes", "50,200", "--stall-sizes", "50"],
    # Too short for a growth verdict: every fit is n/a; the run checks the chaos and the plots.
    "soak.py": ["--seconds", "60", "--interval", "2"],
}
TOOLS = ("ip", "bridge", "etcd", "etcdctl", "ping", "iperf3", "nft")


def remove_leftovers(since: float) -> None:
    """Sandboxes our scripts made in this run and could not remove (killed): remove them."""
    from overlay.sandbox.sandbox import BASE, Sandbox

    tags = ("bdp", "bpp", "bcv", "bfp", "bfq", "bs", "bcni", "bms", "bsg", "bdr", "bdv", "bsc",
            "bsk")
    for d in BASE.glob("*") if BASE.exists() else ():
        if d.name.startswith(tags) and d.stat().st_mtime >= since - 1:
            print(f"   removing leftover sandbox {d.name}", file=sys.stderr)
            Sandbox(d.name).down()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated script names (without .py) to run")
    ap.add_argument("--quick", action="store_true",
                    help="short runs to check the scripts work (figures not for quoting)")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild REPORT.md from the results already there")
    args = ap.parse_args()
    import report

    if args.report_only:
        report.main()
        return 0
    import os

    if os.geteuid() != 0:
        sys.exit("the benchmarks need root: they build network namespaces (run `make bench`)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (run `make deps`)")
    only = set(args.only.split(",")) if args.only else None
    if only is None:
        # A fresh report: results of an earlier run must not pass for this one's.
        for p in (*RESULTS.glob("*.json"), *RESULTS.glob("*.png"), RESULTS / "REPORT.md",
                  RESULTS / "soak_chaos.md"):
            p.unlink(missing_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    durations: dict[str, float] = {}
    failed: dict[str, str] = {}
    notes: list[str] = []
    t_all = time.monotonic()
    since = time.time()
    for script, extra, limit, *named in PLAN:
        name = named[0] if named else script.removesuffix(".py")
        if only is not None and name not in only:
            continue
        path = HERE / script
        if not path.exists():
            notes.append(f"`bench/{script}` is not in this tree: not run")
            print(f"== {name}: not in this tree, skipped", file=sys.stderr, flush=True)
            continue
        cmd = [sys.executable, str(path), *extra, *(QUICK.get(script, []) if args.quick else [])]
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        # Its summary line goes to our stdout, its progress to stderr.
        p = subprocess.Popen(cmd, cwd=HERE.parent)
        try:
            rc = p.wait(timeout=limit)
            if rc != 0:
                failed[name] = f"exit {rc}; see its output above"
        except subprocess.TimeoutExpired:
            failed[name] = f"over its {limit} s limit"
            from overlay.sandbox.sandbox import kill_and_wait

            # SIGTERM: the script removes its sandbox on the way out.
            kill_and_wait(p, signal.SIGTERM, 60)
            remove_leftovers(since)
        durations[name] = round(time.monotonic() - t0, 1)
        print(f"== {name}: {durations[name]:.0f} s"
              + (f", FAILED ({failed[name]})" if name in failed else ""),
              file=sys.stderr, flush=True)
    if only is None or "scale_model" in only:
        try:
            import scale_model

            scale_model.main()
        except (OSError, KeyError, ValueError) as exc:
            failed["scale_model"] = f"{type(exc).__name__}: {exc}"
    if args.quick:
        notes.append("quick run (--quick): short windows, few repetitions; not for quoting")
    from common import machine, write_result

    write_result("run_all", {"benchmark": "run_all", "machine": machine(),
                             "durations": durations, "failed": failed, "notes": notes,
                             "total_seconds": round(time.monotonic() - t_all, 1),
                             "quick": args.quick})
    report.main()
    for t in report.targets_of(report.load(RESULTS)):
        print(f"{'met    ' if t.get('met') else 'NOT MET'}  {t.get('ratio')!s:>7}  "
              f"{t.get('op')} {t.get('threshold')}  {t.get('what')}")
    print(f"total {time.monotonic() - t_all:.0f} s; report: {RESULTS / 'REPORT.md'}")
    for name, why in failed.items():
        print(f"FAILED: {name}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
