"""Prometheus metrics of overlayd (served on --metrics-addr).

Defined once here so that every component counts into the same registry and
the names stay consistent; all are prefixed `overlay_`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

PEERS = Gauge("overlay_peers", "Peers by membership state", ["state"], registry=REGISTRY)
PEER_ENTRIES = Gauge(
    "overlay_programmed_entries", "Kernel entries programmed for peers", ["kind"],
    registry=REGISTRY,
)
RECONCILE_PASSES = Counter(
    "overlay_reconcile_passes_total", "Reconcile passes", ["result"], registry=REGISTRY
)
RECONCILE_SECONDS = Histogram(
    "overlay_reconcile_duration_seconds", "Duration of one reconcile pass", registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DRIFT_NOTIFICATIONS = Counter(
    "overlay_drift_notifications_total",
    "Kernel notifications that may mean drift and woke a reconcile pass",
    registry=REGISTRY,
)
REPAIRS = Counter(
    "overlay_repairs_total",
    "Kernel entries or devices put back after they were changed outside overlayd",
    ["kind"], registry=REGISTRY,
)
KERNEL_CHANGES = Counter(
    "overlay_kernel_changes_total", "Kernel changes applied", ["kind", "action"],
    registry=REGISTRY,
)
NETLINK_ERRORS = Counter(
    "overlay_netlink_errors_total", "Failed netlink requests", ["kind"], registry=REGISTRY
)
LEASE_RENEWALS = Counter(
    "overlay_lease_renewals_total", "Subnet lease renewals", ["result"], registry=REGISTRY
)
LEASE_ACQUISITIONS = Counter(
    "overlay_lease_acquisitions_total", "Subnet lease acquisitions", registry=REGISTRY
)
ETCD_UP = Gauge("overlay_etcd_reachable", "1 if the last etcd request succeeded",
                registry=REGISTRY)
CNI_REQUESTS = Counter(
    "overlay_cni_requests_total", "CNI requests", ["command", "result"], registry=REGISTRY
)
CNI_SECONDS = Histogram(
    "overlay_cni_request_duration_seconds", "CNI request handling time in the agent",
    ["command"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
GOSSIP_MESSAGES = Counter(
    "overlay_gossip_messages_total", "Membership messages", ["type", "direction"],
    registry=REGISTRY,
)
GOSSIP_BYTES = Counter(
    "overlay_gossip_bytes_total", "Membership payload bytes", ["direction"], registry=REGISTRY
)
GOSSIP_UPDATES = Counter(
    "overlay_gossip_updates_total",
    "Membership updates received: admitted, ignored (stale, or about a node without lease), "
    "refused", ["result"], registry=REGISTRY,
)
MEMBERSHIP_REFUSED = Counter(
    "overlay_membership_refused_total",
    "Membership updates refused: malformed, unsigned, bad-signature, no-lease (sender or "
    "reporter), no-key (the subject publishes none), budget (too many signature checks)",
    ["reason"], registry=REGISTRY,
)
SIGNATURE_OPS = Counter(
    "overlay_membership_signature_ops_total",
    "ed25519 operations: sign (our own statement changed), verify (a new statement)",
    ["op"], registry=REGISTRY,
)
READY = Gauge("overlay_ready", "1 when the lease is held, the devices are up and the first "
              "reconcile is done", registry=REGISTRY)
MEMBERSHIP_HEALTH = Gauge(
    "overlay_membership_local_health",
    "Local Health Awareness score (0: healthy); probe interval and timeouts scale with 1 + it",
    registry=REGISTRY,
)
