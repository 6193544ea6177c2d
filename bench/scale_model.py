#!/usr/bin/env python3
"""Scale on paper: what 1,000 and 5,000 nodes mean, from the per-node costs measured here.

Reads bench/results/{footprint,peer_programming}.json (and gossip figures
when the membership protocol produces any), fits each measured cost as
`a + b * N` through the two sizes measured, and states every assumption
next to what it drives. Pure arithmetic: `model()` is unit-tested.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Assumptions:
    keepalive_interval_s: float = 15.0  # lease TTL 60 s / 4 (overlay/agent/lease.py)
    config_poll_interval_s: float = 60.0  # the agent watches the config; re-reads it hourly-ish
    restarts_per_node_per_day: float = 1.0  # agent restarts, reboots, joins and leaves
    writes_per_restart: float = 2.0  # a lease grant plus one lease-key transaction
    key_changes_per_restart: float = 1.0  # the lease key is written once (create or take-over)
    watch_event_overhead_bytes: int = 64  # gRPC and watch-response framing per event
    reconcile_interval_s: float = 10.0  # overlayd's default periodic (safety-net) pass

    def notes(self) -> list[str]:
        return [
            f"each agent renews its etcd lease every {self.keepalive_interval_s:g} s "
            "(TTL 60 s / 4), watches the network config key and re-reads it every "
            f"{self.config_poll_interval_s:g} s as a safety net; etcd 3.4 renews leases on the "
            "leader without a raft write",
            f"churn: every node restarts or re-joins {self.restarts_per_node_per_day:g} time(s) "
            f"a day; each costs {self.writes_per_restart:g} raft writes (lease grant + key "
            f"transaction) and changes its key {self.key_changes_per_restart:g} time(s)",
            "every agent watches the whole lease prefix, so each key change is one watch event "
            "per node",
            f"a watch event carries one lease record plus ~{self.watch_event_overhead_bytes} "
            "bytes of framing",
            "a per-node cost measured at two sizes grows linearly (a + b*N through both) "
            f"unless the two differ by less than {FLAT:.0%}, then it is taken as constant (their "
            "mean); nothing is assumed about etcd's own limits",
            f"the agent's periodic reconcile runs every {self.reconcile_interval_s:g} s (drift "
            "is repaired from kernel notifications; the pass is a safety net) and costs, with "
            "nothing to change, the per-peer time measured at 5,000 peers",
        ]


@dataclass(frozen=True)
class Inputs:
    """Measured per-node costs: (size, value) pairs, two sizes each."""

    etcd_bytes_per_node_s: tuple[tuple[int, float], ...]
    gossip_bytes_per_node_s: tuple[tuple[int, float], ...]
    agent_cpu_idle: tuple[tuple[int, float], ...]  # fraction of a core, by peer count
    agent_rss_bytes: tuple[tuple[int, float], ...]  # by peer count
    noop_pass_s: tuple[int, float]  # (peers, seconds)
    first_pass_s: tuple[int, float]  # (peers, seconds)
    record_bytes: int  # key + value of one lease


def fit_line(points: tuple[tuple[int, float], ...]) -> tuple[float, float]:
    """(a, b) of y = a + b*x through the first and last point; b = 0 for a single point."""
    if not points:
        return 0.0, 0.0
    (x0, y0), (x1, y1) = points[0], points[-1]
    if x1 == x0:
        return y0, 0.0
    b = (y1 - y0) / (x1 - x0)
    return y0 - b * x0, b


# Two measurements closer than this (relative) are one constant cost seen twice
# through noise: extrapolating their difference a thousandfold would be noise too.
FLAT = 0.2


def at(points: tuple[tuple[int, float], ...], x: int) -> float:
    """The cost at size `x`: constant (the mean) when flat within FLAT, else linear."""
    ys = [y for _, y in points]
    if ys and max(ys) <= (1 + FLAT) * min(ys):
        return sum(ys) / len(ys)
    a, b = fit_line(points)
    return max(0.0, a + b * x)


def model(inp: Inputs, asm: Assumptions, nodes: int) -> dict[str, Any]:
    n = nodes
    restarts_s = n * asm.restarts_per_node_per_day / 86400
    key_changes_s = restarts_s * asm.key_changes_per_restart
    events_s = key_changes_s * n
    noop_per_peer = inp.noop_pass_s[1] / inp.noop_pass_s[0]
    first_per_peer = inp.first_pass_s[1] / inp.first_pass_s[0]
    gossip = at(inp.gossip_bytes_per_node_s, n) if any(
        v for _, v in inp.gossip_bytes_per_node_s) else None
    return {
        "nodes": n,
        "etcd": {
            "keys": n + 1,
            "leases": n,
            "db_bytes_live": n * inp.record_bytes,
            "keepalive_requests_per_s": n / asm.keepalive_interval_s,
            "config_reads_per_s": n / asm.config_poll_interval_s,
            "writes_per_s": restarts_s * asm.writes_per_restart,
            "watch_events_delivered_per_s": events_s,
            "watch_bytes_out_per_s": events_s * (inp.record_bytes
                                                 + asm.watch_event_overhead_bytes),
            "idle_client_bytes_per_s": n * at(inp.etcd_bytes_per_node_s, n),
            "list_bytes_per_node_start": n * inp.record_bytes,
            "relist_all_nodes_bytes": n * n * inp.record_bytes,
        },
        "per_node": {
            "kernel_entries": 3 * (n - 1),
            "etcd_bytes_per_s": at(inp.etcd_bytes_per_node_s, n),
            "gossip_bytes_per_s": gossip,
            "agent_idle_cpu_fraction": at(inp.agent_cpu_idle, n - 1),
            "agent_rss_bytes": at(inp.agent_rss_bytes, n - 1),
            "noop_reconcile_s": noop_per_peer * (n - 1),
            "noop_reconcile_cpu_fraction": noop_per_peer * (n - 1) / asm.reconcile_interval_s,
            "program_all_peers_s": first_per_peer * (n - 1),
        },
        "cluster": {
            "gossip_bytes_per_s": None if gossip is None else gossip * n,
        },
    }


def inputs_from_results(results: Path) -> Inputs:
    from fakepeers import fake_record

    from overlay.model import subnet_key

    fp = json.loads((results / "footprint.json").read_text())
    pp = json.loads((results / "peer_programming.json").read_text())
    traffic = sorted(fp["traffic"].values(), key=lambda t: t["nodes"])
    peers = sorted(fp["peers"].values(), key=lambda p: p["peers"])
    big = str(max(int(k) for k in pp["kernel"]))
    k = pp["kernel"][big]
    rec = fake_record(1)
    return Inputs(
        etcd_bytes_per_node_s=tuple((t["nodes"], t["per_node_mean"]["etcd_Bps"])
                                    for t in traffic),
        gossip_bytes_per_node_s=tuple((t["nodes"], t["per_node_mean"]["gossip_Bps"])
                                      for t in traffic),
        agent_cpu_idle=tuple((p["peers"], p["agent"]["cpu_fraction"]) for p in peers),
        agent_rss_bytes=tuple((p["peers"], float(p["agent"]["rss_bytes"])) for p in peers),
        noop_pass_s=(int(big), k["noop_pass_s"]["median"]),
        first_pass_s=(int(big), k["first_pass_s"]["median"]),
        record_bytes=len(subnet_key("/overlay/", rec.subnet)) + len(rec.to_json()),
    )


def main() -> None:
    from common import machine, write_result

    results = HERE / "results"
    inp = inputs_from_results(results)
    asm = Assumptions()
    doc = {
        "benchmark": "scale_model",
        "machine": machine(),
        "inputs": asdict(inp),
        "assumptions": asdict(asm),
        "assumption_notes": asm.notes(),
        "models": {str(n): model(inp, asm, n) for n in (10, 1000, 5000)},
    }
    write_result("scale_model", doc)


if __name__ == "__main__":
    main()
