"""overlayctl: the admin CLI of the overlay network.

Each subcommand imports what it needs (etcd, gRPC, pyroute2, scapy, the
sandbox) when it runs, deliberately: `--help` and every command pay only
for their own imports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overlay import __version__, cli, etcdstore
from overlay.ctl import flags, render
from overlay.errors import ConfigError, OverlayError
from overlay.log import quiet_grpc

if TYPE_CHECKING:
    from overlay.model import NetworkConfig

DESCRIPTION = """\
overlayctl: administer the overlay network.

  network init   write the cluster network config to etcd (once per cluster)
  network show   print the network config stored in etcd
  leases         list the subnet leases in etcd
  status         this node's agent: readiness and its peers
  leave          make this node's agent leave the cluster gracefully
  install-cni    install the CNI plugin and its conflist for container runtimes
  uninstall      remove everything overlay left on this node (overlayd stopped)
  trace          show the packets between two pods: outer and inner headers
  sandbox        run a whole multi-node cluster on this machine (namespaces)

`overlayctl COMMAND --help` explains a command's flags.
"""

EPILOG = """\
environment: OVERLAYD_ETCD_ENDPOINTS supplies the default of --etcd-endpoints
(as for overlayd); OVERLAY_DEBUG=1 adds the traceback to an internal error.

