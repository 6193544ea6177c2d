#!/usr/bin/env python3
"""Data plane: TCP throughput and ping RTT between pods on two nodes.

Three paths in one sandbox, on the same underlay bridge, measured in turn
(interleaved, so that load from other work on the machine hits all alike):

  underlay   node n1 -> node n2 over eth0, no tunnel (the ceiling)
  reference  a pod -> a pod through an overlay built by hand with `ip`, in
             flannel's layout: pod veth -> cni0 bridge -> routed to a vxlan
             device (nolearning, /32 VTEP address) -> route onlink via the
             peer's VTEP IP, permanent neighbour, FDB entry to the peer host
  overlay    a pod -> a pod through our agents and CNI plugin

With --family ipv6 the pods are IPv6-only, and with --underlay-family ipv6 (the
default then) the hosts' network too, and the reference is the same layout in
IPv6 (flannel's flannel-v6.<VNI>): results go to dataplane_ipv6.json.

Targets: overlay throughput >= 0.97 x reference, overlay RTT <= 1.05 x reference,
each the median over rounds of the ratio between ours and the reference run
back to back in that round (the ratio of the overall medians is recorded too).
Also recorded: each device on both pod paths (MTU, qdisc, GSO/GRO sizes,
VXLAN flags) and every difference between ours and the reference, which is
where to look when a ratio is off.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from common import (
    CpuLoad,
    log,
    machine,
    ratio,
    require_root,
    sandbox,
    sh,
    summary,
    write_result,
)

from overlay.sandbox.sandbox import Sandbox, kill_and_wait

PORT = 5201


@dataclass(frozen=True)
class RefFamily:
    """What the hand-built reference does differently per pod family (flannel.1's layout
    and flannel-v6.1's): addresses, prefix lengths, `ip -6`, no DAD, the forwarding knob."""

    subnet: str  # host i's pod subnet; its network address is the VTEP's address
    vtep_len: int  # the VTEP's own address: a /32 or /128
    ip: tuple[str, ...]  # `ip` options for routes and neighbours
    nodad: tuple[str, ...]  # `ip addr add` options
    forwarding: str

    @property
    def subnet_len(self) -> int:
        return ip_network(self.subnet.format(i=1)).prefixlen

    def addresses(self, i: int) -> tuple[str, str, str]:
        """Host i's VTEP address, its bridge gateway and its pod's address."""
        net = ip_network(self.subnet.format(i=i))
        return str(net.network_address), str(net[1]), str(net[2])


REF4 = RefFamily("10.250.{i}.0/24", 32, (), (), "net.ipv4.ip_forward=1")
REF6 = RefFamily("fd50:0:0:{i}::/64", 128, ("-6",), ("nodad",), "net.ipv6.conf.all.forwarding=1")


def build_reference(sb: Sandbox, mtu: int, fam: RefFamily) -> dict[str, dict[str, str]]:
    """Two hosts with one pod each, joined by a VXLAN overlay made with plain `ip` commands
    as flannel lays it out: VTEP address on the vxlan device, route onlink via the peer's
    VTEP, permanent neighbour entry, FDB entry to the peer host."""
    hosts = [sb.add_outside_host(f"r{i}") for i in (1, 2)]
    info: dict[str, dict[str, str]] = {}
    nodad = "".join(f" {o}" for o in fam.nodad)
    for i, h in enumerate(hosts, start=1):
        vtep_ip, gw, pod_ip = fam.addresses(i)
        mac = f"02:bb:00:00:00:0{i}"
        pod_ns = sb.ns(f"r{i}-p1")
        n = h.netns
        for cmd in (
            f"link add flannel.1 type vxlan id 1 local {h.underlay_ip} dev eth0 dstport 8472 "
            "nolearning",
            f"link set flannel.1 address {mac} mtu {mtu}",
            f"addr add {vtep_ip}/{fam.vtep_len} dev flannel.1{nodad}",
            "link set flannel.1 up",
            "link add cni0 type bridge",
            f"link set cni0 mtu {mtu}",
            f"addr add {gw}/{fam.subnet_len} dev cni0{nodad}",
            "link set cni0 up",
        ):
            sh("ip", "-n", n, *cmd.split())
        sh("ip", "netns", "add", pod_ns)
        sh("ip", "-n", pod_ns, "link", "set", "lo", "up")
        sh("ip", "-n", n, "link", "add", "vethr1", "mtu", str(mtu), "type", "veth", "peer",
           "name", "eth0", "netns", pod_ns, "mtu", str(mtu))
        sh("ip", "-n", n, "link", "set", "vethr1", "master", "cni0", "up")
        # flannel's CNI config turns hairpin mode on (a pod reaching itself via a service)
        sh("ip", "-n", n, "link", "set", "vethr1", "type", "bridge_slave", "hairpin", "on")
        sh("ip", "-n", pod_ns, "addr", "add", f"{pod_ip}/{fam.subnet_len}", "dev", "eth0",
           *fam.nodad)
        sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
        sh("ip", "-n", pod_ns, *fam.ip, "route", "add", "default", "via", gw)
        sb.run_in(n, "sysctl", "-qw", fam.forwarding)
        info[f"r{i}"] = {"host_ns": n, "pod_ns": pod_ns, "pod_ip": pod_ip, "vtep_ip": vtep_ip,
                         "mac": mac, "underlay_ip": h.underlay_ip}
    for me, peer in (("r1", "r2"), ("r2", "r1")):
        n, p = info[me]["host_ns"], info[peer]
        sh("ip", "-n", n, *fam.ip, "route", "add", f"{p['vtep_ip']}/{fam.subnet_len}", "via",
           p["vtep_ip"], "dev", "flannel.1", "onlink")
        sh("ip", "-n", n, *fam.ip, "neigh", "add", p["vtep_ip"], "lladdr", p["mac"], "dev",
           "flannel.1", "nud", "permanent")
        sh("bridge", "-n", n, "fdb", "append", p["mac"], "dev", "flannel.1", "dst",
           p["underlay_ip"], "self", "permanent")
    return info


def parse_ping(text: str) -> list[float]:
    """RTTs in ms from ping's per-reply lines."""
    return [float(m) for m in re.findall(r"time=([0-9.]+) ms", text)]


def parse_iperf(doc: dict[str, Any]) -> dict[str, float]:
    end = doc["end"]
    return {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "sent_gbps": end["sum_sent"]["bits_per_second"] / 1e9,
        "retransmits": float(end["sum_sent"].get("retransmits", 0)),
        "sender_cpu_pct": float(end.get("cpu_utilization_percent", {}).get("host_total", 0.0)),
        "receiver_cpu_pct": float(end.get("cpu_utilization_percent", {}).get("remote_total",
                                                                             0.0)),
    }


def iperf(sb: Sandbox, src_ns: str, dst_ip: str, seconds: int) -> dict[str, float]:
    last = ""
    for _ in range(20):
        p = sb.run_in(src_ns, "iperf3", "-c", dst_ip, "-p", str(PORT), "-t", str(seconds),
                      "-O", "1", "-J", check=False, timeout=seconds + 60)
        out = p.stdout.decode(errors="replace")
        try:
            doc = json.loads(out)
        except ValueError:
            doc = {"error": out[-300:]}
        if p.returncode == 0 and "end" in doc and "error" not in doc:
            return parse_iperf(doc)
        last = str(doc.get("error", out[-300:]))
        time.sleep(0.3)  # the server may still be starting, or busy with the last client
    raise RuntimeError(f"iperf3 from {src_ns} to {dst_ip} failed: {last}")


def iperf_together(sb: Sandbox, runs: dict[str, tuple[str, str]], seconds: int
                   ) -> dict[str, dict[str, float]]:
    """iperf3 on several paths at the same time: they share the CPUs, so whatever the
    machine's load does during the run, it does to all of them alike."""
    procs = {name: subprocess.Popen([*sb.exec_prefix(src), "iperf3", "-c", ip, "-p", str(PORT),
                                     "-t", str(seconds), "-O", "1", "-J"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
             for name, (src, ip) in runs.items()}
    out = {}
    for name, p in procs.items():
        stdout, _ = p.communicate(timeout=seconds + 60)
        doc = json.loads(stdout or b"{}")
        if p.returncode != 0 or "end" not in doc:
            raise RuntimeError(f"concurrent iperf3 on {name} failed: {doc.get('error', '')}")
        out[name] = parse_iperf(doc)
    return out


def ping_together(sb: Sandbox, runs: dict[str, tuple[str, str]], count: int
                  ) -> dict[str, list[float]]:
    """ping on several paths at the same time; RTTs in ms per path."""
    # One ping first: ARP in the pods must not count.
    for src, ip in runs.values():
        sb.run_in(src, "ping", "-n", "-c", "1", "-W", "2", ip, check=False)
    procs = {name: subprocess.Popen([*sb.exec_prefix(src), "ping", "-n", "-c", str(count), "-i",
                                     "0.01", "-W", "1", ip], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL)
             for name, (src, ip) in runs.items()}
    out = {}
    for name, p in procs.items():
        stdout, _ = p.communicate(timeout=count * 0.05 + 30)
        rtts = parse_ping(stdout.decode(errors="replace"))
        if len(rtts) < count * 0.9:
            raise RuntimeError(f"ping on {name}: only {len(rtts)}/{count} replies")
        out[name] = rtts
    return out


def link_facts(ns: str, dev: str) -> dict[str, Any]:
    doc = json.loads(sh("ip", "-n", ns, "-d", "-j", "link", "show", "dev", dev).stdout)[0]
    li = doc.get("linkinfo", {})
    facts = {k: doc.get(k) for k in ("mtu", "qdisc", "txqlen", "gso_max_size", "gso_max_segs",
                                      "gro_max_size", "tso_max_size", "num_tx_queues")}
    facts["kind"] = li.get("info_kind", "")
    data = li.get("info_data", {})
    if facts["kind"] == "vxlan":
        for k in ("learning", "udp_csum", "ttl", "port", "ageing", "l2miss", "l3miss", "gbp"):
            if k in data:
                facts[f"vxlan_{k}"] = data[k]
    if li.get("info_slave_kind") == "bridge":
        sd = li.get("info_slave_data", {})
        for k in ("hairpin", "learning", "neigh_suppress", "isolated"):
            if k in sd:
                facts[f"port_{k}"] = sd[k]
    return facts


SYSCTL_KEYS = re.compile(r"^net\.(core\.|ipv4\.(conf\.(all|default)\.|tcp_|ip_|udp_)|"
                         r"netfilter\.|bridge\.)")
# Differ between any two namespaces without changing a packet's path.
SYSCTL_NOISE = re.compile(r"(hash_secret|_seed|netfilter\.nf_conntrack_count|"
                          r"\.core\.netdev_rss_key|ipv4\.ip_local_reserved_ports)")


def ns_facts(ns: str) -> dict[str, Any]:
    """nftables tables and the namespace's network sysctls (not per-device ones)."""
    rules = sh("ip", "netns", "exec", ns, "nft", "list", "ruleset", check=False).stdout
    facts: dict[str, Any] = {"nft_tables": re.findall(r"^table (\S+ \S+)", rules, re.M)}
    out = sh("ip", "netns", "exec", ns, "sysctl", "-a", check=False).stdout
    for line in out.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and SYSCTL_KEYS.match(key) and not SYSCTL_NOISE.search(key):
            facts[key] = value.strip()
    return facts


def bridge_port(ns: str) -> str:
    """The veth on cni0 (the pod's host side)."""
    doc = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "master", "cni0").stdout)
    return str(doc[0]["ifname"])


def path_devices(host_ns: str, pod_ns: str, vxlan: str) -> dict[str, Any]:
    return {
        "pod eth0": link_facts(pod_ns, "eth0"),
        "host veth": link_facts(host_ns, bridge_port(host_ns)),
        "bridge cni0": link_facts(host_ns, "cni0"),
        "vxlan device": link_facts(host_ns, vxlan),
        "underlay eth0": link_facts(host_ns, "eth0"),
        "host netns": ns_facts(host_ns),
        "pod netns": ns_facts(pod_ns),
    }


def differences(ours: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    out = []
    for role, facts in ours.items():
        other = ref.get(role, {})
        for k in sorted(set(facts) | set(other)):
            if facts.get(k) != other.get(k):
                out.append(f"{role}: {k} = {facts.get(k)!r} (ours) vs {other.get(k)!r} (reference)")
    return out


def round_order(k: int) -> list[str]:
    """Path order in round k: ours and the reference always back to back, each first in
    turn, the underlay before or after them."""
    pair = ["reference", "overlay"] if k % 2 == 0 else ["overlay", "reference"]
    return ["underlay", *pair] if (k // 2) % 2 == 0 else [*pair, "underlay"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10, help="iperf3 duration per run")
    ap.add_argument("--reps", type=int, default=5, help="rounds (each runs every path once)")
    ap.add_argument("--pings", type=int, default=1000, help="pings per path and round")
    ap.add_argument("--together", type=int, default=3,
                    help="extra runs of ours and the reference at the same time")
    ap.add_argument("--family", choices=("ipv4", "ipv6"), default="ipv4",
                    help="the pods' address family (default: %(default)s)")
    ap.add_argument("--underlay-family", choices=("ipv4", "ipv6"), default=None,
                    help="the hosts' network (default: the pods' family)")
    args = ap.parse_args()
    require_root()
    t_start = time.monotonic()
    v6 = args.family == "ipv6"
    underlay6 = (args.underlay_family or args.family) == "ipv6"
    with sandbox("bdp", nodes=2, pods_per_node=1, ip_family=args.family,
                 underlay_family=6 if underlay6 else 4) as sb:
        st = sb.st
        pods = {p.node: p for p in st.pods}
        mtu = int(sb.status("n1").mtu)
        ref = build_reference(sb, mtu, REF6 if v6 else REF4)
        n1, n2 = sb.node("n1"), sb.node("n2")
        paths = {
            "underlay": (n1.netns, n2.netns, n2.underlay_ip),
            "reference": (ref["r1"]["pod_ns"], ref["r2"]["pod_ns"], ref["r2"]["pod_ip"]),
            "overlay": (pods["n1"].netns, pods["n2"].netns,
                        pods["n2"].ip6 if v6 else pods["n2"].ip),
        }
        for name, (src, _dst, ip) in paths.items():
            if not sb.ping(src, ip, count=1, timeout=2) and not sb.ping(src, ip, timeout=2):
                raise RuntimeError(f"{name}: {src} cannot reach {ip}")
        devices = {
            "overlay": path_devices(n1.netns, pods["n1"].netns, sb.vxlan_device),
            "reference": path_devices(ref["r1"]["host_ns"], ref["r1"]["pod_ns"], "flannel.1"),
        }
        servers = []
        try:
            for _name, (_src, dst, ip) in paths.items():
                servers.append(subprocess.Popen(
                    [*sb.exec_prefix(dst), "iperf3", "-s", "-p", str(PORT), "-B", ip],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            names = list(paths)
            tput: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            rtt_runs: dict[str, list[list[float]]] = {n: [] for n in names}
            load: dict[str, list[float]] = {n: [] for n in names}
            loadavg: dict[str, list[float]] = {n: [] for n in names}
            for rep in range(args.reps):
                order = round_order(rep)
                for name in order:
                    src, _dst, ip = paths[name]
                    loadavg[name].append(round(os.getloadavg()[0], 2))
                    cpu = CpuLoad()
                    r = iperf(sb, src, ip, args.seconds)
                    load[name].append(cpu.busy())
                    tput[name].append(r)
                    log(f"  round {rep + 1} {name:9s} {r['gbps']:6.2f} Gbit/s "
                        f"(retransmits {r['retransmits']:.0f}; machine busy "
                        f"{load[name][-1]:.0%}, load average before {loadavg[name][-1]})")
                # Pings are light: all paths at once, so each sees the same machine.
                got = ping_together(sb, {n: (paths[n][0], paths[n][2]) for n in order},
                                    args.pings)
                for name in order:
                    rtt_runs[name].append(got[name])
                log(f"  round {rep + 1} RTT medians (ms): " + ", ".join(
                    f"{n} {statistics.median(got[n]):.3f}" for n in names))
            # Supplementary, drift-free: ours and the reference at the same time.
            together = []
            for rep in range(args.together):
                pair = ["reference", "overlay"] if rep % 2 == 0 else ["overlay", "reference"]
                r2 = iperf_together(sb, {n: (paths[n][0], paths[n][2]) for n in pair},
                                    args.seconds)
                together.append(round(r2["overlay"]["gbps"] / r2["reference"]["gbps"], 3))
                log(f"  together {rep + 1}: overlay {r2['overlay']['gbps']:.2f}, reference "
                    f"{r2['reference']['gbps']:.2f} Gbit/s (ratio {together[-1]})")
        finally:
            for s in servers:
                kill_and_wait(s, signal.SIGTERM, 5)

    gbps = {n: summary([r["gbps"] for r in tput[n]]) for n in tput}
    rtt = {n: summary([x for run in rtt_runs[n] for x in run]) for n in rtt_runs}
    for n in rtt:
        rtt[n]["run_medians"] = [sorted(run)[len(run) // 2] for run in rtt_runs[n]]
        del rtt[n]["values"]
    # The target figures pair each round's runs of ours and the reference, which ran
    # back to back: drift in the machine's load cancels within a pair, not across rounds.
    paired = [round(a["gbps"] / b["gbps"], 3) for a, b in zip(tput["overlay"], tput["reference"],
                                                              strict=True)]
    rtt_paired = [round(a / b, 3) for a, b in zip(rtt["overlay"]["run_medians"],
                                                  rtt["reference"]["run_medians"], strict=True)]
    t_ratio = round(statistics.median(paired), 3)
    r_ratio = round(statistics.median(rtt_paired), 3)
    name = "dataplane_ipv6" if v6 else "dataplane"
    tid = "dataplane6" if v6 else "dataplane"
    fam = (f"IPv6 pods over an IPv{6 if underlay6 else 4} underlay, " if v6 else "")
    doc = {
        "benchmark": name,
        "machine": machine(),
        "config": {"iperf_seconds": args.seconds, "iperf_omit_seconds": 1, "reps": args.reps,
                   "together_runs": args.together,
                   "pings_per_rep": args.pings, "ping_interval_s": 0.01, "mtu": mtu,
                   "streams": 1, "pod_family": args.family,
                   "underlay_family": "ipv6" if underlay6 else "ipv4"},
        "throughput_gbps": gbps,
        "iperf_runs": tput,
        "rtt_ms": rtt,
        "machine_busy_during_iperf": load,
        "loadavg_before_iperf": loadavg,
        "ratios": {
            "throughput_overlay_vs_reference": t_ratio,
            "throughput_overlay_vs_reference_of_medians": ratio(gbps["overlay"]["median"],
                                                                gbps["reference"]["median"]),
            "throughput_overlay_vs_underlay": ratio(gbps["overlay"]["median"],
                                                    gbps["underlay"]["median"]),
            "throughput_reference_vs_underlay": ratio(gbps["reference"]["median"],
                                                      gbps["underlay"]["median"]),
            "throughput_overlay_vs_reference_per_rep": paired,
            "throughput_overlay_vs_reference_together": together,
            "throughput_overlay_vs_reference_together_median": (
                round(statistics.median(together), 3) if together else None),
            "rtt_overlay_vs_reference": r_ratio,
            "rtt_overlay_vs_reference_per_rep": rtt_paired,
            "rtt_overlay_vs_reference_of_medians": ratio(rtt["overlay"]["median"],
                                                         rtt["reference"]["median"]),
            "rtt_overlay_vs_underlay": ratio(rtt["overlay"]["median"], rtt["underlay"]["median"]),
        },
        "targets": [
            {"id": f"{tid}.throughput", "what": f"{fam}pod-to-pod TCP throughput vs "
             "hand-built reference overlay (median over rounds of back-to-back pairs)",
             "ratio": t_ratio, "op": ">=", "threshold": 0.97,
             "met": t_ratio is not None and t_ratio >= 0.97},
            {"id": f"{tid}.rtt", "what": f"{fam}pod-to-pod ping RTT vs hand-built reference "
             "overlay (median RTT, median over rounds of pairs)", "ratio": r_ratio,
             "op": "<=", "threshold": 1.05, "met": r_ratio is not None and r_ratio <= 1.05},
        ],
        "devices": devices,
        "differences": differences(devices["overlay"], devices["reference"]),
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    write_result(name, doc)
    print(json.dumps({"throughput_ratio": t_ratio, "rtt_ratio": r_ratio,
                      "gbps": {n: round(g["median"], 2) for n, g in gbps.items()},
                      "rtt_ms": {n: round(r["median"], 4) for n, r in rtt.items()}}))


if __name__ == "__main__":
    main()
