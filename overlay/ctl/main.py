"""overlayctl: the admin CLI of the overlay network.

Each subcommand imports what it needs (etcd, gRPC, pyroute2, scapy, the
sandbox) when it runs, deliberately: `--help` and every command pay only
for their own imports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from overlay import __version__, etcdstore
from overlay.ctl import render
from overlay.errors import ConfigError, OverlayError, PermanentError, TemporaryError
from overlay.log import quiet_grpc

DESCRIPTION = """\
overlayctl: administer the overlay network.

  network init   write the cluster network config to etcd (once per cluster)
  network show   print the network config stored in etcd
  leases         list the subnet leases in etcd
  status         this node's agent: readiness and its peers
  leave          make this node's agent leave the cluster gracefully
  install-cni    install the CNI plugin and its conflist for container runtimes
  trace          show the packets between two pods: outer and inner headers
  sandbox        run a whole multi-node cluster on this machine (namespaces)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overlayctl", description=DESCRIPTION,
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
                      help="the cluster (pod) network (default: %(default)s)")
    init.add_argument("--subnet-len", type=int, default=24,
                      help="prefix length of each node's subnet (default: %(default)s)")
    init.add_argument("--vni", type=int, default=1, help="VXLAN network identifier (default: 1)")
    init.add_argument("--port", type=int, default=8472, help="VXLAN UDP port (default: 8472)")
    init.add_argument("--force", action="store_true", help="overwrite an existing config")
    init.add_argument("--config-file", type=Path,
                      help="read the config from this JSON file instead of the flags, e.g. "
                      '{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": '
                      '"vxlan", "VNI": 1, "Port": 8472}} (a Kubernetes ConfigMap)')
    show = nsub.add_parser("show", help="print the network config")
    etcdstore.add_arguments(show)

    leases = sub.add_parser("leases", help="list the subnet leases in etcd")
    etcdstore.add_arguments(leases)
    leases.add_argument("--json", action="store_true")

    status = sub.add_parser("status", help="this node's agent and its peers")
    status.add_argument("--socket", default="/run/overlay/overlayd.sock",
                        help="the agent's local API socket (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    leave = sub.add_parser("leave", help="graceful leave: release the lease, tell the peers")
    leave.add_argument("--socket", default="/run/overlay/overlayd.sock")

    inst = sub.add_parser("install-cni", help="install the CNI plugin and conflist",
                          description="Install the `overlay` CNI executable into --bin-dir and "
                          "write 10-overlay.conflist (overlay, then portmap) into --conf-dir, "
                          "atomically.")
    inst.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    inst.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    inst.add_argument("--agent-socket", default="/run/overlay/cni.sock",
                      help="where the node agent serves the plugin (default: %(default)s)")
    inst.add_argument("--network-name", default="overlay")
    inst.add_argument("--cni-version", default="1.0.0",
                      choices=("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"))
    inst.add_argument("--no-portmap", action="store_true", help="do not chain portmap")
    inst.add_argument("--ip-masq", action="store_true",
                      help="set ipMasq (needs overlayd --ip-masq)")
    inst.add_argument("--conflist", type=Path,
                      help="install this conflist (JSON, first plugin of type overlay) instead "
                      "of generating one from the flags above")
    # The plugin is one static executable whatever the host has: these two once chose a
    # Python launcher and are accepted so that existing manifests keep working.
    inst.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)
    inst.add_argument("--python", default=None, help=argparse.SUPPRESS)

    from overlay.ctl import trace

    trace.add_parser(sub)

    sb = sub.add_parser("sandbox", help="a multi-node cluster on this machine",
                        description="Build a cluster of network namespaces on this machine: "
                        "an underlay bridge, real etcd, one real overlayd per node and pods "
                        "attached through the real CNI plugin. Needs root.")
    ssub = sb.add_subparsers(dest="sb_cmd", metavar="SUBCOMMAND")
    ssub.required = True
    up = ssub.add_parser("up", help="create the sandbox")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--pods-per-node", type=int, default=2)
    up.add_argument("--etcd-members", type=int, default=1, choices=(1, 3, 5))
    up.add_argument("--cidr", default="10.244.0.0/16")
    up.add_argument("--subnet-len", type=int, default=24)
    up.add_argument("--tls", action="store_true",
                    help="make a CA and a certificate per node; agents talk mutual TLS")
    up.add_argument("--etcd-tls", action="store_true",
                    help="etcd serves https and requires client certificates (its own CA); "
                         "every agent gets one")
    for name, helptext in (("check", "ping every pod from every pod"),
                           ("status", "nodes, subnets and peers"),
                           ("down", "remove everything the sandbox made")):
        s = ssub.add_parser(name, help=helptext)
        if name == "status":
            s.add_argument("--json", action="store_true")
    for s in ssub.choices.values():
        s.add_argument("--name", default="demo", help="sandbox name (default: %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    quiet_grpc()
    # `overlayctl ... | head` ends quietly, as a Unix tool should, not with a traceback.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except ConfigError as exc:
        print(f"overlayctl: invalid {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except (TemporaryError, PermanentError, OverlayError) as exc:
        print(f"overlayctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "network":
        return asyncio.run(network_cmd(args))
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
    if args.cmd == "trace":
        from overlay.ctl import trace

        return trace.run(args)
    if args.cmd == "sandbox":
        from overlay.ctl.sandbox_cmd import sandbox_cmd

        return sandbox_cmd(args)
    raise AssertionError(args.cmd)


async def network_cmd(args: argparse.Namespace) -> int:
    from overlay.etcdstore import EtcdStore
    from overlay.model import NetworkConfig, parse_cidr, validate_network

    if args.net_cmd == "init":
        if args.config_file is not None:
            try:
                raw = args.config_file.read_bytes()
            except OSError as exc:
                raise ConfigError("--config-file", f"{args.config_file}: {exc.strerror}") \
                    from None
            cfg = NetworkConfig.from_json(raw)
        else:
            cfg = NetworkConfig(network=parse_cidr(args.cidr, "--cidr"),
                                subnet_len=args.subnet_len, vni=args.vni, port=args.port)
        validate_network(cfg, tuple(local_networks()))
    async with EtcdStore(etcdstore.options_from_args(args)) as store:
        if args.net_cmd == "show":
            print((await store.get_config()).to_json())
            return 0
        if await store.put_config(cfg, overwrite=args.force):
            print(f"network config written to {store.prefix}network/config: {cfg.to_json()}")
            print(f"{cfg.subnet_count} node subnets of /{cfg.subnet_len} in {cfg.network}")
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
        print(f"overlayctl: a network config already exists: {existing}\n"
              "  changing it under running nodes breaks them; use --force if you mean it",
              file=sys.stderr)
        return 1


def local_networks() -> list[Any]:
    """IPv4 networks of this host's interfaces, which a cluster CIDR must not overlap."""
    import socket as _s
    from ipaddress import IPv4Interface

    out = []
    try:
        import fcntl  # noqa: F401

        from pyroute2 import IPRoute

        from overlay.devnames import is_node_device

        with IPRoute() as ipr:
            for a in ipr.addr("dump", family=_s.AF_INET):
                iface = IPv4Interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                label = a.get("IFA_LABEL") or ""
                # Our own devices hold cluster addresses once overlayd ran here.
                if is_node_device(label):
                    continue
                if not iface.ip.is_loopback:
                    out.append(iface.network)
    except Exception:
        pass
    return out


async def leases_cmd(args: argparse.Namespace) -> int:
    from overlay.etcdstore import EtcdStore

    async with EtcdStore(etcdstore.options_from_args(args)) as store:
        snap = await store.list_leases()
    rows = sorted(snap.entries.values(), key=lambda e: e.record.subnet)
    if args.json:
        print(json.dumps([{"subnet": str(e.record.subnet), "node": e.record.node,
                           "underlayIP": str(e.record.underlay_ip), "vtepMAC": e.record.vtep_mac,
                           "grpcAddr": e.record.grpc_addr, "etcdLease": e.lease_id,
                           "modRevision": e.mod_revision} for e in rows], indent=2))
        return 0
    table: list[tuple[str, ...]] = [("SUBNET", "NODE", "UNDERLAY", "VTEP MAC", "GRPC")]
    table += [(str(e.record.subnet), e.record.node, str(e.record.underlay_ip), e.record.vtep_mac,
               e.record.grpc_addr) for e in rows]
    render.print_table(table)
    for key, why in snap.invalid:
        print(f"invalid: {key}: {why}", file=sys.stderr)
    return 0


def status_cmd(args: argparse.Namespace) -> int:
    from overlay.agent.localclient import local_status, status_json

    try:
        st = local_status(args.socket)
    except Exception as exc:
        print(f"overlayctl: cannot reach overlayd at {args.socket}: "
              f"{str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status_json(st), indent=2))
        return 0 if st.ready else 1
    print(f"node {st.self.name}: subnet {st.self.subnet or '-'}, underlay "
          f"{st.self.underlay_ip or '-'}, VTEP {st.self.vtep_mac or '-'}, MTU {st.mtu}, "
          f"{'ready' if st.ready else 'NOT READY'}"
          f"{', DEGRADED (started without etcd)' if st.degraded else ''}")
    for c in st.conditions:
        if not c.ok:
            print(f"  {c.name}: {c.message}")
    print()
    render.print_table(render.peer_rows(status_json(st)["peers"]))
    return 0 if st.ready else 1
