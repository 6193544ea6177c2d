"""overlayd's settings, as the command line (overlay.agent.main) gives them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from overlay.etcdstore import EtcdOptions
from overlay.membership.swim import SwimConfig
from overlay.membership.tls import TlsFiles


@dataclass(frozen=True)
class AgentOptions:
    etcd: EtcdOptions = field(default_factory=EtcdOptions)
    node_name: str | None = None
    iface: str | None = None
    iface_regex: str | None = None
    public_ip: str | None = None
    mtu: int | None = None
    vtep_mac: str | None = None
    grpc_listen: str | None = None  # default: 0.0.0.0:7946, [::]:7946 on an IPv6 underlay
    underlay_family: int | None = None  # 4 or 6 (--underlay-family); None: IPv4 if there
    grpc_advertise: str | None = None
    run_dir: Path = Path("/run/overlay")
    state_dir: Path = Path("/var/lib/overlay")
    lease_ttl: int = 60
    restart_grace: int = 300
    reconcile_interval: float = 10.0
    health_addr: str | None = None
    metrics_addr: str | None = None
    ip_masq: bool = False
    vxlan_filter: bool = True
    membership: SwimConfig = field(default_factory=SwimConfig)
    tls: TlsFiles | None = None
    etcd_startup_timeout: float = 1.0
