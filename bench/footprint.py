#!/usr/bin/env python3
"""Footprint: agent RSS and CPU at idle, and the traffic each node causes.

  peers     one node with 10, then 5000 fake peer leases in etcd: the agent's
            resident memory and CPU over an idle window, at the production
            reconcile interval (10 s), and etcd's own RSS and CPU beside it.
            The fake peers have no gRPC address: this is the data plane's cost
            (routes, neighbours, FDB entries, the periodic pass), without the
            membership protocol
  traffic   clusters of 3, 10 and 50 real nodes at idle (real agents, each
            probing the others over gRPC: the membership's cost at the largest
            size that fits this machine, see bench/scale.py): per node and
            second, the bytes exchanged with etcd and with other nodes (gossip;
            VXLAN excluded), counted by nftables counters inside each node's
            namespace; cross-checked with the etcd host's underlay port and
            etcd's own metrics (client bytes, requests by method, writes); each
            agent's CPU and RSS

The cluster sizes give a per-node cost and its growth with the cluster,
which is what bench/scale_model.py extrapolates from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
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
    write_result,
)
from fakepeers import CIDR

from overlay.sandbox.sandbox import Sandbox

AGENT_ARGS: list[str] = []  # the production defaults (periodic pass every 10 s)

NFT = """
table inet ovbench {{
  counter etcd_rx {{}}
  counter etcd_tx {{}}
  counter vxlan_rx {{}}
  counter vxlan_tx {{}}
  counter peer_rx {{}}
  counter peer_tx {{}}
  chain in {{
    type filter hook input priority -300; policy accept;
    ip saddr {etcd} counter name etcd_rx accept
    udp dport {vxlan} counter name vxlan_rx accept
    ip saddr {nodes} counter name peer_rx accept
  }}
  chain out {{
    type filter hook output priority -300; policy accept;
    ip daddr {etcd} counter name etcd_tx accept
    udp dport {vxlan} counter name vxlan_tx accept
    ip daddr {nodes} counter name peer_tx accept
  }}
}}
"""

ETCD_METRICS = {
    "client_rx_bytes": ("etcd_network_client_grpc_received_bytes_total", None),
    "client_tx_bytes": ("etcd_network_client_grpc_sent_bytes_total", None),
    "proposals_committed": ("etcd_server_proposals_committed_total", None),
    "puts": ("etcd_mvcc_put_total", None),
    "txns": ("etcd_mvcc_txn_total", None),
    "ranges": ("etcd_mvcc_range_total", None),
    "watch_events": ("etcd_debugging_mvcc_events_total", None),
    "keepalives": ("grpc_server_msg_received_total", 'grpc_method="LeaseKeepAlive"'),
    "range_requests": ("grpc_server_msg_received_total", 'grpc_method="Range"'),
    "txn_requests": ("grpc_server_msg_received_total", 'grpc_method="Txn"'),
    "watch_messages_sent": ("grpc_server_msg_sent_total", 'grpc_method="Watch"'),
}


def parse_prometheus(text: str) -> dict[str, float]:
    """Values of ETCD_METRICS (summed over matching label sets) from a /metrics page."""
    out = dict.fromkeys(ETCD_METRICS, 0.0)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        for key, (metric, want) in ETCD_METRICS.items():
            if name == metric and (want is None or want in labels):
                with contextlib.suppress(ValueError):
                    out[key] += float(value)
    return out


def etcd_metrics(sb: Sandbox) -> dict[str, float]:
    return parse_prometheus(http_get(sb, sb.st.etcd[0].netns, "http://127.0.0.1:2379/metrics"))


def counters(ns: str) -> dict[str, int]:
    doc = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "list", "counters", "table",
                        "inet", "ovbench").stdout)
    return {c["counter"]["name"]: int(c["counter"]["bytes"])
            for c in doc["nftables"] if "counter" in c}


def port_bytes(sb: Sandbox, port: str) -> int:
    doc = json.loads(sh("ip", "-n", sb.st.underlay, "-s", "-j", "link", "show", port).stdout)[0]
    s = doc["stats64"]
    return int(s["rx"]["bytes"]) + int(s["tx"]["bytes"])


def idle_agents(sb: Sandbox, window: float) -> dict[str, Any]:
    """CPU and RSS of every agent and of etcd over `window` seconds of idle."""
    procs = {h.name: h.pid for h in (*sb.st.nodes, *sb.st.etcd)}
    c0 = {n: proc_cpu_seconds(p) for n, p in procs.items()}
    t0 = time.monotonic()
    time.sleep(window)
    dt = time.monotonic() - t0
    out = {}
    for n, p in procs.items():
        out[n] = {"cpu_fraction": round((proc_cpu_seconds(p) - c0[n]) / dt, 4),
                  "rss_bytes": proc_rss_bytes(p)}
    return out


def cluster_traffic(size: int, window: float, settle: float) -> dict[str, Any]:
    with sandbox("bfp", nodes=size, pods_per_node=1, agent_args=AGENT_ARGS) as sb:
        rules = NFT.format(etcd="172.30.0.0/24", nodes="172.30.1.0/24", vxlan=sb.st.port)
        for h in sb.st.nodes:
            sh("ip", "netns", "exec", h.netns, "nft", "-f", "-", input=rules.encode())
        time.sleep(settle)
        cpu = CpuLoad()
        before = {h.name: counters(h.netns) for h in sb.st.nodes}
        port0 = port_bytes(sb, "u-etcd1")
        m0 = etcd_metrics(sb)
        procs = idle_agents(sb, window)
        m1 = etcd_metrics(sb)
        port1 = port_bytes(sb, "u-etcd1")
        after = {h.name: counters(h.netns) for h in sb.st.nodes}
        busy = cpu.busy()
    per_node = {}
    for name in before:
        d = {k: (after[name][k] - before[name][k]) / window for k in before[name]}
        per_node[name] = {
            "etcd_Bps": d["etcd_rx"] + d["etcd_tx"], "etcd_rx_Bps": d["etcd_rx"],
            "etcd_tx_Bps": d["etcd_tx"], "gossip_Bps": d["peer_rx"] + d["peer_tx"],
            "gossip_rx_Bps": d["peer_rx"], "gossip_tx_Bps": d["peer_tx"],
            "vxlan_Bps": d["vxlan_rx"] + d["vxlan_tx"],
        }
    n = len(per_node)

    def mean(key: str) -> float:
        return sum(v[key] for v in per_node.values()) / n

    rates = {k: (m1[k] - m0[k]) / window for k in m0}
    agents = {k: v for k, v in procs.items() if not k.startswith("etcd")}
    return {
        "nodes": size,
        "window_s": window,
        "per_node_mean": {k: round(mean(k), 2) for k in next(iter(per_node.values()))},
        "per_node": per_node,
        "etcd_port_Bps_per_node": round((port1 - port0) / window / n, 2),
        "etcd_rates_per_s": {k: round(v, 4) for k, v in rates.items()},
        "etcd_rates_per_node_per_s": {k: round(v / n, 5) for k, v in rates.items()},
        "agents": agents,
        "agent_cpu_mean": round(sum(a["cpu_fraction"] for a in agents.values()) / n, 4),
        "agent_rss_mean": int(sum(a["rss_bytes"] for a in agents.values()) / n),
        "etcd": procs.get("etcd1"),
        "machine_busy": busy,
    }


def peers_footprint(counts: list[int], window: float, settle: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with sandbox("bfq", nodes=0, pods_per_node=0, cidr=CIDR, agent_args=AGENT_ARGS) as sb:
        have = 0
        for i, n in enumerate(sorted(counts), start=1):
            python_in(sb, sb.st.etcd[0].netns, "fakepeers.py", "put", "--count", str(n),
                      "--start", str(have + 1))
            have = n
            name = f"n{i}"
            sb.add_node(name, wait=True)
            # Wait until every peer is in the kernel (ready = first reconcile done).
            routes = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                routes = len(sh("ip", "-n", sb.node(name).netns, "route", "show", "proto",
                                "159").stdout.splitlines())
                if routes >= n:
                    break
                time.sleep(0.2)
            time.sleep(settle)
            cpu = CpuLoad()
            procs = idle_agents(sb, window)
            out[str(n)] = {"peers": n, "routes_in_kernel": routes, "agent": procs[name],
                           "etcd": procs["etcd1"], "machine_busy": cpu.busy()}
            log(f"  {n} peers: agent CPU {procs[name]['cpu_fraction']:.1%} of a core, RSS "
                f"{procs[name]['rss_bytes'] / 2**20:.1f} MiB (etcd RSS "
                f"{procs['etcd1']['rss_bytes'] / 2**20:.1f} MiB)")
            remove_node(sb, name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="10,5000", help="fake peer counts for RSS and CPU")
    ap.add_argument("--sizes", default="3,10,50", help="cluster sizes for traffic")
    ap.add_argument("--window", type=float, default=30, help="idle window, seconds")
    ap.add_argument("--settle", type=float, default=5, help="seconds before each window")
    args = ap.parse_args()
    require_root()
    t_start = time.monotonic()
    peers = peers_footprint([int(x) for x in args.peers.split(",")], args.window / 2,
                            args.settle)
    traffic = {}
    for size in (int(x) for x in args.sizes.split(",")):
        t = cluster_traffic(size, args.window, args.settle)
        traffic[str(size)] = t
        pm = t["per_node_mean"]
        log(f"  {size} nodes idle, per node: etcd {pm['etcd_Bps']:.0f} B/s, gossip "
            f"{pm['gossip_Bps']:.0f} B/s; agent CPU {t['agent_cpu_mean']:.2%}, RSS "
            f"{t['agent_rss_mean'] / 2**20:.1f} MiB")
    counts = sorted(peers, key=int)
    lo, hi = peers[counts[0]], peers[counts[-1]]
    doc = {
        "benchmark": "footprint",
        "machine": machine(),
        "peers": peers,
        "traffic": traffic,
        "ratios": {
            f"rss_{counts[-1]}_vs_{counts[0]}_peers": ratio(hi["agent"]["rss_bytes"],
                                                            lo["agent"]["rss_bytes"]),
            f"cpu_{counts[-1]}_vs_{counts[0]}_peers": ratio(hi["agent"]["cpu_fraction"],
                                                            lo["agent"]["cpu_fraction"]),
            f"agent_rss_vs_etcd_rss_{counts[0]}_peers": ratio(lo["agent"]["rss_bytes"],
                                                              lo["etcd"]["rss_bytes"]),
        },
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    write_result("footprint", doc)
    print(json.dumps({k: {"cpu": v["agent"]["cpu_fraction"], "rss_mib":
                          round(v["agent"]["rss_bytes"] / 2**20, 1)} for k, v in peers.items()}))


if __name__ == "__main__":
    main()
