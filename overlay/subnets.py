"""Which subnets to try next: pure functions, the etcd transaction is elsewhere.

Nodes starting at the same moment all see the same free list; trying the
free subnets in a random order (instead of the lowest first) makes them
collide rarely, and a collision only costs one more transaction.

Each address family has its own pool (`overlay.model.Pool`: the network and
flannel's SubnetMin..SubnetMax); a dual-stack lease takes one subnet of each,
paired by `pairs`, in one transaction.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator
from ipaddress import IPv4Network, IPv6Network

from overlay.model import IPNet, NetworkConfig, Pool

# Above this many subnets in a range we sample instead of listing.
_ENUMERATE_LIMIT = 1 << 16


def subnet_at(cfg: NetworkConfig | Pool, index: int) -> IPNet:
    pool = cfg.primary if isinstance(cfg, NetworkConfig) else cfg
    return pool.at(index)


def all_subnets(pool: NetworkConfig | Pool) -> Iterator[IPNet]:
    """Every subnet new leases may get, lowest first."""
    p = pool.primary if isinstance(pool, NetworkConfig) else pool
    for i in p.range_indexes:
        yield p.at(i)


def belongs(cfg: NetworkConfig | Pool, subnet: IPNet) -> bool:
    """In the network, of the right length (whether or not in SubnetMin..SubnetMax)."""
    if isinstance(cfg, Pool):
        return cfg.belongs(subnet)
    pool = cfg.pool(subnet.version)
    return pool is not None and pool.belongs(subnet)


def keeps(cfg: NetworkConfig, subnet: IPNet) -> bool:
    """A node that held `subnet` before may have it again."""
    pool = cfg.pool(subnet.version)
    return pool is not None and pool.keeps(subnet)


def candidates(
    cfg: NetworkConfig | Pool,
    taken: Collection[IPNet],
    preferred: IPNet | None = None,
    rng: random.Random | None = None,
    limit: int = 16,
) -> list[IPNet]:
    """Up to `limit` free subnets of one pool to try, best first.

    The preferred subnet (the one this node held before) comes first when it
    is still free, so a restarted node gets its own subnet back.
    """
    pool = cfg.primary if isinstance(cfg, NetworkConfig) else cfg
    rng = rng or random.Random()
    span = pool.range_indexes
    taken_idx = {pool.index(t) for t in taken if pool.belongs(t)}
    out: list[IPNet] = []
    if preferred is not None and pool.keeps(preferred) and pool.index(preferred) not in taken_idx:
        out.append(preferred)
    seen = {pool.index(s) for s in out}
    total = len(span)
    free = total - sum(1 for i in taken_idx | seen if i in span)
    want = min(limit - len(out), free)
    if want <= 0:
        return out
    if total <= _ENUMERATE_LIMIT or free < total // 4:
        pool_idx = [i for i in span if i not in taken_idx and i not in seen]
        rng.shuffle(pool_idx)
        return out + [pool.at(i) for i in pool_idx[:want]]
    while want > 0:
        # (randrange takes big ints: an IPv6 range can hold 2**64 subnets)
        i = span.start + rng.randrange(total)
        if i in taken_idx or i in seen:
            continue
        seen.add(i)
        out.append(pool.at(i))
        want -= 1
    return out


def pairs(
    cfg: NetworkConfig,
    taken: Collection[IPNet],
    preferred: Collection[IPNet | None] = (),
    rng: random.Random | None = None,
    limit: int = 16,
) -> list[tuple[IPNet, ...]]:
    """Up to `limit` leases to try: one subnet per enabled family, IPv4 first.

    The previously held subnets come first. A dual-stack lease pairs the
    subnets of the same index when the IPv6 one is free (10.244.7.0/24 with
    fd00:10:244:7::/64: easier to read), another free one otherwise.
    """
    rng = rng or random.Random()
    pools = cfg.pools()
    prefs = [next((p for p in preferred if p is not None and p.version == pool.family), None)
             for pool in pools]
    first = candidates(pools[0], taken, prefs[0], rng, limit)
    if len(pools) == 1:
        return [(s,) for s in first]
    p4, p6 = pools
    spare = candidates(p6, taken, prefs[1], rng, 2 * limit)
    taken6 = {p6.index(t) for t in taken if p6.belongs(t)}
    used6: set[int] = set()
    out: list[tuple[IPNet, ...]] = []
    for n, s4 in enumerate(first):
        mate: IPNet | None = None
        if n == 0 and prefs[1] is not None and spare and spare[0] == prefs[1]:
            mate = prefs[1]  # a returning node gets both of its subnets back
        else:
            i = p4.index(s4)
            span = p6.range_indexes
            if i in span and i not in taken6 and i not in used6 \
                    and not (prefs[1] is not None and p6.index(prefs[1]) == i):
                mate = p6.at(i)
        if mate is None:
            mate = next((c for c in spare if p6.index(c) not in used6
                         and not (n > 0 and c == prefs[1])), None)
        if mate is None:
            break
        used6.add(p6.index(mate))
        out.append((s4, mate))
    return out


def free_count(cfg: NetworkConfig | Pool, taken: Collection[IPNet]) -> int:
    """Subnets still free for new leases (of the family that runs out first)."""
    pools = cfg.pools() if isinstance(cfg, NetworkConfig) else (cfg,)
    out = []
    for pool in pools:
        span = pool.range_indexes
        used = {pool.index(t) for t in taken if pool.belongs(t)}
        out.append(len(span) - sum(1 for i in used if i in span))
    return min(out)


def split(subnets: Collection[IPNet]) -> tuple[IPv4Network | None, IPv6Network | None]:
    """(the IPv4 one, the IPv6 one) of a lease's subnets."""
    v4 = next((s for s in subnets if isinstance(s, IPv4Network)), None)
    v6 = next((s for s in subnets if isinstance(s, IPv6Network)), None)
    return v4, v6