exit status: 0 done, 1 failed (etcd or the agent unreachable, a file not
writable, ...), 2 invalid flags or values, 130 interrupted.
"""

# network init: the config key each flag sets, so an error names the flag the user typed.
NETWORK_FLAGS = {"Network": "--cidr", "SubnetLen": "--subnet-len", "IPv6Network": "--ipv6-cidr",
                 "IPv6SubnetLen": "--ipv6-subnet-len", "Backend.VNI": "--vni",
                 "Backend.Port": "--port", "EnableIPv4": "--no-ipv4"}
LOCAL_SOCKET = Path("/run/overlay/overlayd.sock")
MAX_SANDBOX_NODES = 200  # node underlay addresses 172.30.1.11 .. 172.30.1.210
MAX_SANDBOX_PODS = 250


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlayctl", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"overlayctl {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    net = sub.add_parser("network", help="the cluster network config in etcd")
    nsub = net.add_subparsers(dest="net_cmd", metavar="SUBCOMMAND")
    nsub.required = True
    init = nsub.add_parser("init", help="write the network config (once per cluster)",
                           description="Write the cluster network config to "
                           "<prefix>network/config. Refuses to overwrite a different existing "
                           "config unless --force is given; an identical one is left as it is "
                           "(exit 0), so every node may run it.")
    etcdstore.add_arguments(init)
    init.add_argument("--cidr", default="10.244.0.0/16",
                      help="the IPv4 pod network (flannel's Network; default: %(default)s)")
    init.add_argument("--subnet-len", type=cli.int_range(0, 32), default=None, metavar="LEN",
                      help="prefix length of each node's IPv4 subnet, between the --cidr "
                      "length and 29 (default: 24, or a quarter of a network smaller than a "
                      "/22, as flannel)")
    init.add_argument("--no-ipv4", action="store_true",
                      help="an IPv6-only cluster (flannel's \"EnableIPv4\": false)")
    init.add_argument("--ipv6-cidr", default=None,
                      help="the IPv6 pod network, e.g. fd00:10:244::/56: dual-stack, or "
                      "IPv6-only with --no-ipv4 (flannel's IPv6Network)")
    init.add_argument("--ipv6-subnet-len", type=cli.int_range(0, 128), default=None,
                      metavar="LEN",
                      help="prefix length of each node's IPv6 subnet (default: 64)")
    init.add_argument("--direct-routing", action="store_true",
                      help="plain routes, without VXLAN, to nodes on the same underlay "
                      "subnet (flannel's Backend.DirectRouting)")
    init.add_argument("--vni", type=cli.int_range(1, 16777215), default=1,
                      help="VXLAN network identifier, 1..16777215 (default: %(default)s)")
    init.add_argument("--port", type=cli.port, default=8472,
                      help="VXLAN UDP port (default: %(default)s)")
    init.add_argument("--force", action="store_true",
                      help="overwrite an existing, different config (running nodes break)")
    init.add_argument("--keep-existing", action="store_true",
                      help="if a different config exists, keep it, say so and exit 0 (for "
                      "an init container: an edited ConfigMap must not keep pods in Init; "
                      "apply a change with --force, then restart the agents)")
    init.add_argument("--config-file", type=cli.path, metavar="FILE",
                      help="read the config from this JSON file instead of the flags: "
                      "flannel's net-conf.json as it is, e.g. "
                      '{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": '
                      '"fd00:10:244::/56", "Backend": {"Type": "vxlan"}} (a Kubernetes '
                      "ConfigMap)")
    show = nsub.add_parser("show", help="print the network config",
                           description="Print the network config stored in etcd (JSON).")
    etcdstore.add_arguments(show)

    leases = sub.add_parser("leases", help="list the subnet leases in etcd",
                            description="List the subnet leases in etcd: which node holds "
                            "which subnet, its underlay address, VTEP MAC and gRPC address.")
    etcdstore.add_arguments(leases)
    leases.add_argument("--json", action="store_true",
                        help="a JSON list (with the etcd lease and revision of each) instead "
                        "of a table")

    status = sub.add_parser("status", help="this node's agent and its peers",
                            description="Ask this node's overlayd for its readiness and its "
                            "view of every peer. Exits 1 if the agent is not ready.")
    status.add_argument("--socket", type=cli.path, default=LOCAL_SOCKET,
                        help="the agent's local API socket, <overlayd --run-dir>/overlayd.sock "
                        "(default: %(default)s)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    leave = sub.add_parser("leave", help="graceful leave: release the lease, tell the peers",
                           description="Make this node's overlayd leave the cluster: it tells "
                           "its peers (they drop its entries at once), releases its subnet "
                           "lease in etcd, removes its devices and exits.")
    leave.add_argument("--socket", type=cli.path, default=LOCAL_SOCKET,
                       help="the agent's local API socket, <overlayd --run-dir>/overlayd.sock "
                       "(default: %(default)s)")

    inst = sub.add_parser("install-cni", help="install the CNI plugin and conflist",
                          description="Install the `overlay` CNI executable into --bin-dir and "
                          "write 10-overlay.conflist (overlay, then portmap) into --conf-dir, "
                          "atomically.")
    inst.add_argument("--bin-dir", type=cli.path, default=Path("/opt/cni/bin"),
                      help="where the container runtime looks for CNI plugins "
                      "(default: %(default)s)")
    inst.add_argument("--conf-dir", type=cli.path, default=Path("/etc/cni/net.d"),
                      help="where the container runtime looks for network configs "
                      "(default: %(default)s)")
    inst.add_argument("--agent-socket", default="/run/overlay/cni.sock",
                      help="where the node agent serves the plugin, an absolute path "
                      "(default: %(default)s)")
    inst.add_argument("--network-name", default="overlay",
                      help="the network's name in the conflist, which runtimes select it by: "
                      "letters, digits, and . _ - after the first (default: %(default)s)")
    inst.add_argument("--cni-version", default="1.0.0",
                      choices=("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"),
                      help="cniVersion of the conflist (default: %(default)s)")
    inst.add_argument("--no-portmap", action="store_true",
                      help="do not chain the portmap plugin (hostPort mappings)")
    inst.add_argument("--ip-masq", action="store_true",
                      help="set ipMasq (needs overlayd --ip-masq)")
    inst.add_argument("--conflist", type=cli.path, metavar="FILE",
                      help="install this conflist (JSON, first plugin of type overlay) instead "
                      "of generating one from the flags above")
    # The plugin is one static executable whatever the host has: these two once chose a
    # Python launcher and are accepted so that existing manifests keep working.
    inst.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)
    inst.add_argument("--python", default=None, help=argparse.SUPPRESS)

    un = sub.add_parser(
        "uninstall", help="remove everything overlay left on this node",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Remove, on this node: the VXLAN device overlay.<VNI>, the bridge cni0 "
        "and pods' host veths; the nftables tables overlay and overlay_vxlan (ip and ip6); "
        "the plugin <bin-dir>/overlay and <conf-dir>/10-overlay.conflist; the DELs the plugin "
        "recorded while overlayd was down (cni-pending/ beside its agentSocket); the run and "
        "state dirs; and this node's subnet lease in etcd. Refuses while overlayd runs (stop it "
        "first: its supervisor would restart it and it would rebuild everything).",
        epilog="Left alone: net.ipv4.ip_forward, kernel modules, systemd unit files, and the "
        "cluster's network config in etcd (shared by every node).\n\n"
        "exit status: 0 when everything is gone, 1 if something was left (said why), "
        "2 on invalid flags.")
    un.add_argument("--bin-dir", type=cli.path, default=Path("/opt/cni/bin"),
                    help="where install-cni put the plugin (default: %(default)s)")
    un.add_argument("--conf-dir", type=cli.path, default=Path("/etc/cni/net.d"),
                    help="where install-cni wrote the conflist (default: %(default)s)")
    un.add_argument("--run-dir", type=cli.path, default=Path("/run/overlay"),
                    help="overlayd's --run-dir (default: %(default)s)")
    un.add_argument("--state-dir", type=cli.path, default=Path("/var/lib/overlay"),
                    help="overlayd's --state-dir (default: %(default)s)")
    un.add_argument("--node-name", default=os.environ.get("OVERLAYD_NODE_NAME"),
                    help="whose lease to delete (default: the name in --state-dir, or "
                    "$OVERLAYD_NODE_NAME)")
    un.add_argument("--keep-lease", action="store_true",
                    help="do not contact etcd; the lease expires after its TTL")
    un.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    etcdstore.add_arguments(un)

    from overlay.ctl import trace

    trace.add_parser(sub)

    sb = sub.add_parser("sandbox", help="a multi-node cluster on this machine",
                        description="Build a cluster of network namespaces on this machine: "
                        "an underlay bridge, real etcd, one real overlayd per node and pods "
                        "attached through the real CNI plugin. Needs root.")
    ssub = sb.add_subparsers(dest="sb_cmd", metavar="SUBCOMMAND")
    ssub.required = True
    up = ssub.add_parser("up", help="create the sandbox",
                         description="Create a sandbox: etcd, --nodes nodes each running "
                         "overlayd, --pods-per-node pods on each. Takes a few seconds per node.")
    up.add_argument("--nodes", type=cli.int_range(0, MAX_SANDBOX_NODES), default=3,
                    help=f"nodes, each a namespace running overlayd; 0 for etcd only, at most "
                    f"{MAX_SANDBOX_NODES} (default: %(default)s)")
    up.add_argument("--pods-per-node", type=cli.int_range(0, MAX_SANDBOX_PODS), default=2,
                    help="pods attached on each node through the CNI plugin "
                    "(default: %(default)s)")
    up.add_argument("--etcd-members", type=int, default=1, choices=(1, 3, 5),
                    help="members of the etcd cluster, each a namespace (default: %(default)s)")
    up.add_argument("--cidr", default="10.244.0.0/16",
                    help="the IPv4 pod network (default: %(default)s)")
    up.add_argument("--subnet-len", type=cli.int_range(0, 32), default=24, metavar="LEN",
                    help="prefix length of each node's IPv4 subnet (default: %(default)s)")
    up.add_argument("--ip-family", choices=("ipv4", "ipv6", "dual"), default="ipv4",
                    help="the pods' address families (default: %(default)s)")
    up.add_argument("--ipv6-cidr", default="fd00:10:244::/56",
                    help="the IPv6 pod network, for --ip-family ipv6 or dual "
                    "(default: %(default)s)")
    up.add_argument("--ipv6-subnet-len", type=cli.int_range(0, 128), default=64, metavar="LEN",
                    help="prefix length of each node's IPv6 subnet (default: %(default)s)")
    up.add_argument("--underlay-family", choices=("ipv4", "ipv6"), default="ipv4",
                    help="the hosts' network, which VXLAN travels over: 172.30.0.0/16 or "
                    "fd30::/64 (default: %(default)s)")
    up.add_argument("--underlay-segments", type=cli.int_range(1, 8), default=1, metavar="N",
                    help="N underlay bridges joined by a router namespace, nodes spread "
                    "over them (default: 1, one flat segment)")
    up.add_argument("--direct-routing", action="store_true",
                    help="DirectRouting: plain routes to nodes on the same segment, VXLAN "
                    "to the others")
    up.add_argument("--tls", action="store_true",
                    help="make a CA and a certificate per node; agents talk mutual TLS")
    up.add_argument("--etcd-tls", action="store_true",
                    help="etcd serves https and requires client certificates (its own CA); "
                         "every agent gets one")
    up.add_argument("--dry-run", action="store_true",
                    help="check the flags and say what would be made, without making it")
    up.add_argument("--lease-ttl", type=cli.int_range(5), default=None, metavar="SECONDS",
                    help="the agents' subnet lease TTL, at least 5 (default: overlayd's, 60); "
                    "a short one makes partitions longer than the TTL quick to try "
                    "(`sandbox chaos`)")
    for name, helptext, text in (
            ("check", "ping every pod from every pod", "Ping every pod from every other pod "
             "and print the matrix; exits 1 unless every pair answers."),
            ("status", "nodes, subnets and peers", "Show the sandbox's etcd, nodes (subnet, "
             "readiness, peers as each node sees them) and pods."),
            ("down", "remove everything the sandbox made", "Stop the sandbox's agents and "
             "etcd, and remove its namespaces and files (also what a failed `up` left).")):
        s = ssub.add_parser(name, help=helptext, description=text)
        if name == "status":
            s.add_argument("--json", action="store_true", help="machine-readable output")
    from overlay.ctl.sandbox_args import add_parsers

    add_parsers(ssub)
    for s in ssub.choices.values():
        flags.add_sandbox_name(s)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """overlayctl: every error is one line on stderr and an exit status (overlay.cli)."""

    # `overlayctl ... | head` ends quietly too: cli.run takes the BrokenPipeError (SIGPIPE
    # stays ignored: gRPC's sockets must not kill the process when a peer goes away).
    def run() -> int:
        quiet_grpc()
        return dispatch(build_parser().parse_args(argv))

    return cli.run("overlayctl", run)


def dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "network":
        cfg = network_config(args) if args.net_cmd == "init" else None
        return asyncio.run(network_cmd(args, cfg))
    if args.cmd == "leases":
        return asyncio.run(leases_cmd(args))
    if args.cmd == "status":
        return status_cmd(args)
    if args.cmd == "leave":
        from overlay.agent.localclient import local_leave

        local_leave(args.socket)
        print("leave requested; the agent releases its lease and exits")
        return 0
    if args.cmd == "install-cni":
        from overlay.cni.install import InstallOptions, install

        binary, conf = install(InstallOptions(
            bin_dir=args.bin_dir, conf_dir=args.conf_dir, agent_socket=args.agent_socket,
            network_name=args.network_name, cni_version=args.cni_version,
            portmap=not args.no_portmap, ip_masq=args.ip_masq, conflist_file=args.conflist))
        print(f"installed {binary}\nwrote {conf}")
        return 0
    if args.cmd == "uninstall":
        return uninstall_cmd(args)
    if args.cmd == "trace":
        from overlay.ctl import trace

        return trace.run(args)
    if args.cmd == "sandbox":
        from overlay.ctl.sandbox_cmd import sandbox_cmd

        return sandbox_cmd(args)
    raise AssertionError(args.cmd)


def uninstall_cmd(args: argparse.Namespace) -> int:
    from overlay.ctl.uninstall import UninstallOptions, apply, plan

    opts = UninstallOptions(bin_dir=args.bin_dir, conf_dir=args.conf_dir, run_dir=args.run_dir,
                            state_dir=args.state_dir, node_name=args.node_name,
                            etcd=None if args.keep_lease else etcdstore.options_from_args(args))
    actions, notes = plan(opts)
    if args.dry_run:
        for a in actions:
            print(f"would remove {a.what}")
        for n in notes:
            print(f"would leave {n}")
        return 0
    out = apply(actions)
    for what in out.done:
        print(f"removed {what}")
    for n in [*notes, *out.failed]:
        print(f"overlayctl: left {n}", file=sys.stderr)
    if not actions and not notes:
        print("nothing of overlay on this node")
    return 1 if notes or out.failed else 0


def network_config(args: argparse.Namespace) -> NetworkConfig:
    """The config `network init` would write, checked against this host's own networks.

    Before the event loop: pyroute2's synchronous IPRoute does not work inside one."""
    from overlay.model import NetworkConfig, validate_network

    if args.config_file is not None:
        try:
            raw = args.config_file.read_bytes()
        except OSError as exc:
            raise ConfigError("--config-file", cli.os_error(exc, "read")) from None
        try:
            cfg = NetworkConfig.from_json(raw)
        except ConfigError as exc:
            raise ConfigError("--config-file", f"{args.config_file}: {exc}") from None
        fields: dict[str, str] = {}
    else:
        cfg = config_from_flags(args)
        fields = NETWORK_FLAGS
    for note in cfg.notes:
        print(f"overlayctl: note: {note} (as in flannel)", file=sys.stderr)
    with cli.flag_names(fields):
        validate_network(cfg, tuple(local_networks()))
    return cfg


