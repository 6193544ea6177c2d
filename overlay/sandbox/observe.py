"""Looks at a sandbox the way an operator would, without asking the agent.

etcdctl for the leases, `ip` and `bridge` inside each node's namespace for
devices, addresses and entries, the IPAM files for allocations, `ip` inside
each pod, ping between pods, /proc for the processes. The result is an
`invariants.Observation`; `invariants.violations()` judges it.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from ipaddress import ip_network
from typing import Any

from overlay.devnames import BRIDGE_NAME, HOST_VETH_RE
from overlay.sandbox.invariants import Lease, NodeView, Observation, PodView
from overlay.sandbox.sandbox import Host, Pod, Sandbox, pid_alive

PREFIX = "/overlay/subnets/"
SEP = "@@overlay-observe@@"


def process_state(pid: int) -> str:
    """'running', 'stopped' (SIGSTOP) or 'not running', from /proc."""
    if not pid_alive(pid):
        return "not running"
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "not running"
    return "stopped" if code in ("T", "t") else "running"


def agent_state(sb: Sandbox, node: str) -> str:
    """process_state of the node's agent, or 'powered off' (mid-reboot)."""
    if node in sb.st.powered_off:
        return "powered off"
    return process_state(sb.node(node).pid)


def etcd_leases(sb: Sandbox) -> tuple[list[Lease], str]:
    """The lease keys and their records, read with etcdctl; ([], why) if etcd did not answer."""
    try:
        p = sb.etcdctl("--command-timeout=3s", "get", "--prefix", PREFIX, "-w", "json",
                       check=False)
    except Exception as exc:  # a timeout of the command itself
        return [], f"{type(exc).__name__}: {exc}"
    if p.returncode != 0:
        return [], (p.stderr.decode(errors="replace").strip().splitlines() or ["failed"])[-1]
    try:
        doc = json.loads(p.stdout)
    except ValueError:
        return [], "etcdctl printed no JSON"
    out = []
    for kv in doc.get("kvs") or []:
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        raw = base64.b64decode(kv.get("value", ""))
        lease_id = int(kv.get("lease", 0))
        try:
            rec = json.loads(raw)
            subnet = key_subnet(key, rec)
            out.append(Lease(key, str(rec["node"]), subnet,
                             str(rec.get("underlayIP", "")), str(rec.get("vtepMAC", "")),
                             lease_id))
        except (ValueError, KeyError, TypeError) as exc:
            out.append(Lease(key, "", "", lease_id=lease_id,
                             error=f"{type(exc).__name__}: {exc}: {raw[:200]!r}"))
    return out, ""


def key_subnet(key: str, rec: dict[str, Any]) -> str:
    """The subnet a lease key holds: /overlay/subnets/10.244.1.0-24, or a dual-stack
    record's IPv6 claim /overlay/subnets/fd00:0:0:1::-64 (the same record under both).
    Read from the key and checked against the value by hand, not with the agent's code;
    ValueError if the value names neither."""
    addr, _, length = key.removeprefix(PREFIX).rpartition("-")
    net = ip_network(f"{addr}/{length}")
    named = [ip_network(str(rec[k])) for k in ("subnet", "ipv6Subnet") if rec.get(k)]
    if net not in named:
        raise ValueError(f"key {key} holds {net}, the value names "
                         f"{', '.join(map(str, named)) or 'no subnet'}")
    return str(net)


def _json(text: str) -> list[dict[str, Any]]:
    text = text.strip()
    if not text:
        return []
    try:
        return list(json.loads(text))
    except ValueError:
        return []


def _global(link: dict[str, Any]) -> tuple[str, ...]:
    return tuple(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                 if a.get("scope") == "global" and "local" in a)


