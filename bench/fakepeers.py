#!/usr/bin/env python3
"""Fake peer leases: valid node records that exist only in etcd.

They become kernel entries only on the node being measured; their underlay
addresses answer nothing, nothing sends traffic to them, and they have no
gRPC address, so the membership protocol leaves them alone.

  fakepeers.py put --endpoints http://127.0.0.1:2379 --count 5000 [--start 1]

(run inside the etcd host's namespace) writes leases 1..count, skipping the
ones below --start, with 64 writes in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from ipaddress import IPv4Address, IPv4Network

from overlay.model import NodeRecord, subnet_key

# The cluster network of the peer benchmarks: 16,384 /24 subnets.
CIDR = "10.64.0.0/10"
_NET = int(IPv4Network(CIDR).network_address)
_UNDERLAY = int(IPv4Address("172.30.128.0"))


def fake_record(i: int) -> NodeRecord:
    """The i-th fake peer (1 <= i < 16384): its own /24, VTEP MAC and underlay address."""
    if not 1 <= i < 16384:
        raise ValueError(f"fake peer index {i} outside 1..16383")
    return NodeRecord(
        node=f"fake-{i:05d}",
        subnet=IPv4Network((_NET + (i << 8), 24)),
        underlay_ip=IPv4Address(_UNDERLAY + i),
        vtep_mac=f"02:fa:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
        # No gRPC address: membership does not probe them (they would never answer), so
        # they cost what a peer costs the data plane, not a dead peer's probes.
        grpc_addr="",
    )


def fake_records(count: int, start: int = 1) -> list[NodeRecord]:
    return [fake_record(i) for i in range(start, count + 1)]


async def put(endpoints: str, count: int, start: int, prefix: str) -> dict[str, float]:
    from overlay.etcdstore import EtcdOptions, EtcdStore

    recs = fake_records(count, start)
    for r in recs:  # what the agents will parse: fail here, not in them
        assert NodeRecord.from_json(r.to_json()) == r
    sem = asyncio.Semaphore(64)
    t0 = time.perf_counter()
    opts = EtcdOptions(endpoints=tuple(endpoints.split(",")), prefix=prefix)
    async with EtcdStore(opts) as store:

        async def one(r: NodeRecord) -> None:
            async with sem:
                await store.put_raw(subnet_key(prefix, r.subnet), r.to_json())

        await asyncio.gather(*(one(r) for r in recs))
    return {"written": len(recs), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("put", help="write fake leases into etcd")
    p.add_argument("--endpoints", default="http://127.0.0.1:2379")
    p.add_argument("--prefix", default="/overlay/")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(put(args.endpoints, args.count, args.start, args.prefix))))


if __name__ == "__main__":
    main()