async def network_cmd(args: argparse.Namespace, cfg: NetworkConfig | None) -> int:
    from overlay.etcdstore import EtcdStore

    async with EtcdStore(etcdstore.options_from_args(args)) as store:
        if cfg is None:
            print((await store.get_config()).to_json())
            return 0
        if await store.put_config(cfg, overwrite=args.force):
            print(f"network config written to {store.prefix}network/config: {cfg.to_json()}")
            print(", ".join(f"{len(p.range_indexes)} node subnets of /{p.subnet_len} in "
                            f"{p.network} ({p.first} to {p.last})" for p in cfg.pools()))
            return 0
        try:
            current = await store.get_config()
            if current == cfg:
                print(f"network config already in {store.prefix}network/config, identical: "
                      f"{cfg.to_json()}")
                return 0
            existing = current.to_json()
        except OverlayError as exc:
            existing = f"(unreadable: {exc})"
        if args.keep_existing:
            print(f"overlayctl: keeping the network config in etcd: {existing}; it differs "
                  f"from the one given: {cfg.to_json()} (changing it under running nodes "
                  "breaks them: `overlayctl network init --force`, then restart every "
                  "agent, if you mean it)", file=sys.stderr)
            return 0
        print(f"overlayctl: a network config already exists: {existing}\n"
              "  changing it under running nodes breaks them; use --force if you mean it",
              file=sys.stderr)
        return 1


