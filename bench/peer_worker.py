#!/usr/bin/env python3
"""Runs inside one namespace for bench/peer_programming.py; prints one JSON object.

  peer_worker.py apply N      NetlinkKernel.apply of the ops for N peers on an empty
                              overlay.1, then observe(); checks the kernel equals the plan
  peer_worker.py loop N       the same ops through a plain pyroute2 request/ack loop
                              (how NetlinkKernel.apply worked before batching)
  peer_worker.py reconcile N  the agent's Reconciler on a namespace with only eth0: pass 1
                              from nothing (devices and every entry), then passes with
                              nothing to change; logging at INFO to a file, as overlayd does
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import tempfile
import time
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

from fakepeers import CIDR, fake_records

from overlay.dataplane.desired import Entries, Fdb, Neigh, Op, desired, plan
from overlay.dataplane.kernel import NetlinkKernel
from overlay.devnames import BRIDGE_NAME, vxlan_name

ME = "bench-node"
DEV = vxlan_name(1)


async def apply_mode(n: int) -> dict[str, Any]:
    k = NetlinkKernel()
    try:
        dev = await k.link(DEV)
        assert dev is not None, f"{DEV} missing"
        t0 = time.perf_counter()
        want = desired(fake_records(n), ME)
        ops = plan(want, Entries())
        t1 = time.perf_counter()
        res = await k.apply(dev.index, ops)
        t2 = time.perf_counter()
        seen = await k.observe(dev.index)
        t3 = time.perf_counter()
        errors = [str(r.error) for r in res if r.error is not None]
        return {"entries": len(ops), "plan_s": t1 - t0, "apply_s": t2 - t1, "observe_s": t3 - t2,
                "errors": errors[:5], "error_count": len(errors),
                "kernel_matches": seen == Entries(want.routes, want.neighs, want.fdbs)}
    finally:
        k.close()


async def loop_mode(n: int) -> dict[str, Any]:
    """One request, one ack, one op at a time through pyroute2 (the pre-batching apply)."""
    from pyroute2 import AsyncIPRoute

    want = desired(fake_records(n), ME)
    ops = plan(want, Entries())
    ipr = AsyncIPRoute()
    try:
        idx = (await ipr.link_lookup(ifname=DEV))[0]
        t0 = time.perf_counter()
        errors = 0
        for op in ops:
            try:
                await _pyroute2_op(ipr, idx, op)
            except Exception:
                errors += 1
        return {"entries": len(ops), "apply_s": time.perf_counter() - t0, "error_count": errors}
    finally:
        ipr.close()


async def _pyroute2_op(ipr: Any, ifindex: int, op: Op) -> None:
    e = op.entry
    if isinstance(e, Fdb):
        await ipr.fdb("append", ifindex=ifindex, lladdr=e.mac, dst=str(e.dst),
                      state=0x80 | 0x40, flags=0x02)
    elif isinstance(e, Neigh):
        await ipr.neigh("replace", dst=str(e.ip), lladdr=e.mac, ifindex=ifindex, state=0x80)
    else:
        await ipr.route("replace", dst=str(e.dst), gateway=str(e.via), oif=ifindex, flags=4,
                        proto=0x9F)


async def reconcile_mode(n: int, passes: int) -> dict[str, Any]:
    from overlay.dataplane.devices import BridgeSpec, VxlanSpec, stable_mac
    from overlay.dataplane.reconciler import Reconciler, Specs

    logdir = tempfile.TemporaryDirectory(prefix="reconcile-")
    handler = logging.FileHandler(f"{logdir.name}/agent.log")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    k = NetlinkKernel()
    try:
        eth0 = await k.link("eth0")
        assert eth0 is not None and eth0.addresses, "eth0 with an address needed"
        local = next(iter(eth0.addresses)).ip
        me = IPv4Network("10.127.255.0/24")  # the last /24 of the cluster, no fake peer there
        specs = Specs(
            ME,
            VxlanSpec(DEV, 1, 8472, local, 1450, stable_mac("vtep"),
                      IPv4Interface(f"{me.network_address}/32"), eth0.index),
            BridgeSpec(BRIDGE_NAME, stable_mac("bridge"), 1450,
                       IPv4Interface(f"{me.network_address + 1}/24")),
            IPv4Network(CIDR),
        )
        recs = fake_records(n)
        r = Reconciler(k, lambda: recs)
        r.set_specs(specs)
        t0 = time.perf_counter()
        first = await r.reconcile_once()
        t1 = time.perf_counter()
        idle = []
        for _ in range(passes):
            t = time.perf_counter()
            res = await r.reconcile_once()
            idle.append(time.perf_counter() - t)
            assert res.applied == 0 and res.ok, res
        programmed = all(r.is_programmed(x) for x in recs[:: max(1, n // 50)])
        return {"entries": first.applied, "first_pass_s": t1 - t0, "first_ok": first.ok,
                "failed": first.failed, "noop_pass_s": idle, "sampled_programmed": programmed}
    finally:
        k.close()
        handler.close()
        logdir.cleanup()


def main() -> None:
    mode, n = sys.argv[1], int(sys.argv[2])
    if mode == "apply":
        out = asyncio.run(apply_mode(n))
    elif mode == "loop":
        out = asyncio.run(loop_mode(n))
    elif mode == "reconcile":
        out = asyncio.run(reconcile_mode(n, int(sys.argv[3]) if len(sys.argv) > 3 else 3))
    else:
        sys.exit(f"unknown mode {mode!r}")
    out["mode"], out["peers"] = mode, n
    out["host"] = socket.gethostname()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
