#!/usr/bin/env python3
"""CNI plugin latency and pod-start throughput: `overlay` against bridge + host-local.

Both plugins are called the same way, in the same run, on the same node: a
Python harness already inside the node's namespace runs each plugin as a
subprocess with the CNI_* variables and the config on stdin, exactly as a
runtime does (so `ip netns exec` is paid by neither), one fresh pod
namespace per call. The reference is Debian's `bridge` with `host-local`
IPAM from /usr/lib/cni, configured to do the same work as ours: a veth pair
on a bridge with hairpin mode, MTU 1450, an address and a default route via
the bridge's gateway address.

  latency     `--calls` (50) ADDs of each plugin, alternating between them so
              the machine's drift hits both alike; then CHECK, DEL and VERSION
              the same way. Medians, p95 and the ratio overlay / reference.
  throughput  `--pods` (100) ADDs, `--parallel` (4) at a time, for each plugin,
              in four blocks per plugin taken in the order A B B A A B B A;
              then their DELs the same way. Pods per second.

Targets (issue 13, the static plugin of native/): ADD, DEL and VERSION
medians <= the reference's, and pod starts per second (ADD throughput) >=
the reference's. VERSION is the plugin's bare start-up: the executable
answers it alone. The sandbox (network namespaces only; nothing in the root
namespace) is created here and removed in a `finally`, even on Ctrl-C or
SIGTERM. Results: bench/results/cni.json.

  sudo .venv/bin/python bench/cni_latency.py [--calls 50] [--pods 100] [--parallel 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REFERENCE_DIR = Path("/usr/lib/cni")
TARGETS = {"ADD": 1.0, "DEL": 1.0, "VERSION": 1.0}  # overlay median / reference median, at most
THROUGHPUT_TARGET = 1.0  # overlay pods/s / reference pods/s (ADD), at least


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the worker: runs inside the node's namespace ------------------------------------


class Plugin:
    def __init__(self, name: str, binary: str, conf: dict[str, Any], cni_path: str) -> None:
        self.name, self.binary, self.cni_path = name, binary, cni_path
        self.conf = conf

    def call(self, command: str, cid: str, netns: str, prev: Any = None) -> tuple[float, Any]:
        conf = dict(self.conf)
        if prev is not None:
            conf["prevResult"] = prev
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
               "CNI_IFNAME": "eth0", "CNI_PATH": self.cni_path}
        data = json.dumps(conf).encode()
        t0 = time.perf_counter()
        p = subprocess.run([self.binary], input=data, env=env, capture_output=True,
                           timeout=60, check=False)
        took = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{self.name} {command} {cid} exited {p.returncode}: "
                               f"{p.stdout.decode(errors='replace')[:300]} "
                               f"{p.stderr.decode(errors='replace')[:300]}")
        return took, (json.loads(p.stdout) if p.stdout.strip() else None)


def agent_seconds(metrics_url: str) -> dict[str, tuple[float, float]]:
    """overlayd's own time per command (sum, count), from its metrics."""
    out: dict[str, tuple[float, float]] = {}
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return out
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in text.splitlines():
        for suffix, into in (("_sum", sums), ("_count", counts)):
            head = f"overlay_cni_request_duration_seconds{suffix}{{command=\""
            if line.startswith(head):
                cmd = line[len(head):].split('"', 1)[0]
                into[cmd] = float(line.rsplit(" ", 1)[1])
    for cmd in sums:
        out[cmd] = (sums[cmd], counts.get(cmd, 0.0))
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    plugins = {k: Plugin(k, **v) for k, v in spec["plugins"].items()}
    ours, ref = plugins["overlay"], plugins["reference"]
    out: dict[str, Any] = {"latency": {}, "throughput": {}}
    for p in (ours, ref):  # warm-up, not measured: the reference creates its bridge here
        cid, ns = f"warm-{p.name}", spec["warmup"][p.name]
        _, res = p.call("ADD", cid, ns)
        p.call("DEL", cid, ns, res)

    agent_before = agent_seconds(spec["metrics_url"])
    lat: dict[str, dict[str, list[float]]] = {c: {"overlay": [], "reference": []}
                                              for c in ("ADD", "CHECK", "DEL", "VERSION")}
    results: dict[tuple[str, int], Any] = {}
    n = spec["calls"]

    def alternate(fn: Callable[[Plugin, int], float], command: str) -> None:
        for i in range(n):
            order = (ours, ref) if i % 2 == 0 else (ref, ours)
            for p in order:
                lat[command][p.name].append(fn(p, i))

    def add(p: Plugin, i: int) -> float:
        took, res = p.call("ADD", f"lat-{p.name}-{i}", spec["latency_ns"][p.name][i])
        results[(p.name, i)] = res
        return took

    def check(p: Plugin, i: int) -> float:
        return p.call("CHECK", f"lat-{p.name}-{i}", spec["latency_ns"][p.name][i],
                      results[(p.name, i)])[0]

    def delete(p: Plugin, i: int) -> float:
        return p.call("DEL", f"lat-{p.name}-{i}", spec["latency_ns"][p.name][i],
                      results[(p.name, i)])[0]

    def version(p: Plugin, i: int) -> float:
        env = {"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")}
        t0 = time.perf_counter()
        subprocess.run([p.binary], input=b'{"cniVersion": "1.0.0"}', env=env,
                       capture_output=True, timeout=60, check=True)
        return time.perf_counter() - t0

    alternate(add, "ADD")
    alternate(check, "CHECK")
    alternate(delete, "DEL")
    alternate(version, "VERSION")
    out["latency"] = lat
    agent_after = agent_seconds(spec["metrics_url"])
    out["agent_mean_s"] = {
        cmd: (agent_after[cmd][0] - agent_before.get(cmd, (0.0, 0.0))[0])
        / max(1.0, agent_after[cmd][1] - agent_before.get(cmd, (0.0, 0.0))[1])
        for cmd in agent_after if cmd in ("ADD", "CHECK", "DEL")}

    # Blocks of pods, in the order A B B A A B B A, so drift on a shared machine
    # falls on both plugins alike.
    blocks = 4
    order = [(ours, ref, ref, ours)[k % 4] for k in range(2 * blocks)]
    taken = {p.name: {"ADD": 0.0, "DEL": 0.0} for p in (ours, ref)}
    got: dict[tuple[str, int], Any] = {}

    def run_block(command: str, p: Plugin, idx: list[int]) -> None:
        nss = spec["throughput_ns"][p.name]

        def one(i: int) -> None:
            cid = f"tp-{p.name}-{i}"
            if command == "ADD":
                got[(p.name, i)] = p.call("ADD", cid, nss[i])[1]
            else:
                p.call("DEL", cid, nss[i], got[(p.name, i)])

        with ThreadPoolExecutor(max_workers=spec["parallel"]) as ex:
            t0 = time.perf_counter()
            list(ex.map(one, idx))
            taken[p.name][command] += time.perf_counter() - t0

    for command in ("ADD", "DEL"):
        seen = {ours.name: 0, ref.name: 0}
        for p in order:
            count = len(spec["throughput_ns"][p.name])
            k = seen[p.name]
            idx = list(range(k * count // blocks, (k + 1) * count // blocks))
            seen[p.name] += 1
            run_block(command, p, idx)
    for p in (ours, ref):
        out["throughput"][p.name] = {"pods": len(spec["throughput_ns"][p.name]),
                                     "add_seconds": taken[p.name]["ADD"],
                                     "del_seconds": taken[p.name]["DEL"]}
    return out


# --- the driver: builds the sandbox, runs the worker, reports ----------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    v = sorted(values)
    k = max(0, min(len(v) - 1, math.ceil(pct / 100 * len(v)) - 1))
    return v[k]


def summary_ms(values: Sequence[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in values]
    return {"n": len(ms), "median": round(statistics.median(ms), 2),
            "p95": round(percentile(ms, 95), 2), "mean": round(statistics.fmean(ms), 2),
            "min": round(min(ms), 2), "max": round(max(ms), 2),
            "values": [round(x, 3) for x in ms]}


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def plugin_versions() -> dict[str, str]:
    out = {}
    for pkg in ("containernetworking-plugins",):
        p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True,
                           text=True, check=False)
        out[pkg] = p.stdout.strip() or "unknown"
    return out


class _Interrupted(Exception):
    pass


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def run(calls: int, pods: int, parallel: int) -> dict[str, Any]:
    from overlay.sandbox.sandbox import Sandbox, SandboxError, sh

    for binary in ("bridge", "host-local"):
        if not (REFERENCE_DIR / binary).exists():
            sys.exit(f"{REFERENCE_DIR / binary} is missing: apt-get install "
                     "containernetworking-plugins")
    sb = Sandbox(f"bcni{secrets.token_hex(2)}")
    old = signal.signal(signal.SIGTERM, _interrupted)
    made: list[str] = []
    try:
        log(f"sandbox {sb.name}: 1 node ...")
        try:
            sb.up(1, 0)
        except SandboxError as exc:
            raise RuntimeError(f"sandbox up failed at {exc.step}: {exc.message}\n{exc.log}"
                               ) from None
        node_ns = sb.node("n1").netns
        conflist = json.loads(sb.conflist_path("n1").read_text())
        ours_conf = {**conflist["plugins"][0], "cniVersion": "1.0.0", "name": "overlay"}
        mtu = int(json.loads(sb.run_in(node_ns, "ip", "-j", "link", "show", sb.vxlan_device)
                             .stdout)[0]["mtu"])
        ref_conf = {"cniVersion": "1.0.0", "name": "refnet", "type": "bridge",
                    "bridge": "refbr0", "isGateway": True, "hairpinMode": True, "mtu": mtu,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]],
                             "dataDir": str(sb.dir / "host-local")}}
        cni_path = f"{sb.dir / 'cni' / 'bin'}:{REFERENCE_DIR}"

        def namespaces(tag: str, count: int) -> list[str]:
            names = []
            for i in range(count):
                name = sb.ns(f"{tag}{i}")
                sh("ip", "netns", "add", name)
                made.append(name)
                names.append(f"/run/netns/{name}")
            return names

        log(f"creating {2 * (calls + pods + 1)} pod namespaces ...")
        spec = {
            "plugins": {
                "overlay": {"binary": str(sb.dir / "cni" / "bin" / "overlay"),
                            "conf": ours_conf, "cni_path": cni_path},
                "reference": {"binary": str(REFERENCE_DIR / "bridge"), "conf": ref_conf,
                              "cni_path": cni_path},
            },
            "warmup": {"overlay": namespaces("wo", 1)[0], "reference": namespaces("wr", 1)[0]},
            "latency_ns": {"overlay": namespaces("lo", calls),
                           "reference": namespaces("lr", calls)},
            "throughput_ns": {"overlay": namespaces("to", pods),
                              "reference": namespaces("tr", pods)},
            "calls": calls, "parallel": parallel,
            "metrics_url": "http://127.0.0.1:9181/metrics",
        }
        spec_path = sb.dir / "bench-spec.json"
        spec_path.write_text(json.dumps(spec))
        log(f"measuring: {calls} calls of each command per plugin, then {pods} ADDs "
            f"{parallel} at a time ...")
        t0 = time.monotonic()
        p = sb.run_in(node_ns, sys.executable, str(Path(__file__).resolve()), "--worker",
                      str(spec_path), check=False, timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {p.stderr.decode(errors='replace')[-2000:]}")
        raw = json.loads(p.stdout)
        log(f"measured in {time.monotonic() - t0:.0f}s")
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        sb.down()
        signal.signal(signal.SIGTERM, old)

    latency: dict[str, Any] = {}
    for command, by in raw["latency"].items():
        o, r = summary_ms(by["overlay"]), summary_ms(by["reference"])
        entry: dict[str, Any] = {"overlay": o, "reference": r,
                                 "ratio_median": round(o["median"] / r["median"], 3),
                                 "ratio_p95": round(o["p95"] / r["p95"], 3)}
        if command in TARGETS:
            entry["target_ratio_max"] = TARGETS[command]
            entry["met"] = entry["ratio_median"] <= TARGETS[command]
        if command in raw.get("agent_mean_s", {}):
            entry["overlay_agent_mean_ms"] = round(raw["agent_mean_s"][command] * 1000, 2)
        latency[command] = entry
    throughput = {}
    for name, t in raw["throughput"].items():
        throughput[name] = {"pods": t["pods"], "parallel": parallel,
                            "add_seconds": round(t["add_seconds"], 3),
                            "add_pods_per_s": round(t["pods"] / t["add_seconds"], 1),
                            "del_seconds": round(t["del_seconds"], 3),
                            "del_pods_per_s": round(t["pods"] / t["del_seconds"], 1)}
    throughput["ratio_add_pods_per_s"] = round(throughput["overlay"]["add_pods_per_s"]
                                               / throughput["reference"]["add_pods_per_s"], 3)
    throughput["ratio_del_pods_per_s"] = round(throughput["overlay"]["del_pods_per_s"]
                                               / throughput["reference"]["del_pods_per_s"], 3)
    throughput["target_ratio_add_min"] = THROUGHPUT_TARGET
    throughput["met"] = throughput["ratio_add_pods_per_s"] >= THROUGHPUT_TARGET
    return {
        "benchmark": "cni",
        "what": "overlay CNI plugin vs bridge + host-local, same node, same run, invoked "
                "alike from a harness inside the node namespace, one fresh netns per call",
        "command": " ".join(["bench/cni_latency.py", "--calls", str(calls), "--pods", str(pods),
                             "--parallel", str(parallel)]),
        "machine": machine(),
        "reference": {"plugins": "bridge + host-local", **plugin_versions(),
                      "config": {k: v for k, v in ref_conf.items() if k != "ipam"}},
        "overlay_config": {k: v for k, v in ours_conf.items() if k != "agentSocket"},
        "latency_ms": latency,
        "throughput": throughput,
    }


def report(doc: dict[str, Any]) -> str:
    lines = [f"CNI plugin latency, {doc['latency_ms']['ADD']['overlay']['n']} calls each, one "
             "fresh netns per call (ms)", "",
             f"{'':8}{'overlay':>22}{'bridge+host-local':>26}{'ratio (median)':>17}",
             f"{'':8}{'median':>11}{'p95':>11}{'median':>13}{'p95':>13}"]
    for command in ("ADD", "DEL", "CHECK", "VERSION"):
        e = doc["latency_ms"][command]
        o, r = e["overlay"], e["reference"]
        target = ""
        if "target_ratio_max" in e:
            target = (f"  target <= {e['target_ratio_max']:g}: "
                      f"{'met' if e['met'] else 'NOT MET'}")
        lines.append(f"{command:8}{o['median']:11.1f}{o['p95']:11.1f}{r['median']:13.1f}"
                     f"{r['p95']:13.1f}{e['ratio_median']:12.2f}x{target}")
    agent = {c: e["overlay_agent_mean_ms"] for c, e in doc["latency_ms"].items()
             if "overlay_agent_mean_ms" in e}
    if agent:
        lines.append("overlay's time inside the agent (mean, ms): "
                     + ", ".join(f"{c} {v:.1f}" for c, v in agent.items()))
    t = doc["throughput"]
    o, r = t["overlay"], t["reference"]
    lines += ["", f"Pod start throughput, {o['pods']} ADDs {o['parallel']} at a time",
              f"  overlay {o['add_pods_per_s']:.1f} pods/s, reference {r['add_pods_per_s']:.1f} "
              f"pods/s: {t['ratio_add_pods_per_s']:.2f}x  target >= "
              f"{t['target_ratio_add_min']:g}: {'met' if t['met'] else 'NOT MET'}",
              f"  DEL: overlay {o['del_pods_per_s']:.1f} pods/s, reference "
              f"{r['del_pods_per_s']:.1f} pods/s: {t['ratio_del_pods_per_s']:.2f}x",
              f"machine: {doc['machine']['cpus']} CPUs, load {doc['machine']['loadavg_1m']}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50, help="calls per command and plugin")
    ap.add_argument("--pods", type=int, default=100, help="ADDs per plugin for throughput")
    ap.add_argument("--parallel", type=int, default=4, help="concurrent ADDs for throughput")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0
    if os.geteuid() != 0:
        sys.exit("this benchmark needs root: it builds network namespaces")
    if not 1 <= args.calls <= 120 or not 1 <= args.pods <= 120:
        sys.exit("--calls and --pods must be within 1..120 (one /24 per plugin)")
    doc = run(args.calls, args.pods, args.parallel)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cni.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    print(report(doc))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