def config_from_flags(args: argparse.Namespace) -> NetworkConfig:
    """The flags as a flannel net-conf document, read like one (same checks and
    defaults); an error names the flag."""
    from overlay.model import NetworkConfig

    if ":" in args.cidr and not args.no_ipv4:
        raise ConfigError("--cidr", f"{args.cidr} is IPv6; give an IPv6 pod network with "
                          "--ipv6-cidr (and --no-ipv4 for an IPv6-only cluster)")
    doc: dict[str, Any] = {"Backend": {"Type": "vxlan", "VNI": args.vni, "Port": args.port}}
    if args.direct_routing:
        doc["Backend"]["DirectRouting"] = True
    if args.no_ipv4:
        doc["EnableIPv4"] = False
    else:
        doc["Network"] = args.cidr
        if args.subnet_len is not None:
            doc["SubnetLen"] = args.subnet_len
    if args.ipv6_cidr:
        doc.update(EnableIPv6=True, IPv6Network=args.ipv6_cidr)
        if args.ipv6_subnet_len is not None:
            doc["IPv6SubnetLen"] = args.ipv6_subnet_len
    elif args.ipv6_subnet_len is not None:
        raise ConfigError("--ipv6-subnet-len", "needs --ipv6-cidr")
    with cli.flag_names(NETWORK_FLAGS):
        return NetworkConfig.from_dict(doc)


