"""Command line of overlayd, the node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
from ipaddress import ip_address
from pathlib import Path

from overlay import __version__, cli, etcdstore
from overlay import log as logsetup
from overlay.agent.http import split_hostport
from overlay.agent.options import AgentOptions
from overlay.errors import ConfigError
from overlay.membership.swim import SwimConfig
from overlay.membership.tls import tls_files
from overlay.model import check_node_name, parse_mac

DESCRIPTION = """\
overlayd: the node agent of the overlay network.

Leases a pod subnet for this node from etcd, creates the VXLAN device
(overlay.<VNI>) and the pod bridge (cni0), programs a route, a neighbour
entry and an FDB entry for every other node, and keeps the kernel that way.
Serves the `overlay` CNI plugin on <run-dir>/cni.sock and a local API on
<run-dir>/overlayd.sock (used by `overlayctl status`).

The cluster network must exist in etcd first: `overlayctl network init`.
"""

EPILOG = """\
environment: OVERLAYD_ETCD_ENDPOINTS and OVERLAYD_NODE_NAME supply defaults
for --etcd-endpoints and --node-name.

exit status: 0 after SIGTERM/SIGINT or a graceful leave, 1 on a failure it
cannot wait out or a stop that took over 9 s (every thread's stack is written
to stderr first), 2 on invalid configuration, 70 on a bug (logged with its
traceback).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="overlayd", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"overlayd {__version__}")
    g = etcdstore.add_arguments(p)
    g.add_argument("--etcd-startup-timeout", type=cli.seconds, default=1.0, metavar="SECONDS",
                   help="at start, how long to wait for etcd before starting DEGRADED from "
                        "the config, subnet and peers saved in --state-dir by the last run "
                        "(only if there are some; default: %(default)s)")
    g = p.add_argument_group("node")
    g.add_argument("--node-name", default=os.environ.get("OVERLAYD_NODE_NAME"),
                   help="this node's name, its identity in the cluster (default: the name "
                        "persisted in --state-dir, else the hostname)")
    g.add_argument("--iface", help="underlay interface for VXLAN traffic (default: the "
                   "interface of the default route)")
    g.add_argument("--iface-regex", help="pick the first interface whose name matches")
    g.add_argument("--public-ip", help="underlay address to use, IPv4 or IPv6 (default: the "
                   "interface's first address)")
    g.add_argument("--underlay-family", choices=("ipv4", "ipv6"),
                   help="the family VXLAN packets travel in (default: IPv4 if the interface "
                   "has an IPv4 address, else IPv6); pods get the families of the network "
                   "config, whatever this is")
    g.add_argument("--mtu", type=cli.int_range(576, 65535),
                   help="pod and VXLAN MTU, 576..65535 (default: Backend.MTU or the "
                   "underlay MTU, minus 50 over IPv4 or 70 over IPv6)")
    g.add_argument("--vtep-mac", help="MAC of the VXLAN device (default: random once, then "
                   "persisted in --state-dir)")
    g.add_argument("--lease-ttl", type=cli.int_range(5), default=60, metavar="SECONDS",
                   help="TTL of the subnet lease in etcd, 5 or more: how long a dead node "
                        "keeps its subnet (default: %(default)s)")
    g.add_argument("--restart-grace", type=cli.int_range(0), default=300, metavar="SECONDS",
                   help="on a stop that is not a leave (SIGTERM: a restart, an upgrade, a "
                        "replaced pod), keep the subnet lease this long instead of the TTL, "
                        "so peers keep the routes to this node's pods until overlayd is "
                        "back; 0 or not above --lease-ttl: it expires after the TTL as after "
                        "a crash; `overlayctl uninstall` releases it at once "
                        "(default: %(default)s)")
    g.add_argument("--reconcile-interval", type=cli.seconds, default=10.0, metavar="SECONDS",
                   help="period of the full pass that compares the kernel with the leases "
                        "(default: %(default)s); entries or devices changed by hand are "
                        "noticed from kernel notifications and repaired at once, so this "
                        "is a safety net")
    g.add_argument("--ip-masq", action="store_true",
                   help="masquerade all traffic from this node's pods that leaves the "
                        "cluster network (nftables table 'ip overlay'); without it, only pods "
                        "whose CNI config sets ipMasq are masqueraded")
    g.add_argument("--no-vxlan-filter", dest="vxlan_filter", action="store_false",
                   help="accept VXLAN from any source; by default only the underlay IPs of "
                        "current members may send to the VXLAN port (nftables table "
                        "'ip overlay_vxlan')")
    g = p.add_argument_group("local state")
    g.add_argument("--run-dir", type=cli.path, default=Path("/run/overlay"),
                   help="sockets and pod address allocations (default: %(default)s)")
    g.add_argument("--state-dir", type=cli.path, default=Path("/var/lib/overlay"),
                   help="identity kept across reboots: node name, VTEP MAC, last subnet, "
                        "membership signing key (default: %(default)s)")
    g = p.add_argument_group(
        "membership (gRPC between agents)",
        "Every node signs what it says about itself (ed25519 key in --state-dir, public key "
        "in its etcd lease); peers accept a node's record, incarnation or leave only with "
        "its signature. Mutual TLS (--tls-*) adds privacy on the wire.")
    g.add_argument("--grpc-listen", default=None,
                   help="listen address of the membership service (default: 0.0.0.0:7946, "
                   "[::]:7946 over an IPv6 underlay)")
    g.add_argument("--grpc-advertise",
                   help="address peers use to reach it (default: underlay IP and listen port)")
    g.add_argument("--tls-cert", help="this node's certificate (PEM), signed by --tls-ca and "
                   "naming the node (DNS subject alternative name = node name); with "
                   "--tls-key and --tls-ca, agents talk mutual TLS and refuse peers without "
                   "a certificate from the cluster CA")
    g.add_argument("--tls-key", help="the certificate's private key (PEM)")
    g.add_argument("--tls-ca", help="the cluster CA certificate(s) (PEM)")
    d = SwimConfig()
    g.add_argument("--probe-interval", type=cli.seconds, default=d.probe_interval,
                   metavar="SECONDS",
                   help="one probe round per interval (default: %(default)s); an agent "
                        "that is itself slow (Local Health Awareness) probes up to 9x less "
                        "often")
    g.add_argument("--probe-timeout", type=cli.seconds, default=d.probe_timeout,
                   metavar="SECONDS",
                   help="wait at least this long for a direct answer before asking "
                        "--indirect-probes other peers to probe it too; longer when the "
                        "observed round trips are (default: %(default)s)")
    g.add_argument("--indirect-probes", type=cli.int_range(0, 64), default=d.indirect_probes,
                   metavar="K",
                   help="peers asked to probe a peer that does not answer (default: "
                        "%(default)s)")
    g.add_argument("--suspect-timeout", type=cli.seconds, default=d.suspect_timeout,
                   metavar="SECONDS",
                   help="a suspect peer that does not refute is declared dead after this "
                        "long once 3 other peers confirm they cannot reach it either "
                        "(default: %(default)s)")
    g.add_argument("--suspect-timeout-max", type=cli.seconds, default=d.suspect_timeout_max,
                   metavar="SECONDS", help="... and after this long while nobody confirms "
                   "(packet loss rather than a crash; default: %(default)s); this one grows "
                   "with log10 of the cluster size above 10 nodes, the other above 100")
    g.add_argument("--push-pull-interval", type=cli.seconds, default=d.push_pull_interval,
                   metavar="SECONDS", help="full state exchange with a random peer "
                   "(default: %(default)s)")
    g = p.add_argument_group("observability")
    g.add_argument("--health-addr", help="serve /healthz and /readyz here, e.g. 127.0.0.1:9181")
    g.add_argument("--metrics-addr", help="serve Prometheus /metrics here, e.g. 0.0.0.0:9182")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log line format (default: %(default)s)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="least severe level logged (default: %(default)s)")
    return p


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """The agent's options; ConfigError naming the flag for anything that cannot work,
    before the agent touches the kernel or etcd."""
    if args.node_name is not None:
        check_node_name(args.node_name, "--node-name")
    if args.iface is not None and (not 0 < len(args.iface) <= 15 or "/" in args.iface
                                   or any(c.isspace() for c in args.iface)
                                   or args.iface in (".", "..")):
        raise ConfigError("--iface", f"{args.iface!r} is not an interface name (1 to 15 "
                          "characters, no '/' or spaces)")
    if args.iface_regex is not None:
        try:
            re.compile(args.iface_regex)
        except re.error as exc:
            raise ConfigError("--iface-regex", f"{args.iface_regex!r}: {exc}") from None
    if args.public_ip is not None:
        try:
            public = ip_address(args.public_ip)
        except ValueError:
            raise ConfigError("--public-ip", f"{args.public_ip!r} is not an IPv4 or IPv6 "
                              "address") from None
        if args.underlay_family and public.version != int(args.underlay_family[-1]):
            raise ConfigError("--public-ip", f"{public} is not an {args.underlay_family} "
                              "address, as --underlay-family says")
        if public.is_loopback or public.is_multicast or public.is_unspecified:
            raise ConfigError("--public-ip", f"{public} cannot carry VXLAN to other hosts")
    if args.vtep_mac is not None:
        parse_mac(args.vtep_mac, "--vtep-mac")
    for flag in ("--grpc-listen", "--grpc-advertise", "--health-addr", "--metrics-addr"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            split_hostport(value, flag)
    swim = SwimConfig(probe_interval=args.probe_interval, probe_timeout=args.probe_timeout,
                      indirect_probes=args.indirect_probes, suspect_timeout=args.suspect_timeout,
                      suspect_timeout_max=args.suspect_timeout_max,
                      push_pull_interval=args.push_pull_interval)
    swim.validate()
    return AgentOptions(
        etcd=etcdstore.options_from_args(args),
        node_name=args.node_name, iface=args.iface, iface_regex=args.iface_regex,
        public_ip=args.public_ip, mtu=args.mtu, vtep_mac=args.vtep_mac,
        grpc_listen=args.grpc_listen, grpc_advertise=args.grpc_advertise,
        underlay_family={"ipv4": 4, "ipv6": 6}.get(args.underlay_family or ""),
        run_dir=args.run_dir, state_dir=args.state_dir, lease_ttl=args.lease_ttl,
        restart_grace=args.restart_grace,
        reconcile_interval=args.reconcile_interval, health_addr=args.health_addr,
        metrics_addr=args.metrics_addr, ip_masq=args.ip_masq, vxlan_filter=args.vxlan_filter,
        membership=swim,
        tls=tls_files(args.tls_cert, args.tls_key, args.tls_ca),
        etcd_startup_timeout=args.etcd_startup_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    logsetup.quiet_grpc()
    args = build_parser().parse_args(argv)
    logsetup.setup(args.log_format, args.log_level)
    log = logging.getLogger("overlayd")
    if os.geteuid() != 0:
        log.error("overlayd needs root (CAP_NET_ADMIN) to program the kernel")
        return cli.EXIT_USAGE
    try:
        opts = options_from_args(args)
        # Deliberately here: the agent's imports (pyroute2, grpc, etcd3aio) cost ~0.5 s,
        # which `overlayd --help` and a mistyped flag should not pay.
        from overlay.agent.agent import Agent

        log.info("overlayd %s starting", __version__)
        return asyncio.run(Agent(opts).run())
    except KeyboardInterrupt:
        return cli.EXIT_OK
    except Exception as exc:
        failure = cli.explain(exc)
        if isinstance(exc, ConfigError):
            log.error("invalid configuration: %s", exc)
        elif failure.code == cli.EXIT_BUG:
            # A daemon's log is where a bug is reported from: keep the traceback there.
            log.error("%s", failure.message, exc_info=exc)
        else:
            log.error("%s", failure.message)
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
