#!/usr/bin/env python3
"""Writes bench/results/REPORT.md and its PNG plots from the JSON results files.

Reads whatever results exist (a missing benchmark gets a line saying so),
including JSON files written by other benchmark scripts (such as
bench/cni_latency.py), which are shown generically: their `targets` join the
headline table when they use the same form, their other figures are listed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OURS = ("dataplane", "peer_programming", "convergence", "footprint", "scale_model", "run_all",
        "membership", "signing", "dataplane_ipv6", "direct_routing", "scale", "swimsim",
        "soak")


def load(results: Path) -> dict[str, Any]:
    docs = {}
    for p in sorted(results.glob("*.json")):
        try:
            docs[p.stem] = json.loads(p.read_text())
        except ValueError:
            docs[p.stem] = {"error": f"{p.name} is not valid JSON"}
    return docs


# --- formatting -------------------------------------------------------------------------


def f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f} MiB"


def byterate(v: float | None) -> str:
    if v is None:
        return "n/a"
    for unit, div in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B/s"


def size(v: float | None) -> str:
    if v is None:
        return "n/a"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f} B"


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def flatten(doc: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(doc, list):
        if doc and all(isinstance(x, int | float) for x in doc):
            shown = ", ".join(f(x) for x in doc[:10])
            out.append((prefix, shown + (f" … ({len(doc)} values)" if len(doc) > 10 else "")))
        else:
            for i, v in enumerate(doc):
                out += flatten(v, f"{prefix}[{i}]")
    else:
        out.append((prefix, doc))
    return out


def targets_of(docs: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, doc in docs.items():
        if not isinstance(doc, dict):
            continue
        extra = (membership_targets(doc) if name == "membership" else
                 scale_targets(doc) if name == "scale" else
                 swimsim_targets(doc) if name == "swimsim" else cni_targets(doc))
        for t in doc.get("targets", []) + extra:
            if isinstance(t, dict) and "ratio" in t:
                out.append({**t, "source": name})
    return out


def is_cni(doc: Any) -> bool:
    """bench/cni_latency.py's results (issue 3): latency by CNI command, pod-start rates."""
    return isinstance(doc, dict) and isinstance(doc.get("latency_ms"), dict) and all(
        isinstance(v, dict) and "ratio_median" in v for v in doc["latency_ms"].values())


def cni_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if not is_cni(doc) or doc.get("targets"):
        return []
    out = [{"id": f"cni.{cmd}", "what": f"CNI {cmd} latency vs bridge + host-local (median)",
            "ratio": v["ratio_median"], "op": "<=", "threshold": v["target_ratio_max"],
            "met": bool(v.get("met"))}
           for cmd, v in doc["latency_ms"].items() if "target_ratio_max" in v]
    t = doc.get("throughput") or {}
    if "target_ratio_add_min" in t:
        out.append({"id": "cni.throughput", "what": "CNI pod starts per second vs bridge + "
                    "host-local", "ratio": t["ratio_add_pods_per_s"], "op": ">=",
                    "threshold": t["target_ratio_add_min"], "met": bool(t.get("met"))})
    return out


def membership_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets are absolute times; quoted as a fraction of the time allowed."""
    out = []
    for section, series, what in (
            ("detection", "all_peers_s", "crash detected by all 9 peers at 10 nodes"),
            ("new_mac_convergence", "etcd_frozen_s", "new VTEP MAC reprogrammed with etcd "
             "frozen")):
        d = doc.get(section) or {}
        if d.get("target_s"):
            r = d[series]["median"] / d["target_s"]
            out.append({"id": f"membership.{section}", "ratio": r, "op": "<=",
                        "what": f"{what} (median), fraction of {d['target_s']:g} s",
                        "threshold": 1.0, "met": r <= 1.0})
    return out


def scale_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12 on real agents: idle CPU per agent within 1% of a core and flat in N,
    every view alive, recovery from overload."""
    runs = doc.get("runs") or {}
    if not runs:
        return []
    ns = sorted(runs, key=int)
    top, low = runs[ns[-1]], runs[ns[0]]
    target = doc.get("target_agent_cpu", 0.01)
    out = [{"id": "scale.agent_cpu", "what": f"idle CPU per agent at {ns[-1]} real nodes "
            f"(mean), fraction of {target:.0%} of a core", "ratio": top["agent_cpu"]["mean"]
            / target, "op": "<=", "threshold": 1.0,
            "met": top["agent_cpu"]["mean"] <= target},
           {"id": "scale.flat", "what": f"idle CPU per agent, {ns[-1]} vs {ns[0]} nodes",
            "ratio": top["agent_cpu"]["mean"] / low["agent_cpu"]["mean"]
            if low["agent_cpu"]["mean"] else None, "op": "<=", "threshold": 1.25,
            "met": bool(low["agent_cpu"]["mean"]) and
            top["agent_cpu"]["mean"] <= 1.25 * low["agent_cpu"]["mean"]}]
    bad = sum(r["non_alive_views_at_end"] for r in runs.values())
    out.append({"id": "scale.views", "what": "peer views not alive after settling, all sizes",
                "ratio": bad, "op": "<=", "threshold": 0, "met": bad == 0})
    for k, what in (("hogs", "busy loops"), ("stops", "every agent SIGSTOPped in turn"),
                    ("freeze", "every agent SIGSTOPped at once")):
        o = (doc.get("overload") or {}).get(k)
        if o:
            r = o.get("recovered_after_s")
            out.append({"id": f"scale.recovery.{k}", "what": f"all views alive again after "
                        f"overload ({what}), fraction of 60 s", "ratio": None if r is None
                        else r / 60, "op": "<=", "threshold": 1.0, "met": r is not None
                        and r <= 60})
    return out