def local_networks() -> list[IPv4Network | IPv6Network]:
    """Networks of this host's interfaces (both families), which a pod network must not
    overlap (our own bridge and VXLAN devices excepted: they hold cluster addresses)."""
    from ipaddress import ip_interface

    from pyroute2 import IPRoute

    from overlay.devnames import is_node_device

    out = []
    try:
        with IPRoute() as ipr:
            names = {m["index"]: m.get("IFLA_IFNAME") or "" for m in ipr.link("dump")}
            addrs = list(ipr.addr("dump"))
    except OSError as exc:
        # Not worth refusing to run over; worth saying the check did not happen.
        print(f"overlayctl: warning: cannot list this host's addresses to check --cidr "
              f"against them: {cli.os_error(exc)}", file=sys.stderr)
        return []
    for a in addrs:
        iface = ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
        if is_node_device(names.get(a["index"], "")):
            continue
        if not iface.ip.is_loopback and not iface.ip.is_link_local:
            out.append(iface.network)
    return out


async def leases_cmd(args: argparse.Namespace) -> int:
    from overlay.etcdstore import EtcdStore

    async with EtcdStore(etcdstore.options_from_args(args)) as store:
        snap = await store.list_leases()
    rows = sorted(snap.entries.values(),
                  key=lambda e: (e.record.key_subnet.version, e.record.key_subnet))
    if args.json:
        print(json.dumps([{"subnet": str(e.record.key_subnet),
                           "ipv6Subnet": str(e.record.subnet6) if e.record.subnet6 else None,
                           "node": e.record.node,
                           "underlayIP": str(e.record.underlay_ip), "vtepMAC": e.record.vtep_mac,
                           "grpcAddr": e.record.grpc_addr, "etcdLease": e.lease_id,
                           "modRevision": e.mod_revision} for e in rows], indent=2))
        return 0
    table: list[tuple[str, ...]] = [("SUBNET", "NODE", "UNDERLAY", "VTEP MAC", "GRPC")]
    table += [(" ".join(map(str, e.record.subnets)), e.record.node, str(e.record.underlay_ip),
               e.record.vtep_mac, e.record.grpc_addr) for e in rows]
    render.print_table(table)
    for key, why in snap.invalid:
        print(f"invalid: {key}: {why}", file=sys.stderr)
    return 0


def status_cmd(args: argparse.Namespace) -> int:
    from overlay.agent.localclient import local_status, status_json

    st = local_status(args.socket)
    if args.json:
        print(json.dumps(status_json(st), indent=2))
        return 0 if st.ready else 1
    subnets = render.subnets_text(st.self.subnet, st.self.subnet6, " and ")
    print(f"node {st.self.name}: subnet {subnets}, underlay "
          f"{st.self.underlay_ip or '-'}, VTEP {st.self.vtep_mac or '-'}, MTU {st.mtu}, "
          f"{'ready' if st.ready else 'NOT READY'}"
          f"{', DEGRADED (started without etcd)' if st.degraded else ''}")
    for c in st.conditions:
        if not c.ok:
            print(f"  {c.name}: {c.message}")
    print()
    render.print_table(render.peer_rows(status_json(st)["peers"]))
    return 0 if st.ready else 1
