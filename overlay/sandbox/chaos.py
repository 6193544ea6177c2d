"""The chaos schedule, from a seed, and the report of a run. Pure.

A run is a sequence of rounds. A round injects 1..`overlap` faults, staggered
by up to two seconds, so up to `overlap` are in effect at once, each on a
target of its own (never two faults on one node, two on etcd or two on the
whole underlay in a round). When every fault of the round has been undone,
the invariants (overlay/sandbox/invariants.py) must hold again within the
heal bound before the next round begins. The same seed and topology give the
same rounds, fault for fault; how many of them fit in the run's seconds
depends on how fast the cluster heals, and the report says.

Kinds are dealt from a shuffled deck, so a short run already sees most of
them; the deck is shuffled again when it runs out.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# kind -> what the runner does (the report and --help quote it)
KINDS: dict[str, str] = {
    "agent-kill": "SIGKILL the node's agent; start it again when the fault ends (as systemd "
                  "would)",
    "agent-term": "SIGTERM the node's agent (a clean stop); start it again when the fault ends",
    "agent-stop": "SIGSTOP the node's agent (hung: connections accepted, nothing answered); "
                  "SIGCONT when the fault ends",
    "node-reboot": "power the node off (agent, namespace, devices, pods and /run gone, "
                   "persisted state kept); power it on when the fault ends: agent started, "
                   "pods attached again",
    "partition": "cut the node off the underlay for longer than the lease TTL",
    "loss": "drop a share of every frame on the underlay",
    "bandwidth": "cap the node's underlay link in both directions (tbf)",
    "etcd-member": "SIGKILL one etcd member (quorum kept); start it again when the fault ends",
    "etcd-quorum": "SIGKILL a majority of the etcd members (quorum lost); start them again "
                   "when the fault ends",
    "pod-churn": "delete pods of the node and add new ones through its conflist, as a runtime "
                 "does (a failed ADD is followed by DEL)",
    "kernel-entries": "delete FDB, neighbour and route entries of the node's VXLAN device by "
                      "hand",
    "device-delete": "delete the node's VXLAN device or its pod bridge by hand",
}
NODE_KINDS = ("agent-kill", "agent-term", "agent-stop", "node-reboot", "partition",
              "bandwidth", "pod-churn", "kernel-entries", "device-delete")
PROCESS_KINDS = ("agent-kill", "agent-term", "agent-stop", "node-reboot")
ETCD_KINDS = ("etcd-member", "etcd-quorum")
UNDERLAY_KINDS = ("loss",)
STAGGER = 2.0  # seconds within which a round's faults start


@dataclass(frozen=True)
class Topology:
    nodes: tuple[str, ...]
    etcd: tuple[str, ...]
    lease_ttl: float = 60.0
    # Nodes and etcd members whose processes are never killed, stopped or rebooted (they
    # get every other fault): long-lived witnesses for a leak check.
    spared: tuple[str, ...] = ()

    def killable(self, hosts: Sequence[str]) -> list[str]:
        return [h for h in hosts if h not in self.spared]


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # a node, etcd members joined by commas, or "underlay"
    start: float  # seconds after the round began
    seconds: float  # how long it lasts before it is undone; 0: a change the agent must repair
    param: str = ""  # loss "20%", bandwidth "1mbit", churn "3" (operations), "fdb", "bridge"...

    def describe(self) -> str:
        what = {"loss": f"{self.param} loss on the underlay",
                "bandwidth": f"{self.param} cap on {self.target}",
                "pod-churn": f"pod churn on {self.target} ({self.param} replacements)",
                "kernel-entries": f"{self.param} entries deleted on {self.target}",
                "device-delete": f"{self.param} device deleted on {self.target}",
                "etcd-member": f"etcd member {self.target} killed",
                "etcd-quorum": f"etcd members {self.target} killed (quorum lost)"
                }.get(self.kind, f"{self.kind} {self.target}")
        return what + (f" for {self.seconds:.1f}s" if self.seconds else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def applicable(topo: Topology) -> list[str]:
    kinds = []
    if topo.nodes:
        kinds += [k for k in NODE_KINDS
                  if k not in PROCESS_KINDS or topo.killable(topo.nodes)]
        if len(topo.nodes) < 2:
            kinds.remove("partition")  # nobody to be cut off from
    majority = len(topo.etcd) // 2 + 1
    if topo.etcd and len(topo.killable(topo.etcd)) >= majority:
        kinds.append("etcd-quorum")
    if len(topo.etcd) >= 3 and topo.killable(topo.etcd):
        kinds.append("etcd-member")
    return kinds + list(UNDERLAY_KINDS)


def plan(seed: int, topo: Topology, overlap: int = 1, rounds: int = 100
         ) -> list[tuple[Fault, ...]]:
    """`rounds` rounds of faults for this seed and topology."""
    if overlap < 1:
        raise ValueError("overlap must be at least 1")
    rng = random.Random(seed)
    kinds = applicable(topo)
    deck: list[str] = []
    out = []
    for _ in range(rounds):
        want = rng.randint(1, overlap)
        busy: set[str] = set()  # nodes, "etcd", "underlay"
        faults: list[Fault] = []
        while len(faults) < want:
            if not deck:
                deck = kinds[:]
                rng.shuffle(deck)
            free_nodes = [n for n in topo.nodes if n not in busy]
            pick = next((k for k in deck if _fits(k, busy, free_nodes, topo)), None)
            if pick is None:
                break
            deck.remove(pick)
            start = 0.0 if not faults else round(rng.uniform(0, STAGGER), 1)
            targets = topo.killable(free_nodes) if pick in PROCESS_KINDS else free_nodes
            f = _fault(rng, pick, topo, targets, start)
            busy.add("etcd" if pick in ETCD_KINDS else "underlay" if pick in UNDERLAY_KINDS
                     else f.target)
            faults.append(f)
        out.append(tuple(faults))
    return out


def _fits(kind: str, busy: set[str], free_nodes: Sequence[str], topo: Topology) -> bool:
    if kind in ETCD_KINDS:
        return "etcd" not in busy
    if kind in UNDERLAY_KINDS:
        return "underlay" not in busy
    if kind in PROCESS_KINDS:
        return bool(topo.killable(free_nodes))
    return bool(free_nodes)


def _u(rng: random.Random, lo: float, hi: float) -> float:
    return round(rng.uniform(lo, hi), 1)


def _fault(rng: random.Random, kind: str, topo: Topology, free: Sequence[str], start: float
           ) -> Fault:
    if kind == "loss":
        return Fault(kind, "underlay", start, _u(rng, 4, 10), f"{rng.choice((5, 10, 20, 30))}%")
    if kind == "etcd-member":
        return Fault(kind, rng.choice(topo.killable(topo.etcd)), start, _u(rng, 3, 8))
    if kind == "etcd-quorum":
        members = sorted(rng.sample(topo.killable(topo.etcd), len(topo.etcd) // 2 + 1))
        return Fault(kind, ",".join(members), start, _u(rng, 3, 10))
    node = rng.choice(list(free))
    if kind == "partition":
        return Fault(kind, node, start, round(topo.lease_ttl + rng.uniform(2, 6), 1))
    if kind == "bandwidth":
        return Fault(kind, node, start, _u(rng, 4, 10), rng.choice(("256kbit", "1mbit", "5mbit")))
    if kind == "pod-churn":
        return Fault(kind, node, start, _u(rng, 2, 5), str(rng.randint(2, 4)))
    if kind == "kernel-entries":
        return Fault(kind, node, start, 0.0, rng.choice(("fdb", "neigh", "route", "all")))
    if kind == "device-delete":
        return Fault(kind, node, start, 0.0, rng.choice(("vxlan", "bridge")))
    down = {"agent-kill": (1, 4), "agent-term": (1, 4), "agent-stop": (2, 6),
            "node-reboot": (1, 4)}[kind]
    return Fault(kind, node, start, _u(rng, *down))


# --- the report ----------------------------------------------------------------------


def heal_summary(heals: Sequence[float]) -> dict[str, Any]:
    v = sorted(heals)
    if not v:
        return {"n": 0}

    def pct(p: float) -> float:
        return v[max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))]

    return {"n": len(v), "median_s": round(statistics.median(v), 2),
            "p90_s": round(pct(90), 2), "max_s": round(v[-1], 2),
            "mean_s": round(statistics.fmean(v), 2)}


def markdown(doc: Mapping[str, Any]) -> str:
    """The report for people, from the JSON document the runner writes."""
    heal = doc.get("heal", {})
    lines = [
        f"# Chaos run on sandbox {doc['sandbox']}: {doc['result'].upper()}",
        "",
        f"Seed {doc['seed']}, {doc['seconds']} s asked for, overlap {doc['overlap']}, heal "
        f"bound {doc['heal_bound_s']} s, lease TTL {doc['lease_ttl_s']} s; "
        f"{len(doc['rounds'])} rounds, {len(doc['faults'])} faults in "
        f"{doc['duration_s']:.0f} s; {len(doc['violations'])} violations."
        + (" Interrupted: every fault in effect was undone." if doc.get("interrupted") else "")
        + (f" Stopped early: {doc['stopped']}." if doc.get("stopped") else ""),
        "",
        f"Topology: nodes {', '.join(doc['topology']['nodes'])}; etcd "
        f"{', '.join(doc['topology']['etcd'])}; {doc['topology']['pods']} pods"
        + (f"; never killed, stopped or rebooted: {', '.join(doc['topology']['spared'])}"
           if doc["topology"].get("spared") else "") + ".",
        "",
    ]
    if heal.get("n"):
        lines += [f"Heal time (from the last undo of a round to every invariant holding, "
                  f"ping matrix included): median {heal['median_s']} s, p90 {heal['p90_s']} s, "
                  f"worst {heal['max_s']} s over {heal['n']} rounds.", ""]
    lines += ["## Faults", "",
              "Times are seconds since the run began. *Whole again* is when every invariant "
              "held after the fault's round; *heal* is that minus the fault's own undo (for a "
              "fault that overlapped others, it includes the time they were still in effect).",
              "", "| round | fault | injected | undone | whole again | heal |",
              "|---|---|---|---|---|---|"]
    for f in doc["faults"]:
        heal_s = "-" if f.get("heal_s") is None else f"{f['heal_s']:.2f} s"
        undone = "-" if f.get("undone_at") is None else f"{f['undone_at']:.1f}"
        whole = "-" if f.get("healed_at") is None else f"{f['healed_at']:.1f}"
        note = f" ({f['note']})" if f.get("note") else ""
        lines.append(f"| {f['round']} | {f['what']}{note} | {f['injected_at']:.1f} | {undone} "
                     f"| {whole} | {heal_s} |")
    lines += ["", "## Violations", ""]
    if not doc["violations"]:
        lines.append("None: after every round, every invariant held within the bound.")
    for v in doc["violations"]:
        lines.append(f"- round {v['round']}, **{v['invariant']}** ({v['subject']}): "
                     f"{v['message']}")
        for k, val in (v.get("evidence") or {}).items():
            lines.append(f"  - {k}: `{val}`")
    lines += ["", "## Invariants checked after every round", ""]
    lines += [f"- **{k}**: {d}" for k, d in doc["invariants"].items()]
    lines += ["", "## Fault kinds", ""]
    lines += [f"- **{k}**: {d}" for k, d in KINDS.items()]
    return "\n".join(lines) + "\n"
