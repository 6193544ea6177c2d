"""Which subnet to try next: pure functions, the etcd transaction is elsewhere.

Nodes starting at the same moment all see the same free list; trying the
free subnets in a random order (instead of the lowest first) makes them
collide rarely, and a collision only costs one more transaction.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator
from ipaddress import IPv4Network

from overlay.model import NetworkConfig

# Above this many subnets in the cluster CIDR we sample instead of listing.
_ENUMERATE_LIMIT = 1 << 16


def subnet_at(cfg: NetworkConfig, index: int) -> IPv4Network:
    size = 1 << (32 - cfg.subnet_len)
    base = int(cfg.network.network_address)
    return IPv4Network((base + index * size, cfg.subnet_len))


def all_subnets(cfg: NetworkConfig) -> Iterator[IPv4Network]:
    for i in range(cfg.subnet_count):
        yield subnet_at(cfg, i)


def belongs(cfg: NetworkConfig, subnet: IPv4Network) -> bool:
    return subnet.prefixlen == cfg.subnet_len and subnet.subnet_of(cfg.network)


def candidates(
    cfg: NetworkConfig,
    taken: Collection[IPv4Network],
    preferred: IPv4Network | None = None,
    rng: random.Random | None = None,
    limit: int = 16,
) -> list[IPv4Network]:
    """Up to `limit` free subnets to try, best first.

    The preferred subnet (the one this node held before) comes first when it
    is still free, so a restarted node gets its own subnet back.
    """
    rng = rng or random.Random()
    taken_set = {t for t in taken if belongs(cfg, t)}
    out: list[IPv4Network] = []
    if preferred is not None and belongs(cfg, preferred) and preferred not in taken_set:
        out.append(preferred)
    total = cfg.subnet_count
    free = total - len(taken_set)
    if free <= len(out):
        return out
    want = min(limit, free) - len(out)
    if total <= _ENUMERATE_LIMIT or free < total // 4:
        pool = [s for s in all_subnets(cfg) if s not in taken_set and s not in out]
        rng.shuffle(pool)
        return out + pool[:want]
    seen = set(out)
    while want > 0:
        s = subnet_at(cfg, rng.randrange(total))
        if s in taken_set or s in seen:
            continue
        seen.add(s)
        out.append(s)
        want -= 1
    return out


def free_count(cfg: NetworkConfig, taken: Collection[IPv4Network]) -> int:
    return cfg.subnet_count - len({t for t in taken if belongs(cfg, t)})
