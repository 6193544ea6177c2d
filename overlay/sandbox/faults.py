"""Underlay faults for the sandbox: loss, partitions and bandwidth caps.

Everything happens in the sandbox's underlay namespace (the bridge joining the
hosts), never in the root namespace. Loss and partitions are one nftables
table in the bridge family, rebuilt from a `Faults` value each time, so the
rules are always exactly what was asked for; bandwidth caps are tbf qdiscs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TABLE = "ovs_faults"


def port_name(host: str) -> str:
    """The underlay bridge port of a host (see Sandbox._plug)."""
    return f"u-{host}"[:15]


@dataclass(frozen=True)
class Faults:
    loss_percent: int = 0
    partitioned: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not 0 <= self.loss_percent <= 100:
            raise ValueError(f"loss {self.loss_percent}% is outside 0..100")


def ruleset(f: Faults) -> str:
    rules = []
    for host in sorted(f.partitioned):
        port = port_name(host)
        rules.append(f'iifname "{port}" counter drop')
        rules.append(f'oifname "{port}" counter drop')
    if f.loss_percent:
        rules.append(f"numgen random mod 100 < {f.loss_percent} counter drop")
    body = "".join(f"    {r}\n" for r in rules)
    return (
        f"table bridge {TABLE} {{}}\n"
        f"delete table bridge {TABLE}\n"
        f"table bridge {TABLE} {{\n"
        f"  chain forward {{\n"
        f"    type filter hook forward priority 0; policy accept;\n"
        f"{body}"
        f"  }}\n"
        f"}}\n"
    )