def swimsim_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 12 in simulation: detection at 1,000 members, no false dead at 5% loss,
    messages per member flat from the smallest to the largest size."""
    runs = (doc.get("runs") or {}).get("loss", {}).get("ours", {})
    out: list[dict[str, Any]] = []
    if "1000" in runs:
        p99 = runs["1000"]["detect_p99_s"]
        out.append({"id": "swimsim.detect_1000", "what": "simulated crash seen by every "
                    "member of 1,000 (p99), fraction of 5 s", "ratio": None if p99 is None
                    else p99 / 5.0, "op": "<=", "threshold": 1.0,
                    "met": p99 is not None and p99 <= 5.0})
    fd = sum(r["false_dead_views"] for sc in (doc.get("runs") or {}).values()
             for r in sc.get("ours", {}).values())
    if runs:
        out.append({"id": "swimsim.false_dead", "what": "simulated false DEAD views at 5% "
                    "loss (and with stalls), all sizes", "ratio": fd, "op": "<=",
                    "threshold": 0, "met": fd == 0})
        ns = sorted(runs, key=int)
        a, b = runs[ns[0]]["msgs_per_member_s"], runs[ns[-1]]["msgs_per_member_s"]
        out.append({"id": "swimsim.flat", "what": f"simulated messages per member and second, "
                    f"{int(ns[-1]):,} vs {int(ns[0]):,} members", "ratio": b / a if a else None,
                    "op": "<=", "threshold": 1.5, "met": bool(a) and b / a <= 1.5})
    return out


def cluster_scale_section(doc: dict[str, Any] | None, img: str | None) -> str:
    if not doc:
        return "_Not run._"
    runs = doc["runs"]
    rows = []
    for n in sorted(runs, key=int):
        r = runs[n]
        a = r["agent_cpu"]
        msgs = sum(r["messages_per_agent_s"].values())
        rows.append([n, f"{r['up_s']:.0f} s", f"{f(r['settled_after_up_s'])} s",
                     f"**{a['mean']:.2%}**", f"{a['median']:.2%}", f"{a['max']:.2%}",
                     f"{r['machine_busy']:.0%}", str(r["non_alive_views_at_end"]),
                     f"{msgs:.2f}", f"{r['etcd_cpu']:.2%}"])
    window = runs[min(runs, key=int)]["window_s"]
    out = [f"Real agents, one sandbox per size, one after the other in the same run "
           f"(`bench/scale.py`): idle CPU of each agent over {f(window)} s (its nft children "
           "included), as a share of one core.", "",
           table(["nodes", "sandbox up", "all alive after", "agent CPU mean", "median", "max",
                  "machine busy", "views not alive", "messages/s per agent", "etcd CPU"], rows)]
    if img:
        out += ["", f"![idle CPU per agent]({img})"]
    top = runs[max(runs, key=int)]
    out += ["", f"Where the agents' CPU goes at {max(runs, key=int)} nodes (per agent, share of a "
            "core): " + ", ".join(f"{k} {v:.2%}" for k, v in top["agent_cpu_by_thread"].items()
                                  if v >= 0.00005)
            + "; membership messages sent per agent and second: "
            + ", ".join(f"{k} {v:.2f}" for k, v in top["messages_per_agent_s"].items() if v)]
    ov = doc.get("overload")
    if ov:
        h, st, fz = ov.get("hogs") or {}, ov.get("stops") or {}, ov.get("freeze") or {}

        def worst(w: dict[str, int]) -> str:
            return ", ".join(f"{v} {k}" for k, v in sorted(w.items())) or "none"
        out += ["", f"Overload at {ov['nodes']} nodes:", "",
                table(["disturbance", "worst views seen", "all alive again after"], [
                    [f"{h.get('hogs')} busy loops at nice {h.get('nice', 0)} for "
                     f"{f(h.get('seconds'))} s",
                     f"during: {worst(h.get('worst_during', {}))}; after: "
                     f"{worst(h.get('worst_after', {}))}", f"{f(h.get('recovered_after_s'))} s"],
                    [f"every agent SIGSTOPped for {f(st.get('stop_s'))} s in turn, two at a "
                     f"time ({f(st.get('disturbance_s'))} s)",
                     f"after: {worst(st.get('worst_after', {}))}",
                     f"{f(st.get('recovered_after_s'))} s"],
                    [f"every agent SIGSTOPped at once for {f(fz.get('seconds'))} s",
                     f"after: {worst(fz.get('worst_after', {}))}",
                     f"{f(fz.get('recovered_after_s'))} s"]])]
    return "\n".join(out)


def swimsim_section(doc: dict[str, Any] | None, img: str | None) -> str:
    if not doc:
        return "_Not run._"
    sc = doc["scenarios"]
    out = [f"`bench/swimsim.py`: the agents' pure `Swim` core, driven as the agent drives it, "
           f"on a simulated clock; LAN latency, {sc['loss']['loss']:.0%} of messages lost, a "
           f"crash every {f(sc['common']['crash_every_s'])} s (the member restarts before the "
           f"next); scenario 'stalls' adds 1 s stalls, {f(sc['stalls']['stalls_per_member_hour'])}"
           " per member and hour. memberlist's LAN defaults (probe 1 s, timeout 500 ms, 3 "
           "indirect probes, suspicion 4·log10(N) s, no Lifeguard) run through the same "
           "simulator. Detection: when each live member saw the crashed one DEAD (p50, p99 over "
           "members and crashes; the slowest member of the slowest crash). Bytes: protobuf "
           "payload.", ""]
    for name, runs in doc["runs"].items():
        rows = []
        sizes = sorted({n for c in runs.values() for n in c}, key=int)
        for n in sizes:
            for c in ("ours", "memberlist"):
                r = runs.get(c, {}).get(n)
                if r is None:
                    continue
                rows.append([f"{int(n):,}", c, f(r["detect_p50_s"]), f(r["detect_p99_s"]),
                             f(r["detect_all_max_s"]), f(r["false_dead_per_member_hour"]),
                             f(r["suspicions_per_member_hour"]), f(r["msgs_per_member_s"]),
                             byterate(r["bytes_per_member_s"])])
        out += [f"Scenario '{name}':", "",
                table(["members", "config", "detect p50 s", "p99 s", "slowest s",
                       "false dead /member-h", "suspicions raised /member-h", "msgs/member/s",
                       "bytes/member/s"], rows), ""]
    if img:
        out += [f"![simulation against N]({img})", ""]
    out.append(f"Simulation wall time {f(doc.get('wall_seconds'))} s.")
    return "\n".join(out)


def membership_section(mb: dict[str, Any] | None) -> str:
    if not mb:
        return "_Not run._"
    det, mac, tr, loss = (mb["detection"], mb["new_mac_convergence"], mb["traffic"], mb["loss"])

    def dist(d: dict[str, Any]) -> str:
        return f"{d['median']:.2f} s (min {d['min']:.2f}, max {d['max']:.2f}, n={d['n']})"

    rows = [
        ["crash → first peer marks it dead", dist(det["first_peer_s"]), ""],
        ["crash → all peers mark it dead", dist(det["all_peers_s"]),
         f"target {det['target_s']:g} s"],
        ["restart with a new VTEP MAC, etcd frozen → every peer reprogrammed",
         dist(mac["etcd_frozen_s"]), f"target {mac['target_s']:g} s"],
        ["the same with etcd up (reference)", dist(mac["reference_etcd_up_s"]),
         f"ratio {f(mac['ratio_frozen_to_etcd_up'])}"],
        ["gossip payload out per node", byterate(
            tr["payload_bytes_out_per_s_per_node"]["median"]), "median of the nodes"],
        ["gossip on the wire per node (both directions)",
         byterate(tr["gossip_wire_bytes_per_s_per_node"]),
         f"{f(tr['ratio_gossip_wire_to_etcd_wire'])}x the node's etcd traffic "
         f"({byterate(tr['reference_etcd_wire_bytes_per_s_per_node'])})"],
        [f"{loss['loss_percent']}% random loss for {loss['seconds']:g} s: peers wrongly marked "
         "dead", str(len(loss["false_dead"])),
         f"{loss['suspicion_episodes']} suspicions, longest {loss['longest_suspicion_s']:.2f} s"],
    ]
    t = mb.get("timings", {})
    return "\n".join([
        f"SWIM membership at {mb['nodes']} nodes (`bench/membership.py`); probe every "
        f"{t.get('probe_interval', '?')} s, suspicion {t.get('suspect_timeout', '?')} to "
        f"{t.get('suspect_timeout_max', '?')} s:", "",
        table(["figure", "measured", "against"], rows)])


def signing_section(sg: dict[str, Any] | None) -> str:
    if not sg:
        return "_Not run._"
    pu, w, idl = sg["per_update"], sg["wire"], sg["idle"]
    us = pu["us_per_op"]
    rows = [
        ["sign our own statement (when our record or incarnation changes)",
         f"{us['sign']:.1f} µs", f"{f(pu['ratio_sign_to_reference_decode'])}x the reference"],
        ["verify a new statement (once per statement)", f"{us['verify']:.1f} µs",
         f"{f(pu['ratio_verify_to_reference_decode'])}x"],
        ["admit an update whose statement is known (the steady state)",
         f"{us['admit_known']:.1f} µs", f"{f(pu['ratio_admit_known_to_reference_decode'])}x"],
        ["reference: decode and validate one update as before signing",
         f"{us['reference_decode']:.1f} µs", ""],
        ["one update on the wire", size(w["update_bytes_after"]),
         f"before {size(w['update_bytes_before'])} "
         f"({f(w['ratio_update_after_to_before'])}x)"],
        ["push-pull of 50 members", size(w["push_pull_50_bytes_after"]),
         f"before {size(w['push_pull_50_bytes_before'])}"],
        [f"idle {idl['nodes']}-node cluster: agent CPU (median)",
         f"{idl['agent_cpu_fraction_median'] * 100:.2f}% of a core",
         f"signing work {idl['cpu_fraction_of_signed_membership_work'] * 100:.4f}%, the "
         f"decoding it replaced {idl['cpu_fraction_of_the_decoding_it_replaced'] * 100:.4f}%"],
        ["idle: gossip payload out per node",
         byterate(idl["gossip_payload_out_bytes_per_s_per_node"]),
         f"{idl['updates_received_per_s_per_node']:.1f} updates received per s"],
        ["idle: signatures made / checked per node and second",
         f"{idl['signatures_per_s_per_node']:.3f} / {idl['verifications_per_s_per_node']:.3f}",
         "once per change, not per message"],
    ]
    return "\n".join([
        "Every membership update carries its subject's own ed25519-signed statement "
        "(`bench/signing.py`; issue 11):", "", table(["figure", "measured", "against"], rows)])


def cni_section(doc: dict[str, Any]) -> str:
    rows = []
    for cmd, v in doc["latency_ms"].items():
        o, r = v.get("overlay", {}), v.get("reference", {})
        rows.append([cmd, f"{o.get('median', 0):.1f}", f"{o.get('p95', 0):.1f}",
                     f"{r.get('median', 0):.1f}", f"{r.get('p95', 0):.1f}",
                     f"**{f(v['ratio_median'])}**", f(v.get("ratio_p95"))])
    ref = doc.get("reference", {})
    out = [str(doc.get("what", "")), "",
           table(["command", "ours median ms", "ours p95", "reference median ms",
                  "reference p95", "ratio (median)", "ratio (p95)"], rows)]
    tp = doc.get("throughput", {})
    if "overlay" in tp and "reference" in tp:
        o, r = tp["overlay"], tp["reference"]
        out += ["", f"Pod starts: {o.get('pods')} ADDs, {o.get('parallel')} at a time: ours "
                f"{f(o.get('add_pods_per_s'))} pods/s, reference {f(r.get('add_pods_per_s'))} "
                f"pods/s (ratio {f(tp.get('ratio_add_pods_per_s'))}); their DELs: ours "
                f"{f(o.get('del_pods_per_s'))}/s, reference {f(r.get('del_pods_per_s'))}/s "
                f"(ratio {f(tp.get('ratio_del_pods_per_s'))})."]
    if ref:
        out += ["", f"Reference: {ref.get('plugins', '')} "
                f"(containernetworking-plugins {ref.get('containernetworking-plugins', '?')})."]
    if doc.get("command"):
        out += [f"Command: `{doc['command']}`."]
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------


def plots(docs: dict[str, Any], outdir: Path) -> dict[str, str]:
    """PNG plots for the sections that have data; a plot that fails is left out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    for name, fn in (("dataplane", plot_dataplane), ("peer_programming", plot_peers),
                     ("convergence", plot_convergence), ("scale", plot_scale),
                     ("swimsim", plot_swimsim), ("soak", plot_soak)):
        doc = docs.get(name)
        if not doc:
            continue
        try:
            fig = fn(plt, doc)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            print(f"no {name} plot: {type(exc).__name__}: {exc}", file=sys.stderr)
            plt.close("all")
            continue
        fig.tight_layout()
        fig.savefig(outdir / f"{name}.png", dpi=110)
        plt.close(fig)
        made[name] = f"{name}.png"
    return made


