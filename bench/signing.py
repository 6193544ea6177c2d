#!/usr/bin/env python3
"""What signed membership records cost (issue 11): per update, on the wire, and at idle.

  per update    in-process, interleaved rounds, median: sign (done when our own
                record or incarnation changes), verify (once per new statement),
                the admission of an update whose statement is already known (the
                steady state: a cache hit), each against the reference, what every
                update cost before signing: protobuf parse of the update and
                validation of the record it carried (address, MAC, subnet, name)
  wire size     one MemberUpdate before (record + incarnation) and after (the
                signed statement), and a push-pull of 10 and 50 members
  idle cluster  --nodes agents at idle for --window s: each agent's CPU, the
                gossip payload per node, updates received per second, signatures
                made and checked (about none: once per change, not per message);
                the CPU signing adds (ops x their cost, updates x admission) and
                what it replaced (updates x the reference decode)

Writes bench/results/signing.json and prints a table.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from common import (
    http_get,
    log,
    machine,
    proc_cpu_seconds,
    ratio,
    require_root,
    sandbox,
    write_result,
)

from overlay.membership import signing
from overlay.membership.signing import NodeKey
from overlay.membership.swim import Member, Record, State, Update
from overlay.membership.wire import claims_from_pb, node_record, record_pb, update_pb
from overlay.model import NodeRecord
from overlay.v1 import overlay_pb2 as pb


def node(i: int, key: NodeKey) -> NodeRecord:
    return NodeRecord(f"node-{i:04d}", IPv4Network(f"10.{64 + i // 256}.{i % 256}.0/24"),
                      IPv4Address(f"172.30.{1 + i // 250}.{10 + i % 250}"),
                      f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                      f"172.30.{1 + i // 250}.{10 + i % 250}:7946", public_key=key.public)


def old_update_pb(u: Update) -> Any:
    """The update as agents sent it before signing."""
    return pb.MemberUpdate(record=record_pb(u.record.node, u.record.lease_revision,
                                            u.incarnation),
                           state=int(u.state), incarnation=u.incarnation, reporter=u.reporter)


def old_decode(data: bytes) -> Update:
    """What receiving one update cost before signing (wire.update_from_pb then)."""
    m = pb.MemberUpdate.FromString(data)
    return Update(Record(node_record(m.record), int(m.record.lease_revision)), State(m.state),
                  int(m.incarnation), m.reporter)


def per_update(n: int, reps: int) -> dict[str, Any]:
    key = NodeKey(NodeKey.generate())
    rec = Record(node(7, key), 42)
    signed = Record(rec.node, 42, key.sign(rec, 1_764_000_000_000, State.ALIVE))
    u = Update(signed, State.ALIVE, 1_764_000_000_000, "node-0003")
    old_bytes = old_update_pb(u).SerializeToString()
    new_bytes = update_pb(u).SerializeToString()
    gate = signing.gate("node-0001")
    gate.set_keys({rec.name: key.public, "node-0001": "", "node-0003": ""})
    members = {rec.name: Member(rec, State.ALIVE, 0, 0.0)}

    def t_ref() -> None:
        for _ in range(n):
            old_decode(old_bytes)

    def t_sign() -> None:
        for i in range(n):
            key.sign(rec, i + 1, State.ALIVE)

    def t_verify() -> None:
        g = signing.gate("node-0001", rate=1e9, burst=10**9)
        g.set_keys(gate.keys)
        claims, _ = claims_from_pb([pb.MemberUpdate.FromString(new_bytes)])
        g.admit(claims, "node-0003", members, 0.0)  # the key object, once
        for i in range(n):
            g._verified.clear()
            g.admit(claims, "node-0003", members, float(i))

    def t_admit() -> None:
        for i in range(n):
            claims, _ = claims_from_pb([pb.MemberUpdate.FromString(new_bytes)])
            gate.admit(claims, "node-0003", members, float(i))

    def t_encode_old() -> None:
        for _ in range(n):
            old_update_pb(u).SerializeToString()

    def t_encode_new() -> None:
        for _ in range(n):
            update_pb(u).SerializeToString()

    fns = {"reference_decode": t_ref, "sign": t_sign, "verify": t_verify, "admit_known": t_admit,
           "encode_before": t_encode_old, "encode_after": t_encode_new}
    t_admit()  # warm the cache
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    us = {k: round(statistics.median(v), 2) for k, v in times.items()}
    # verify includes the admission around it; sign includes encoding the statement
    return {"n": n, "reps": reps, "us_per_op": us,
            "ratio_admit_known_to_reference_decode": ratio(us["admit_known"],
                                                           us["reference_decode"]),
            "ratio_verify_to_reference_decode": ratio(us["verify"], us["reference_decode"]),
            "ratio_sign_to_reference_decode": ratio(us["sign"], us["reference_decode"])}


def wire_sizes() -> dict[str, Any]:
    keys = [NodeKey(NodeKey.generate()) for _ in range(50)]
    ups = []
    for i, k in enumerate(keys):
        rec = Record(node(i, k), 1000 + i)
        inc = 1_764_000_000_000 + i
        ups.append(Update(Record(rec.node, rec.lease_revision, k.sign(rec, inc, State.ALIVE)),
                          State.ALIVE, inc, f"node-{i:04d}"))
    one_old = old_update_pb(ups[0]).ByteSize()
    one_new = update_pb(ups[0]).ByteSize()
    out: dict[str, Any] = {"update_bytes_before": one_old, "update_bytes_after": one_new,
                           "ratio_update_after_to_before": ratio(one_new, one_old)}
    for n in (10, 50):
        before = pb.PushPullRequest(sender="node-0000", members=[old_update_pb(u)
                                                                for u in ups[:n]]).ByteSize()
        after = pb.PushPullRequest(sender="node-0000", members=[update_pb(u)
                                                               for u in ups[:n]]).ByteSize()
        out[f"push_pull_{n}_bytes_before"] = before
        out[f"push_pull_{n}_bytes_after"] = after
    return out


def scrape(sb: Any, n: str) -> dict[str, float]:
    text = http_get(sb, sb.node(n).netns, "http://127.0.0.1:9181/metrics")
    out: dict[str, float] = {}
    for m in re.finditer(r'^(overlay_(?:gossip_bytes_total|gossip_updates_total|'
                         r'membership_signature_ops_total))\{\w+="([\w-]+)"\} (\S+)', text, re.M):
        out[f"{m[1]}:{m[2]}"] = float(m[3])
    return out


def idle(nodes: int, window: float, costs: dict[str, float]) -> dict[str, Any]:
    names = [f"n{i}" for i in range(1, nodes + 1)]
    with sandbox("bsg", nodes=nodes, pods_per_node=0) as sb:
        time.sleep(5)  # joins and first push-pulls done
        pids = {n: sb.node(n).pid for n in names}
        m0 = {n: scrape(sb, n) for n in names}
        c0, t0 = {n: proc_cpu_seconds(p) for n, p in pids.items()}, time.monotonic()
        time.sleep(window)
        c1, dt = {n: proc_cpu_seconds(p) for n, p in pids.items()}, time.monotonic() - t0
        m1 = {n: scrape(sb, n) for n in names}

    def rate(key: str) -> float:
        return statistics.median((m1[n].get(key, 0) - m0[n].get(key, 0)) / dt for n in names)

    cpu = statistics.median((c1[n] - c0[n]) / dt for n in names)
    upd = sum(rate(f"overlay_gossip_updates_total:{r}") for r in ("admitted", "ignored",
                                                                      "refused"))
    signs = rate("overlay_membership_signature_ops_total:sign")
    verifies = rate("overlay_membership_signature_ops_total:verify")
    added = (signs * costs["sign"] + verifies * costs["verify"] + upd * costs["admit_known"]) / 1e6
    replaced = upd * costs["reference_decode"] / 1e6
    return {"nodes": nodes, "window_s": round(dt, 1),
            "agent_cpu_fraction_median": round(cpu, 4),
            "gossip_payload_out_bytes_per_s_per_node": round(
                rate("overlay_gossip_bytes_total:out"), 1),
            "updates_received_per_s_per_node": round(upd, 1),
            "signatures_per_s_per_node": round(signs, 3),
            "verifications_per_s_per_node": round(verifies, 3),
            "cpu_fraction_of_signed_membership_work": round(added, 6),
            "cpu_fraction_of_the_decoding_it_replaced": round(replaced, 6),
            "ratio_work_after_to_before": ratio(added, replaced)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="operations per round")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--window", type=float, default=30.0)
    args = ap.parse_args()
    require_root()
    doc: dict[str, Any] = {"benchmark": "signing", "machine": machine()}
    log(f"per-update costs: {args.reps} x {args.n} operations each ...")
    doc["per_update"] = pu = per_update(args.n, args.reps)
    doc["wire"] = wire = wire_sizes()
    log(f"idle cluster of {args.nodes} for {args.window:.0f}s ...")
    doc["idle"] = idl = idle(args.nodes, args.window, pu["us_per_op"])
    write_result("signing", doc)
    us = pu["us_per_op"]
    rows = [
        ("figure", "value", "reference"),
        ("sign our statement (on a change)", f"{us['sign']:.1f} us",
         f"decode one update before signing: {us['reference_decode']:.1f} us"),
        ("verify a new statement (once each)", f"{us['verify']:.1f} us",
         f"ratio {pu['ratio_verify_to_reference_decode']}"),
        ("admit an update with a known statement", f"{us['admit_known']:.1f} us",
         f"ratio {pu['ratio_admit_known_to_reference_decode']}"),
        ("encode an update", f"{us['encode_after']:.1f} us",
         f"before: {us['encode_before']:.1f} us"),
        ("one update on the wire", f"{wire['update_bytes_after']} B",
         f"before: {wire['update_bytes_before']} B, ratio "
         f"{wire['ratio_update_after_to_before']}"),
        ("push-pull of 10 / 50 members",
         f"{wire['push_pull_10_bytes_after']} / {wire['push_pull_50_bytes_after']} B",
         f"before: {wire['push_pull_10_bytes_before']} / {wire['push_pull_50_bytes_before']} B"),
        (f"idle, {idl['nodes']} nodes: agent CPU (median)",
         f"{idl['agent_cpu_fraction_median'] * 100:.2f}% of a core",
         f"signing work {idl['cpu_fraction_of_signed_membership_work'] * 100:.4f}%, the "
         f"decoding it replaced {idl['cpu_fraction_of_the_decoding_it_replaced'] * 100:.4f}%"),
        ("idle: gossip payload sent per node",
         f"{idl['gossip_payload_out_bytes_per_s_per_node']:.0f} B/s",
         f"{idl['updates_received_per_s_per_node']:.1f} updates/s received"),
        ("idle: signatures made / checked per node",
         f"{idl['signatures_per_s_per_node']:.3f} / {idl['verifications_per_s_per_node']:.3f}"
         " per s", "once per change, not per message"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