def node_view(sb: Sandbox, h: Host) -> NodeView:
    state = agent_state(sb, h.name)
    if state == "powered off":
        return NodeView(h.name, state, error="powered off")
    dev = sb.vxlan_device
    # `ip route` lists IPv4 only unless told; `ip neigh` both families.
    script = (f"ip -j -d addr show; echo {SEP}; ip -j route show dev {dev}; echo {SEP}; "
              f"ip -j -6 route show dev {dev}; echo {SEP}; "
              f"ip -j neigh show dev {dev}; echo {SEP}; bridge -j fdb show dev {dev}")
    try:
        p = sb.run_in(h.netns, "sh", "-c", script, check=False, timeout=20)
    except Exception as exc:
        return NodeView(h.name, state, error=f"{type(exc).__name__}: {exc}")
    parts = p.stdout.decode(errors="replace").split(SEP)
    if len(parts) != 5:
        return NodeView(h.name, state, error=p.stderr.decode(errors="replace").strip()[:300]
                        or "no output")
    links, routes4, routes6, neighs, fdb = (_json(x) for x in parts)
    routes = [r for r in (*routes4, *routes6)  # the kernel's own link-local route is no peer
              if not str(r.get("dst", "")).startswith("fe80::")]
    by_name = {link["ifname"]: link for link in links}
    bridge, vxlan = by_name.get(BRIDGE_NAME, {}), by_name.get(dev, {})
    veths = tuple(sorted((link["ifname"], str(link.get("master") or ""))
                         for link in links if HOST_VETH_RE.match(link["ifname"])))
    return NodeView(
        h.name, state, bridge_addrs=_global(bridge), vxlan_addrs=_global(vxlan), veths=veths,
        allocations=allocations(sb, h.name),
        routes=tuple(sorted(str(r["dst"]) for r in routes if "/" in str(r.get("dst", "")))),
        neighs=tuple(sorted((str(n["dst"]), str(n.get("lladdr", ""))) for n in neighs
                            if "PERMANENT" in (n.get("state") or []))),
        fdb=tuple(sorted((str(f["mac"]), str(f["dst"])) for f in fdb if f.get("dst"))))


def allocations(sb: Sandbox, node: str) -> tuple[tuple[str, str], ...]:
    """(address, container id) of every allocation file of the node's IPAM."""
    out = []
    for d in sorted((sb.node_dir(node) / "run").glob("ipam*/ip")):
        for f in sorted(d.iterdir()):
            try:
                cid = f.read_text().split("\n")[0]
            except OSError:
                continue
            out.append((f.name, cid))
    return tuple(out)


def pod_view(sb: Sandbox, pod: Pod) -> PodView:
    recorded = tuple(str(ip["address"]).split("/")[0]
                     for ip in ((pod.result or {}).get("ips") or []))
    base = PodView(pod.name, pod.node, pod.container_id, pod.ifname, recorded)
    if not pod.ip:
        return replace(base, error="not running (its node is powered off)")
    p = sb.run_in(pod.netns, "ip", "-j", "addr", "show", "dev", pod.ifname, check=False,
                  timeout=20)
    links = _json(p.stdout.decode(errors="replace"))
    if p.returncode != 0 or not links:
        why = p.stderr.decode(errors="replace").strip()[:200] or "no such interface"
        return replace(base, error=why)
    return replace(base, addrs=_global(links[0]))


def unreachable(sb: Sandbox, pods: list[Pod], workers: int = 8, timeout: float = 1
                ) -> list[tuple[str, str, str]]:
    """Pod pairs whose ping gets no answer (one retry: the first packet may wait on ARP or
    neighbour discovery), each of the destination's addresses (both on dual-stack)."""
    pairs = [(a, b, ip) for a in pods for b in pods if a is not b and a.ip and b.ip
             for ip in dict.fromkeys(x for x in (b.ip, b.ip6) if x)]

    def fails(pair: tuple[Pod, Pod, str]) -> bool:
        a, _, ip = pair
        return not (sb.ping(a.netns, ip, timeout=timeout)
                    or sb.ping(a.netns, ip, timeout=timeout * 2))

    with ThreadPoolExecutor(max(1, workers)) as ex:
        bad = list(ex.map(fails, pairs))
    return [(a.name, b.name, ip) for (a, b, ip), x in zip(pairs, bad, strict=True) if x]


def observe(sb: Sandbox, probe: bool = True) -> Observation:
    """Everything the invariants need; with `probe`, the ping matrix too."""
    st = sb.st
    leases, err = etcd_leases(sb)
    with ThreadPoolExecutor(8) as ex:
        nodes = list(ex.map(lambda h: node_view(sb, h), st.nodes))
        pods = list(ex.map(lambda p: pod_view(sb, p), st.pods))
    bad = None
    running = [p for p in st.pods if p.ip]
    if probe:
        bad = tuple(unreachable(sb, running))
    n = len(running)
    per_pair = len(st.pod_families)
    return Observation(tuple(leases), tuple(nodes), tuple(pods), err, bad,
                       n * (n - 1) * per_pair if probe else 0)
