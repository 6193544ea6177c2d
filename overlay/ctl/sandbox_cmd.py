"""`overlayctl sandbox up|check|status|down` (the lab commands: lab_cmd.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from overlay import cli
from overlay.ctl import render
from overlay.errors import ConfigError
from overlay.sandbox.sandbox import Sandbox, SandboxError, tail


def progress(msg: str) -> None:
    print(msg, flush=True)


def sandbox_cmd(args: argparse.Namespace) -> int:
    from overlay.ctl import lab_cmd

    if args.sb_cmd in lab_cmd.LAB_COMMANDS:
        return lab_cmd.run(args)
    try:
        return _run(args)
    except SandboxError as exc:
        print(f"\nFAILED at step: {exc.step}\n  {exc.message}", file=sys.stderr)
        if exc.log:
            print("---- log ----", file=sys.stderr)
            print(exc.log, file=sys.stderr)
            print("-------------", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    sb = Sandbox(args.name, progress=progress)
    if args.sb_cmd == "up":
        check_up(sb, args)
        extra = "" if args.ip_family == "ipv4" and args.underlay_family == "ipv4" else \
            f", {args.ip_family} pods over an {args.underlay_family} underlay"
        if args.underlay_segments > 1:
            extra += f", {args.underlay_segments} routed underlay segments"
        if args.direct_routing:
            extra += ", DirectRouting"
        print(f"sandbox {args.name}: {args.nodes} nodes x {args.pods_per_node} pods, "
              f"{args.etcd_members} etcd member(s){extra}", flush=True)
        if args.dry_run:
            hosts = ["ul", *(f"etcd{i}" for i in range(1, args.etcd_members + 1)),
                     *(f"n{i}" for i in range(1, args.nodes + 1))]
            print(f"would create namespaces {', '.join(sb.ns(h) for h in hosts)} and "
                  f"{args.nodes * args.pods_per_node} pod namespaces, cluster {args.cidr} "
                  f"with a /{args.subnet_len} per node, files in {sb.dir} (dry run: "
                  "nothing made)")
            return 0
        try:
            sb.up(args.nodes, args.pods_per_node, etcd_members=args.etcd_members,
                  cidr=args.cidr, subnet_len=args.subnet_len, tls=args.tls,
                  etcd_tls=args.etcd_tls, ip_family=args.ip_family,
                  underlay_family=6 if args.underlay_family == "ipv6" else 4,
                  segments=args.underlay_segments, cidr6=args.ipv6_cidr,
                  subnet_len6=args.ipv6_subnet_len, direct_routing=args.direct_routing,
                  agent_args=[] if args.lease_ttl is None else ["--lease-ttl",
                                                                str(args.lease_ttl)])
        except (SandboxError, KeyboardInterrupt):
            print(f"(the partial sandbox is left for inspection; remove it with "
                  f"`overlayctl sandbox down --name {args.name}`)", file=sys.stderr)
            raise
        return 0
    if args.sb_cmd == "down":
        existed = sb.state is not None
        sb.down()
        print(f"sandbox {args.name} removed" if existed else
              f"sandbox {args.name}: nothing recorded; removed any leftover namespaces")
        return 0
    if args.sb_cmd == "check":
        return check(sb)
    if args.sb_cmd == "status":
        return status(sb, args.json)
    raise AssertionError(args.sb_cmd)


def check_up(sb: Sandbox, args: argparse.Namespace) -> None:
    """Everything `sandbox up` can refuse before it makes anything."""
    from overlay.model import NetworkConfig, parse_cidr

    with cli.flag_names({"Network": "--cidr", "SubnetLen": "--subnet-len"}):
        cfg = NetworkConfig(parse_cidr(args.cidr, "--cidr"), subnet_len=args.subnet_len)
    room = 2 ** (32 - cfg.subnet_len) - 3  # network, gateway, broadcast
    if args.pods_per_node > room:
        raise ConfigError("--pods-per-node", f"{args.pods_per_node} pods do not fit in a "
                          f"/{cfg.subnet_len} per node (at most {room})")
    if args.nodes > cfg.subnet_count:
        raise ConfigError("--nodes", f"{args.nodes} nodes need more than the "
                          f"{cfg.subnet_count} subnets of /{cfg.subnet_len} in {cfg.network}")
    if sb.state is not None:
        raise SandboxError("up", f"sandbox {sb.name!r} already exists; run "
                           f"`overlayctl sandbox down --name {sb.name}` first")


def check(sb: Sandbox) -> int:
    """One ping matrix per pod address family."""
    pods = sb.st.pods
    if len(pods) < 2:
        print("connectivity: fewer than two pods, nothing to check")
        return 1
    families = sb.st.pod_families
    bad = 0
    for fam in families:
        if len(families) > 1:
            print(f"IPv{fam}:")
        bad += _matrix(sb, fam, "" if len(families) == 1 else f"IPv{fam} ")
    return 1 if bad else 0


def _matrix(sb: Sandbox, family: int, label: str) -> int:
    pods = [p for p in sb.st.pods if p.address(family)]
    results, ok, total = sb.check(family=family)
    matrix = {(a.name, b.name): good for a, b, good in results}
    names = [p.name for p in pods]
    w = max(len(n) for n in names)
    print("from \\ to".ljust(w) + "  " + "  ".join(n.rjust(w) for n in names))
    for a in names:
        cells = []
        for b in names:
            cells.append("-" if a == b else ("ok" if matrix[(a, b)] else "FAIL"))
        print(a.ljust(w) + "  " + "  ".join(c.rjust(w) for c in cells))
    for pa, pb, good in results:
        if not good:
            print(f"unreachable: {pa.name} ({pa.address(family)}, node {pa.node}) -> {pb.name} "
                  f"({pb.address(family)}, node {pb.node})")
    print(f"{label}connectivity: {ok}/{total} pod pairs reachable")
    return 0 if ok == total else 1


def status_doc(sb: Sandbox) -> dict[str, Any]:
    from overlay.agent.localclient import status_json

    st = sb.st
    nodes = []
    for h in st.nodes:
        d: dict[str, Any] = {
            "name": h.name, "namespace": h.netns, "underlayIP": h.underlay_ip, "pid": h.pid,
            "conflist": str(sb.conflist_path(h.name)), "cniPath": sb.cni_path(),
            "agentSocket": str(sb.agent_socket(h.name)), "cniSocket": str(sb.cni_socket(h.name)),
            "log": h.log, "subnet": None, "ipv6Subnet": None, "ready": False, "peers": [],
        }
        try:
            s = status_json(sb.status(h.name))
            d.update(subnet=s["node"]["subnet"], ipv6Subnet=s["node"]["ipv6Subnet"],
                     ready=s["ready"], vtepMAC=s["node"]["vtepMAC"],
                     mtu=s["mtu"], peers=s["peers"], conditions=s["conditions"],
                     degraded=s["degraded"])
        except Exception as exc:
            d["error"] = f"agent not answering: {str(exc).splitlines()[0][:160]}"
        nodes.append(d)
    return {
        "name": st.name, "dir": st.dir, "underlayNamespace": st.underlay,
        "etcd": [{"name": h.name, "namespace": h.netns, "endpoint": f"http://{h.underlay_ip}:2379",
                  "pid": h.pid} for h in st.etcd],
        "etcdEndpoints": sb.etcd_endpoints(),
        "clusterCIDR": ",".join(([st.cidr] if 4 in st.pod_families else [])
                                + ([st.cidr6] if 6 in st.pod_families else [])),
        "ipFamily": st.ip_family, "underlayFamily": f"ipv{st.underlay_family}",
        "underlaySegments": st.segments, "directRouting": st.direct_routing,
        "nodes": nodes,
        "pods": [{"name": p.name, "node": p.node, "namespace": p.netns, "ip": p.ip,
                  "ipv6": p.ip6 or None, "containerID": p.container_id, "ifname": p.ifname}
                 for p in st.pods],
    }


def status(sb: Sandbox, as_json: bool) -> int:
    doc = status_doc(sb)
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print_status(doc)
    return 0


def print_status(doc: Mapping[str, Any], out: TextIO | None = None) -> None:
    """The tables of `sandbox status`, from its --json document."""
    out = out or sys.stdout
    print(f"sandbox {doc['name']}: etcd {doc['etcdEndpoints']}, cluster {doc['clusterCIDR']}",
          file=out)
    rows: list[tuple[str, ...]] = [
        ("NODE", "NAMESPACE", "UNDERLAY", "SUBNET", "READY", "PEERS (programmed)")]
    for n in doc["nodes"]:
        prog = sum(1 for p in n["peers"] if p["programmed"])
        subnets = render.subnets_text(n["subnet"], n.get("ipv6Subnet"))
        rows.append((n["name"], n["namespace"], n["underlayIP"], subnets,
                     "yes" if n["ready"] else "no", f"{len(n['peers'])} ({prog})"))
    render.print_table(rows, out)
    for n in doc["nodes"]:
        if n.get("error"):
            print(f"{n['name']}: {n['error']} (log: {n['log']}, last lines below)", file=out)
            print(tail(Path(n["log"]), 5), file=out)
    print(file=out)
    rows = [("PEERS SEEN FROM", *render.PEER_HEADER)]
    for n in doc["nodes"]:
        for p in n["peers"]:
            rows.append((n["name"], *render.peer_row(p)))
    render.print_table(rows, out)
    print(file=out)
    rows = [("POD", "NODE", "IP", "NAMESPACE")]
    rows += [(p["name"], p["node"], render.subnets_text(p["ip"], p["ipv6"]), p["namespace"])
             for p in doc["pods"]]
    render.print_table(rows, out)