def plot_scale(plt: Any, doc: dict[str, Any]) -> Any:
    runs = doc["runs"]
    ns = sorted(runs, key=int)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    x = [int(n) for n in ns]
    for key, label in (("mean", "mean"), ("max", "max")):
        ax.plot(x, [100 * runs[n]["agent_cpu"][key] for n in ns], marker="o", label=label)
    ax.axhline(100 * doc.get("target_agent_cpu", 0.01), color="#c44e52", ls="--",
               label="target")
    ax.set_xlabel("nodes (real agents)")
    ax.set_ylabel("idle CPU per agent, % of a core")
    ax.set_ylim(bottom=0)
    ax.legend()
    return fig


def plot_swimsim(plt: Any, doc: dict[str, Any]) -> Any:
    runs = doc["runs"]["loss"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {"ours": "#dd8452", "memberlist": "#4c72b0"}
    for c, by_n in runs.items():
        ns = sorted(by_n, key=int)
        x = [int(n) for n in ns]
        axes[0].plot(x, [by_n[n]["detect_p50_s"] for n in ns], marker="o", color=colors.get(c),
                     label=f"{c} p50")
        axes[0].plot(x, [by_n[n]["detect_p99_s"] for n in ns], marker="^", ls="--",
                     color=colors.get(c), label=f"{c} p99")
        axes[1].plot(x, [by_n[n]["msgs_per_member_s"] for n in ns], marker="o",
                     color=colors.get(c), label=c)
        axes[2].plot(x, [by_n[n]["bytes_per_member_s"] / 1000 for n in ns], marker="o",
                     color=colors.get(c), label=c)
    for ax, label in zip(axes, ("crash seen by every member, s", "messages / member / s",
                                "payload kB / member / s"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("members (simulated)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return fig


def plot_dataplane(plt: Any, dp: dict[str, Any]) -> Any:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = ["underlay", "reference", "overlay"]
    colors = ["#888888", "#4c72b0", "#dd8452"]
    med = [dp["throughput_gbps"][n]["median"] for n in names]
    a1.bar(names, med, color=colors)
    for i, n in enumerate(names):
        vals = dp["throughput_gbps"][n]["values"]
        a1.plot([i] * len(vals), vals, "k.", markersize=6)
    a1.set_ylabel("Gbit/s (median; dots: runs)")
    a1.set_title("TCP throughput, 1 stream")
    rmed = [dp["rtt_ms"][n]["median"] * 1000 for n in names]
    rp95 = [dp["rtt_ms"][n]["p95"] * 1000 for n in names]
    a2.bar(names, rmed, color=colors, label="median")
    a2.plot(names, rp95, "kv", label="p95")
    a2.set_ylabel("µs")
    a2.set_title("ping RTT")
    a2.legend()
    return fig


def plot_peers(plt: Any, pp: dict[str, Any]) -> Any:
    sizes = sorted(int(n) for n in pp["kernel"])
    k = [pp["kernel"][str(n)] for n in sizes]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = [
        ("ip -batch + bridge -batch (reference)", [x["ip_batch_s"]["median"] for x in k], "o-"),
        ("NetlinkKernel.apply (batched)", [x["apply_s"]["median"] for x in k], "s-"),
        ("reconcile pass from empty", [x["first_pass_s"]["median"] for x in k], "^-"),
        ("reconcile pass, nothing to change", [x["noop_pass_s"]["median"] for x in k], "v--"),
        ("pyroute2 request/ack loop (before)", [x["old_loop_s"] for x in k], "x:"),
    ]
    agent = pp.get("agent", {})
    if agent and all(str(n) in agent for n in sizes):
        series.append(("overlayd start to ready (end to end)",
                       [agent[str(n)]["ready_s"] for n in sizes], "d-."))
    for label, ys, style in series:
        ax.plot(sizes, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers (3 kernel entries each)")
    ax.set_ylabel("seconds")
    ax.set_title("Programming peers")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def plot_convergence(plt: Any, cv: dict[str, Any]) -> Any:
    sizes = sorted(cv["join"], key=int)
    steps = [("last peer programmed", "last_peer_programmed_s"), ("new node ready", "ready_s"),
             ("pod added", "pod_added_s"), ("all pods reached", "all_reached_s")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(steps)
    for j, (label, key) in enumerate(steps):
        vals = []
        for s in sizes:
            runs = sorted(r[key] for r in cv["join"][s]["runs"] if r.get(key) is not None)
            vals.append(runs[len(runs) // 2] if runs else 0)
        ax.bar([i + j * width for i in range(len(sizes))], vals, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))],
                  [f"{s} nodes" for s in sizes])
    ax.set_ylabel("seconds after overlayd starts (median)")
    ax.set_title("A node joins")
    ax.legend(fontsize=8)
    return fig


def plot_soak(plt: Any, sk: dict[str, Any]) -> Any:
    """Heal times of the chaos soak (per round, and by fault kind), and RSS over time."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.8))
    heals = sk["heal_times_s"]
    a1.hist(heals, bins=min(30, max(5, len(heals) // 3)), color="#4c72b0")
    a1.set_xlabel("seconds from a round's last undo until every invariant held")
    a1.set_ylabel("rounds")
    a1.set_title(f"Heal time ({len(heals)} rounds)")
    kinds = sorted(sk["heal_by_kind_s"])
    a2.boxplot([sk["heal_by_kind_s"][k] for k in kinds], vert=False)
    a2.set_yticks(range(1, len(kinds) + 1), kinds, fontsize=7)
    a2.set_xlabel("seconds from the fault's undo until the cluster was whole")
    a2.set_title("By fault kind")
    hosts: dict[str, list[tuple[float, float]]] = {}
    for s in sk["samples"]:
        hosts.setdefault(s["host"], []).append((s["t"] / 60, s["rss_bytes"] / 2**20))
    for h, pts in sorted(hosts.items()):
        a3.plot([t for t, _ in pts], [v for _, v in pts], ".", markersize=2, label=h)
    a3.set_xlabel("minutes")
    a3.set_ylabel("RSS (MiB)")
    a3.set_title("RSS of every agent and etcd member")
    a3.legend(fontsize=7, markerscale=4)
    return fig


# --- sections ---------------------------------------------------------------------------


def headline(docs: dict[str, Any]) -> str:
    rows = []
    for t in targets_of(docs):
        op = {">=": "≥", "<=": "≤"}.get(t.get("op", ""), t.get("op", ""))
        rows.append([t.get("what", t.get("id", "")), f"{op} {t.get('threshold')}",
                     f(t.get("ratio")), "**met**" if t.get("met") else "**not met**"])
    if not rows:
        return "_No targets measured._"
    return table(["target", "wanted", "measured ratio", ""], rows)


def dataplane_section(dp: dict[str, Any] | None, img: str | None) -> str:
    if not dp:
        return "_Not run._"
    c = dp["config"]
    rows = []
    for n in ("underlay", "reference", "overlay"):
        g, r = dp["throughput_gbps"][n], dp["rtt_ms"][n]
        rows.append([n, f"{g['median']:.2f}", f"{g['min']:.2f} to {g['max']:.2f}",
                     f"{r['median'] * 1000:.0f}", f"{r['mean'] * 1000:.0f}",
                     f"{r['p95'] * 1000:.0f}"])
    ra = dp["ratios"]
    loadavg = dp.get("loadavg_before_iperf", {})
    busy = dp.get("machine_busy_during_iperf", {})
    out = [
        f"iperf3, one TCP stream, {c['iperf_seconds']} s after 1 s of warm-up; ping every 10 ms, "
        f"{c['pings_per_rep']} per path and round. {c['reps']} rounds; in each, iperf3 runs "
        "every path once, ours and the reference back to back (each first in turn), then "
        "ping runs on all paths at the same time. MTU on the pod paths: "
        f"{c['mtu']}.",
        "",
        table(["path", "Gbit/s (median)", "range", "RTT median µs", "mean µs", "p95 µs"], rows),
        "",
        f"- throughput, ours / reference: **{f(ra['throughput_overlay_vs_reference'])}** (median "
        "of the rounds' ratios: "
        f"{', '.join(f(x) for x in ra['throughput_overlay_vs_reference_per_rep'])}; ratio of "
        f"the medians {f(ra.get('throughput_overlay_vs_reference_of_medians'))}); ours / "
        f"underlay: {f(ra['throughput_overlay_vs_underlay'])}; reference / underlay: "
        f"{f(ra['throughput_reference_vs_underlay'])}",
        "- the same, with ours and the reference running at the same time (sharing the CPUs, "
        "so load drift hits both alike; each gets about half the machine): "
        f"{f(ra.get('throughput_overlay_vs_reference_together_median'))} (runs: "
        f"{', '.join(f(x) for x in ra.get('throughput_overlay_vs_reference_together', []))})",
        f"- RTT, ours / reference: **{f(ra['rtt_overlay_vs_reference'])}** (rounds: "
        f"{', '.join(f(x) for x in ra.get('rtt_overlay_vs_reference_per_rep', []))}; ratio of "
        f"the medians of all pings {f(ra.get('rtt_overlay_vs_reference_of_medians'))}); ours / "
        f"underlay: {f(ra['rtt_overlay_vs_underlay'])}",
        "- load: one TCP stream over veths keeps about two cores busy by itself (sender, "
        "receiver, softirq), so the machine is near saturation in every run and other work on "
        "it shows directly in the figures. Whole-machine CPU busy during each run: "
        + "; ".join(f"{n} {', '.join(f'{x:.0%}' for x in v)}" for n, v in busy.items())
        + ". Load average (1 min) before each run: "
        + "; ".join(f"{n} {', '.join(f'{x:.1f}' for x in v)}" for n, v in loadavg.items()),
    ]
    diffs = dp.get("differences", [])
    out.append("- devices on the two pod paths (pod eth0, host veth, cni0, VXLAN device, "
               "underlay eth0: MTU, qdisc, queue length, GSO/GRO/TSO sizes, VXLAN flags, "
               "bridge-port flags, nftables tables, forwarding): "
               + ("**identical**" if not diffs else "differ:"))
    out += [f"  - {d}" for d in diffs]
    if img:
        out += ["", f"![data plane]({img})"]
    return "\n".join(out)


def peers_section(pp: dict[str, Any] | None, img: str | None) -> str:
    if not pp:
        return "_Not run._"
    rows = []
    for n in sorted(pp["kernel"], key=int):
        k = pp["kernel"][n]
        rows.append([f"{int(n):,}", f"{k['entries']:,}", ms(k["ip_batch_s"]["median"]),
                     ms(k["apply_s"]["median"]), f"**{f(k['ratio_apply_vs_ip_batch'])}**",
                     ms(k["observe_s"]["median"]), ms(k["first_pass_s"]["median"]),
                     f(k["ratio_first_pass_vs_ip_batch"]), ms(k["noop_pass_s"]["median"]),
                     f"{ms(k['old_loop_s'])} ({f(k['ratio_old_loop_vs_ip_batch'])}x)",
                     f(k["all_correct"])])
    out = [
        "Fresh namespace per run, an empty `overlay.1` (or nothing at all for the reconcile "
        "pass, which creates the devices), medians of the runs; reference and ours alternate.",
        "",
        table(["peers", "entries", "ip -batch", "apply", "apply / ip -batch", "observe",
               "first pass", "first pass / ip -batch", "no-op pass", "old loop", "kernel = plan"],
              rows),
        "",
        "- *ip -batch*: `bridge -batch` (FDB) then `ip -batch` (neighbours, routes) with the "
        "same entries, wall time of both processes; *apply*: `NetlinkKernel.apply` of the "
        "same ops, in one process already running; *observe*: reading them back; *first pass*: "
        "the agent's `Reconciler` from nothing (devices, desired state, diff, apply, one log "
        "line per change); *no-op pass*: a pass with nothing to change; *old loop*: the same "
        "ops through a plain pyroute2 request/ack loop, as `apply` worked before.",
    ]
    agent = pp.get("agent", {})
    if agent:
        rows = []
        for n in sorted(agent, key=int):
            a = agent[n]
            rows.append([f"{int(n):,}", ms(a["ready_s"]), ms(a["start_to_config_s"]),
                         ms(a["config_to_lease_s"]), ms(a["lease_to_ready_s"]),
                         f(a["all_programmed"]), f"{a['idle_cpu_fraction']:.1%}",
                         mib(a["rss_bytes"]), ms(a.get("noop_pass_s_in_agent")),
                         ms(a.get("status_rpc_s"))])
        out += ["", "`overlayd` end to end, on a new node with the leases already in etcd "
                "(from its process start to its `ready` log line; breakdown from its own log "
                "timestamps), then idle at the production reconcile interval (10 s):", "",
                table(["peers", "start → ready", "start → config read", "→ lease held",
                       "→ listed + first reconcile", "all in kernel", "idle CPU (1 core)",
                       "RSS", "no-op pass (its /metrics)", "status RPC"], rows)]
    if img:
        out += ["", f"![peer programming]({img})"]
    return "\n".join(out)


def convergence_section(cv: dict[str, Any] | None, img: str | None) -> str:
    if not cv:
        return "_Not run._"
    rows = []
    for s in sorted(cv["join"], key=int):
        j = cv["join"][s]
        runs = j["runs"]

        def med(key: str, runs: list[dict[str, Any]] = runs) -> str:
            v = sorted(r[key] for r in runs if r.get(key) is not None)
            return "n/a" if not v else f"{ms(v[len(v) // 2])} (max {ms(v[-1])})"

        rows.append([s, str(len(runs)), med("last_peer_programmed_s"), med("ready_s"),
                     med("pod_added_s"), med("all_reached_s"), str(j["failures"])])
    out = [table(["nodes after join", "runs", "all peers programmed it", "new node ready",
                  "pod on it added", "every existing pod reached it", "failed runs"], rows)]
    for k, v in (cv.get("ratios") or {}).items():
        out.append(f"- {k.replace('_', ' ')}: {f(v)}")
    if cv.get("crash"):
        rows = []
        for s in sorted(cv["crash"], key=int):
            c = cv["crash"][s]
            rows.append([s, str(len(c["runs"])), ms(c["all_dead_s"].get("median")),
                         ms(c["all_dead_s"].get("max")), str(c["failures"])])
        out += ["", "Crash (agent killed and the host's underlay link down) until every other "
                "agent reports it dead:", "",
                table(["nodes", "runs", "median", "max", "not detected"], rows)]
    else:
        out += ["", f"Crash detection: {cv.get('crash_note')}."]
    if img:
        out += ["", f"![convergence]({img})"]
    return "\n".join(out)


def footprint_section(fp: dict[str, Any] | None) -> str:
    if not fp:
        return "_Not run._"
    rows = []
    for n in sorted(fp["peers"], key=int):
        p = fp["peers"][n]
        rows.append([f"{int(n):,}", f"{p['agent']['cpu_fraction']:.2%}",
                     mib(p["agent"]["rss_bytes"]), f"{p['etcd']['cpu_fraction']:.2%}",
                     mib(p["etcd"]["rss_bytes"])])
    out = ["Idle agent, one node with N peer leases, periodic reconcile every 10 s (the "
           "default):", "",
           table(["peers", "agent CPU (of one core)", "agent RSS", "etcd CPU", "etcd RSS"], rows),
           ""]
    for k, v in fp.get("ratios", {}).items():
        out.append(f"- {k.replace('_', ' ')}: {f(v)}")
    rows = []
    for s in sorted(fp["traffic"], key=int):
        t = fp["traffic"][s]
        pm, r = t["per_node_mean"], t["etcd_rates_per_node_per_s"]
        rows.append([s, byterate(pm["etcd_Bps"]), byterate(t["etcd_port_Bps_per_node"]),
                     byterate(pm["gossip_Bps"]), f"{r['keepalives']:.3f}",
                     f"{r['range_requests']:.3f}", f"{r['proposals_committed']:.4f}",
                     f"{t['agent_cpu_mean']:.2%}", mib(t["agent_rss_mean"])])
    out += ["", "Idle clusters, per node and second (nftables counters in each node; etcd's "
            "underlay port and /metrics for the cross-check):", "",
            table(["nodes", "etcd traffic", "etcd port / nodes", "gossip", "keepalives/s",
                   "range reads/s", "raft writes/s", "agent CPU", "agent RSS"], rows)]
    return "\n".join(out)


def soak_section(sk: dict[str, Any] | None, img: str | None) -> str:
    if not sk:
        return "_Not run._"
    h = sk["heal"]
    out = [f"`overlayctl sandbox chaos` on 3 nodes x 2 pods with 3 etcd members (lease TTL "
           f"10 s) for {sk['seconds'] / 60:.0f} minutes, seed {sk['seed']}, up to "
           f"{sk['overlap']} faults at once: **{sk['result'].upper()}**, {sk['faults']} "
           f"faults of {len(sk['kinds_seen'])} kinds in {sk['rounds']} rounds, "
           f"**{len(sk['violations'])} violations**. Heal time (a round's last undo until "
           f"every invariant held, ping matrix included): median {h.get('median_s')} s, p90 "
           f"{h.get('p90_s')} s, worst {h.get('max_s')} s. The full list of faults: "
           "[soak_chaos.md](soak_chaos.md).", ""]
    if img:
        out += [f"![chaos soak]({img})", ""]
    rows = []
    for g in sk["growth"]:
        unit = mib if g["metric"] == "rss_bytes" else (lambda v: f(v))
        per_h = "n/a" if g["per_hour"] is None else (
            f"{g['per_hour'] / 2**20:+.2f} MiB/h" if g["metric"] == "rss_bytes"
            else f"{g['per_hour']:+.2f}/h")
        ci = "n/a" if g["ci95"] is None else (
            f"[{g['ci95'][0] / 2**20:+.2f}, {g['ci95'][1] / 2**20:+.2f}]"
            if g["metric"] == "rss_bytes" else f"[{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]")
        spared = " (spared)" if g["host"] in sk.get("spared", []) else ""
        rows.append([g["host"] + spared, "RSS" if g["metric"] == "rss_bytes" else "open fds",
                     unit(g["median"]), f"{g.get('fitted', '?')} of {g['incarnations']}",
                     per_h, ci,
                     "**yes**" if g["beyond_noise"] else
                     "n/a" if g["beyond_noise"] is None else "no"])
    floor = sk["floor_per_hour"]
    settle = sk.get("settle_s", 0)
    out += [(f"Growth per hour over the soak's last {(sk['seconds'] - settle) / 60:.0f} "
             f"minutes (the first {settle / 60:.0f}, where the allocators' high-water marks "
             "climb, are left out; see bench/soak.py), " if settle else "Growth per hour, ")
            + f"fitted within each process incarnation (the chaos restarts "
            f"them), the first {sk['warmup_s']:.0f} s of each left out, and incarnations "
            f"seen for less than {sk.get('min_life_s', 0):.0f} s after that (n/a: none lived "
            f"that long); {', '.join(sk.get('spared', [])) or 'none'} spared the kills, stops "
            "and reboots, so they live through the whole soak; 95% interval widened "
            f"for autocorrelated samples (every {sk['interval_s']:g} s). Beyond noise: the "
            f"interval above zero and the estimate above {mib(floor['rss_bytes'])}/h (RSS) or "
            f"{floor['fds']:g} fd/h.", "",
            table(["process", "metric", "median", "incarnations fitted", "growth",
                   "95% interval", "beyond noise"], rows)]
    tr = sk.get("trend") or {}
    if tr:
        bin_min = sk.get("trend_bin_s", 300) / 60
        out += ["", f"Means of each {bin_min:g}-minute window of the spared processes (a leak "
                "climbs window after window; a warm-up flattens out):", ""]
        out += [f"- {host}: RSS " + ", ".join(f"{v / 2**20:.1f}" for v in m["rss_bytes"])
                + " MiB; open fds " + ", ".join(f"{v:g}" for v in m["fds"])
                for host, m in tr.items()]
    return "\n".join(out)


def scale_section(sm: dict[str, Any] | None) -> str:
    if not sm:
        return "_Not computed._"
    models = sm["models"]
    cols = [n for n in ("1000", "5000") if n in models]
    lines = [
        ("etcd keys (leases)", lambda m: f"{m['etcd']['keys']:,} ({m['etcd']['leases']:,})"),
        ("etcd live data", lambda m: size(m["etcd"]["db_bytes_live"])),
        ("lease keep-alives /s", lambda m: f"{m['etcd']['keepalive_requests_per_s']:.0f}"),
        ("config reads /s", lambda m: f"{m['etcd']['config_reads_per_s']:.0f}"),
        ("raft writes /s (churn)", lambda m: f"{m['etcd']['writes_per_s']:.3f}"),
        ("watch events delivered /s", lambda m: f"{m['etcd']['watch_events_delivered_per_s']:.1f}"),
        ("watch bytes out of etcd /s", lambda m: byterate(m["etcd"]["watch_bytes_out_per_s"])),
        ("idle client traffic at etcd", lambda m: byterate(m["etcd"]["idle_client_bytes_per_s"])),
        ("one node's start-up listing", lambda m: size(m["etcd"]["list_bytes_per_node_start"])),
        ("every node relisting at once", lambda m: size(m["etcd"]["relist_all_nodes_bytes"])),
        ("kernel entries per node", lambda m: f"{m['per_node']['kernel_entries']:,}"),
        ("agent RSS per node", lambda m: mib(m["per_node"]["agent_rss_bytes"])),
        ("agent idle CPU per node", lambda m: f"{m['per_node']['agent_idle_cpu_fraction']:.0%} "
         "of a core"),
        ("no-op reconcile pass", lambda m: ms(m["per_node"]["noop_reconcile_s"])),
        ("program every peer on a new node", lambda m: ms(m["per_node"]["program_all_peers_s"])),
        ("gossip per node", lambda m: byterate(m["per_node"]["gossip_bytes_per_s"])
         if m["per_node"]["gossip_bytes_per_s"] is not None else "not measured (no gossip)"),
    ]
    rows = [[label, *[fn(models[c]) for c in cols]] for label, fn in lines]
    out = [table(["", *[f"{int(c):,} nodes" for c in cols]], rows), "", "Assumptions:", ""]
    out += [f"- {n}" for n in sm["assumption_notes"]]
    inp = sm["inputs"]
    out += ["", "Measured inputs: etcd bytes per node per second at "
            + ", ".join(f"{a} nodes: {b:.0f}" for a, b in inp["etcd_bytes_per_node_s"])
            + "; agent idle CPU at " + ", ".join(f"{a} peers: {b:.2%}"
                                                 for a, b in inp["agent_cpu_idle"])
            + "; agent RSS at " + ", ".join(f"{a} peers: {mib(b)}"
                                            for a, b in inp["agent_rss_bytes"])
            + f"; no-op pass {ms(inp['noop_pass_s'][1])} and first pass "
            f"{ms(inp['first_pass_s'][1])} at {inp['noop_pass_s'][0]:,} peers; one lease "
            f"record {inp['record_bytes']} bytes."]
    return "\n".join(out)


def other_section(name: str, doc: Any) -> str:
    items = [(k, v) for k, v in flatten(doc) if k not in ("machine",)
             and not k.startswith(("machine.", "targets"))]
    rows = [[f"`{k}`", f(v) if not isinstance(v, str) else v] for k, v in items[:60]]
    more = f"\n\n({len(items) - 60} more figures in `{name}.json`)" if len(items) > 60 else ""
    return table(["figure", "value"], rows) + more


def safe(section: Any, *args: Any) -> str:
    """A section, or why it could not be written (a partial or older results file)."""
    try:
        return str(section(*args))
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        return f"_Could not render this section: {type(exc).__name__}: {exc}._"


def direct_routing_section(doc: dict[str, Any] | None) -> str:
    if not doc:
        return "_Not run._"
    g, r, ra = doc["throughput_gbps"], doc["rtt_ms_run_medians"], doc["ratios"]
    what = {"direct": "same segment, DirectRouting (no tunnel)",
            "vxlan": "same segment, VXLAN (DirectRouting off)",
            "routed": "across the router, DirectRouting on (VXLAN)"}
    rows = [[what[n], f"{g[n]['median']:.2f}", f"{r[n]['median'] * 1000:.0f}"] for n in what]
    return "\n".join([
        "Two sandboxes of two routed underlay segments, one with DirectRouting and one "
        f"without, {doc['config']['reps']} interleaved rounds (`bench/direct_routing.py`).",
        "", table(["path", "Gbit/s (median)", "RTT median µs"], rows), "",
        f"- direct / VXLAN on the same segment: throughput "
        f"**{f(ra['throughput_direct_vs_vxlan'])}**, RTT **{f(ra['rtt_direct_vs_vxlan'])}** "
        "(no target: on veths the tunnel costs little next to the veth and bridge hops)",
    ])


def render(docs: dict[str, Any], imgs: dict[str, str]) -> str:
    run = docs.get("run_all", {})
    m = next((d["machine"] for d in docs.values() if isinstance(d, dict) and "machine" in d), {})
    parts = [
        "# Benchmarks",
        "",
        f"Run of {m.get('date_utc', '?')} on {m.get('cpus', '?')} CPU(s) "
        f"({m.get('cpu_model', '?')}), kernel {m.get('kernel', '?')}, "
        f"Python {m.get('python', '?')}; load average "
        f"{f(m.get('loadavg_1m'), 2)} at the start. `make bench` reproduces it "
        f"(root, Debian 12; this run took {f((run.get('total_seconds') or 0) / 60, 2)} "
        "minutes).",
        "",
        "Every figure is measured in the same run as its reference, on the same machine, in "
        "network namespaces joined by a bridge (the sandbox). The machine is shared, so "
        "absolute times drift from run to run; the ratios are what to quote. Where a run "
        "reports how busy the machine was, that is all CPUs and all processes, ours included.",
        "",
        "## Targets",
        "",
        headline(docs),
        "",
    ]
    if run.get("failed"):
        parts += ["**Scripts that failed in this run:** "
                  + ", ".join(f"`{k}` ({v})" for k, v in run["failed"].items()), ""]
    parts += ["## 1. Data plane", "", safe(dataplane_section, docs.get("dataplane"),
                                           imgs.get("dataplane")), "",
              "### IPv6 pods over an IPv6 underlay", "",
              "The same measurement with IPv6-only pods and hosts, against flannel-v6.1's "
              "layout built by hand (`bench/dataplane.py --family ipv6`):", "",
              safe(dataplane_section, docs.get("dataplane_ipv6"), None), "",
              "### DirectRouting", "", safe(direct_routing_section, docs.get("direct_routing")),
              "",
              "## 2. Peer programming", "", safe(peers_section, docs.get("peer_programming"),
                                                 imgs.get("peer_programming")), "",
              "## 3. Convergence", "", safe(convergence_section, docs.get("convergence"),
                                            imgs.get("convergence")), "",
              "### Membership (gRPC, SWIM)", "", safe(membership_section, docs.get("membership")),
              "", "### Signed membership records", "", safe(signing_section, docs.get("signing")),
              "", "## 4. CNI", ""]
    others = {k: v for k, v in docs.items() if k not in OURS}
    cni = {k: v for k, v in others.items() if is_cni(v)}
    for name, doc in cni.items():
        parts += [f"From `bench/results/{name}.json` (written by `bench/cni_latency.py`):", "",
                  safe(cni_section, doc), ""]
    if not cni:
        parts += ["_No CNI results: `bench/cni_latency.py` is not in this tree, or failed._", ""]
    parts += ["## 5. Footprint", "", safe(footprint_section, docs.get("footprint")), "",
              "## 6. Scale on paper", "", safe(scale_section, docs.get("scale_model")), "",
              "## 7. Membership at scale on this machine", "",
              safe(cluster_scale_section, docs.get("scale"), imgs.get("scale")), "",
              "## 8. Membership past this machine (simulation)", "",
              safe(swimsim_section, docs.get("swimsim"), imgs.get("swimsim")), "",
              "## 9. Chaos soak", "", safe(soak_section, docs.get("soak"), imgs.get("soak")),
              ""]
    rest = {k: v for k, v in others.items() if not is_cni(v)}
    if rest:
        parts += ["## Other results", ""]
        for name, doc in rest.items():
            parts += [f"From `bench/results/{name}.json` (written by `bench/{name}.py`):", "",
                      safe(other_section, name, doc), ""]
    notes = run.get("notes") or []
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if run.get("durations"):
        parts += ["Wall time of each script: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in run["durations"].items()) + "."]
    return "\n".join(parts) + "\n"


def main(results: Path = RESULTS) -> Path:
    docs = load(results)
    imgs = plots(docs, results)
    out = results / "REPORT.md"
    out.write_text(render(docs, imgs))
    print(f"wrote {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
