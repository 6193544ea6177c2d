"""Shared pieces of the benchmark scripts: sandboxes, results files, statistics, load.

Every script builds what it measures in a sandbox of its own (network
namespaces only, removed in a `finally` even on failure or Ctrl-C), measures
our figure and a reference in the same run, interleaving them so drift on a
shared machine hits both alike, and writes `bench/results/<name>.json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

from overlay.sandbox.sandbox import Sandbox, SandboxError  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(*args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
       ) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False,
                       input=None if input is None else input.decode())
    if check and p.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[:500]}")
    return p


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root: they build network namespaces (run `make bench`)")


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def sandbox(tag: str, **up: Any) -> Iterator[Sandbox]:
    """A fresh sandbox named `<tag><random>`, always removed afterwards (even on SIGTERM)."""
    name = f"{tag}{secrets.token_hex(2)}"[:12]
    sb = Sandbox(name, progress=lambda m: None)
    old = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        try:
            sb.up(**up)
        except SandboxError as exc:
            raise RuntimeError(f"sandbox up failed at {exc.step}: {exc.message}\n{exc.log}"
                               ) from None
        yield sb
    finally:
        sb.down()
        signal.signal(signal.SIGTERM, old)


class CpuLoad:
    """How busy the whole machine was between start() and stop(), from /proc/stat."""

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def __init__(self) -> None:
        self.t0 = self._read()

    def busy(self) -> float:
        total, idle = self._read()
        dt, di = total - self.t0[0], idle - self.t0[1]
        return 0.0 if dt <= 0 else round(1 - di / dt, 3)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summary(values: Sequence[float]) -> dict[str, Any]:
    v = sorted(values)
    if not v:
        return {"n": 0}
    return {
        "n": len(v),
        "median": statistics.median(v),
        "mean": statistics.fmean(v),
        "min": v[0],
        "max": v[-1],
        "p95": percentile(v, 95),
        "stdev": statistics.stdev(v) if len(v) > 1 else 0.0,
        "values": list(values),
    }


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def ratio(ours: float, ref: float) -> float | None:
    return None if not ref else round(ours / ref, 3)


def write_result(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    log(f"wrote {path.relative_to(HERE.parent)}")
    return path


def python_in(sb: Sandbox, ns: str, script: str, *args: str, timeout: float = 300) -> Any:
    """Run bench/<script> with this interpreter inside namespace `ns`; its stdout is JSON."""
    p = sb.run_in(ns, sys.executable, str(HERE / script), *args, check=False, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} in {ns} exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace')[-1500:]}")
    return json.loads(p.stdout)


def http_get(sb: Sandbox, ns: str, url: str, timeout: float = 5) -> str:
    """GET `url` from inside namespace `ns` (no curl needed); '' on failure."""
    code = ("import sys, urllib.request\n"
            f"sys.stdout.write(urllib.request.urlopen({url!r}, timeout={timeout}).read()"
            ".decode())")
    p = sb.run_in(ns, sys.executable, "-I", "-S", "-c", code, check=False, timeout=timeout + 10)
    return p.stdout.decode(errors="replace") if p.returncode == 0 else ""


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def netns_exists(ns: str) -> bool:
    return Path(f"/run/netns/{ns}").exists()


def leased_subnet(log_path: str | Path) -> str:
    """The subnet an agent last said it holds, from its log (text or JSON format)."""
    found = ""
    with contextlib.suppress(OSError):
        for m in re.finditer(r"subnet (\d+\.\d+\.\d+\.\d+/\d+): (leased|this node's lease)",
                             Path(log_path).read_text(errors="replace")):
            found = m.group(1)
    return found


def remove_node(sb: Sandbox, name: str) -> None:
    """Make a node as if it had never joined: pods, agent, lease key and namespace go.

    (Not the agent's graceful leave: in this build the agent re-acquires the
    lease it has just released and keeps running; see the report's notes.)
    """
    h = sb.node(name)
    for pod in [p for p in sb.st.pods if p.node == name]:
        try:
            sb.del_pod(pod.name)
        except Exception as exc:  # its namespace goes anyway
            log(f"  deleting pod {pod.name}: {exc}")
    sb.stop_agent(name)
    subnet = leased_subnet(h.log)
    if subnet:
        net, length = subnet.split("/")
        sb.etcdctl("del", f"/overlay/subnets/{net}-{length}")
    sh("ip", "netns", "del", h.netns, check=False)
    sb.st.nodes = [x for x in sb.st.nodes if x.name != name]
    sb.save()
