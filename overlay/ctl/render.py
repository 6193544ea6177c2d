"""Tables for people: the peer table of `overlayctl status` and `sandbox status`.

Rendering only, from the JSON documents the commands also print with --json
(`overlay.agent.localclient.status_json`), so both outputs say the same.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

PEER_HEADER = ("PEER", "SUBNET", "UNDERLAY", "STATE", "GRPC RTT", "TUNNEL RTT", "SINCE",
               "PROGRAMMED")


def print_table(rows: Sequence[tuple[str, ...]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)


def fmt_rtt(us: int | None, error: str | None = None) -> str:
    """The last round trip; "fail" if the last probe got no answer (the error is in --json)."""
    if error is not None:
        return "fail"
    if us is None:
        return "-"
    return f"{us / 1000:.2f}ms"


def fmt_since(ms: int) -> str:
    if not ms:
        return "-"
    s = max(0.0, time.time() - ms / 1000)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def peer_rows(peers: Iterable[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """The header and one row per peer of a status document's "peers"."""
    return [PEER_HEADER, *(peer_row(p) for p in peers)]


def subnets_text(subnet: str | None, subnet6: str | None, sep: str = ", ") -> str:
    """A node's subnets (or a pod's addresses) for a table: "10.244.7.0/24,
    fd00:10:244:7::/64", or one of them, "-" for none. The status documents' "subnet" is
    the IPv6 one on an IPv6-only node, hence the dedup."""
    return sep.join(dict.fromkeys(x for x in (subnet, subnet6) if x)) or "-"


def peer_row(p: Mapping[str, Any]) -> tuple[str, ...]:
    """name, subnet, underlay, state, gRPC RTT, tunnel RTT, since, programmed."""
    state = p["state"]
    if not p.get("inEtcd", True):
        state += " (no lease)"
    programmed = "yes" if p["programmed"] else "no"
    if p["programmed"] and p.get("source") == "gossip":
        programmed = "yes (gossip)"  # newer details than etcd holds (etcd unreachable?)
    if p.get("direct"):
        state += " (direct)"
    return (p["name"], subnets_text(p["subnet"], p.get("ipv6Subnet")), p["underlayIP"], state,
            fmt_rtt(p["grpcRttUs"], p.get("grpcError")),
            fmt_rtt(p["tunnelRttUs"], p.get("tunnelError")), fmt_since(p["sinceUnixMs"]),
            programmed)


def watch_frame(doc: Mapping[str, Any]) -> str:
    """One frame of `sandbox watch`: every node's view of every peer (overlay.sandbox.lab.views).

    A cell is how the row's agent sees the column's node: alive, suspect, dead or left,
    with `*` when its entries are not programmed, `absent` when it is not in the row's
    peer list at all; `?` when the row's agent does not answer."""
    import io

    nodes = doc["nodes"]
    names = [n["name"] for n in nodes]
    f = doc["faults"]
    faults = [f"partition {h}" for h in f["partitioned"]]
    faults += [f"{f['lossPercent']}% loss"] if f["lossPercent"] else []
    faults += [f"{rate} on {h}" for h, rate in sorted(f["bandwidth"].items())]
    faults += [f"{h} powered off" for h in f["poweredOff"]]
    e = doc["etcd"]
    etcd = f"etcd {e['running']}/{e['members']} up" + (
        f" (down: {', '.join(e['down'])})" if e["down"] else "")
    head = (f"sandbox {doc['name']}  {time.strftime('%H:%M:%S', time.localtime(doc['time']))}"
            f"  {etcd}  faults: {'; '.join(faults) or 'none'}")
    rows: list[tuple[str, ...]] = [("NODE", "AGENT", "READY", "SUBNET", *names)]
    for n in nodes:
        cells = []
        for peer in names:
            if peer == n["name"]:
                cells.append("-")
            elif n["process"] != "running" or n["error"]:
                cells.append("?")
            elif peer not in n["peers"]:
                cells.append("absent")
            else:
                p = n["peers"][peer]
                cells.append(p["state"] + ("" if p["programmed"] else "*")
                             + ("" if p.get("inEtcd", True) else " (no lease)"))
        agent = n["process"] if not n["error"] else "no answer"
        ready = "yes" if n["ready"] else ("-" if agent != "running" else "no")
        rows.append((n["name"], agent, ready, subnets_text(n["subnet"], n.get("ipv6Subnet")),
                     *cells))
    out = io.StringIO()
    print(head, file=out)
    print_table(rows, out)
    print("cell: how the row's agent sees the column's node; * its entries not programmed; "
          "? no answer", file=out)
    return out.getvalue()
