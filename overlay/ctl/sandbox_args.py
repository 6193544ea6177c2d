"""The arguments of `overlayctl sandbox node|pod|fault|etcd|exec|iperf|watch|chaos`.

Parsers only (no heavy imports: `overlayctl --help` stays fast); the commands
are in sandbox_cmd.py.
"""

from __future__ import annotations

import argparse
from typing import Any

from overlay import cli
from overlay.ctl import flags

NODE_ACTIONS = {
    "add": "start a new node (NAME optional: the next free n<i>) and wait until it is ready",
    "remove": "take the node out for good: its pods deleted, its agent leaves the cluster",
    "kill": "SIGKILL the node's agent (a crash); pods keep their network",
    "restart": "stop the agent (SIGTERM) and start it again; wait until it is ready",
    "stop": "SIGSTOP the agent (hung: peers see it suspect, then dead)",
    "cont": "SIGCONT a stopped agent",
    "reboot": "power the node off (agent, namespace, devices, pods, /run gone; persisted state "
              "kept) and on again: agent started, pods attached again",
}


def add_parsers(ssub: Any) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    node = ssub.add_parser(
        "node", help="add, remove, kill, restart, stop, continue or reboot a node",
        formatter_class=raw, description="Change a node of a running sandbox.\n\n" + "\n".join(
            f"  {k:8} {v}" for k, v in NODE_ACTIONS.items()))
    node.add_argument("action", choices=tuple(NODE_ACTIONS))
    node.add_argument("node", metavar="NAME", nargs="?")

    pod = ssub.add_parser("pod", help="add a pod to a node, or delete one (through the CNI "
                          "conflist, as a runtime does)",
                          description="`pod add NODE [--pod NAME]` or `pod del POD`.")
    pod.add_argument("action", choices=("add", "del"))
    pod.add_argument("target", metavar="NODE|POD")
    pod.add_argument("--pod", metavar="NAME", help="name of the new pod (default: "
                     "<node>-p<i>)")

    fault = ssub.add_parser(
        "fault", help="underlay faults: partition, loss, bandwidth caps; heal lifts them all",
        formatter_class=raw, description="Faults on the sandbox's underlay (nftables and tc in "
        "its own namespaces only).\n\n"
        "  partition HOST       drop every frame to and from a node or etcd member\n"
        "  loss PCT             drop PCT% of all underlay frames (0 lifts it)\n"
        "  bandwidth HOST RATE  cap a host's underlay link, both ways (tc rate: 1mbit, 500kbit)\n"
        "  heal                 lift every partition, loss and cap")
    fsub = fault.add_subparsers(dest="fault_cmd", metavar="FAULT")
    fsub.required = True
    fsub.add_parser("partition", help="cut a host off the underlay",
                    description="Drop every underlay frame to and from HOST (a node or an "
                    "etcd member) until `sandbox fault heal`.").add_argument(
        "host", metavar="HOST")
    fsub.add_parser("loss", help="drop a share of underlay frames",
                    description="Drop PCT% of all underlay frames, every host's; 0 lifts "
                    "it.").add_argument("percent", metavar="PCT", type=cli.int_range(0, 100))
    bw = fsub.add_parser("bandwidth", help="cap a host's underlay link",
                         description="Cap HOST's underlay link at RATE in both directions "
                         "(a tc rate: 1mbit, 500kbit, 10mbps).")
    bw.add_argument("host", metavar="HOST")
    bw.add_argument("rate", metavar="RATE")
    fsub.add_parser("heal", help="lift every underlay fault",
                    description="Lift every partition, loss and bandwidth cap in effect.")
    for leaf in fsub.choices.values():
        # Also after the fault's own arguments; the default stays the one `fault` has.
        leaf.add_argument("--name", type=flags.sandbox_name, default=argparse.SUPPRESS,
                          help="the sandbox; also accepted here, after the fault's arguments")

    etcd = ssub.add_parser("etcd", help="kill or restart an etcd member",
                           description="`etcd kill MEMBER` (SIGKILL; its data stays) or `etcd "
                           "restart MEMBER` (rejoins with its data).")
    etcd.add_argument("action", choices=("kill", "restart"))
    etcd.add_argument("member")

    ex = ssub.add_parser("exec", help="run a command in a node, pod or etcd member's namespace",
                         description="Run CMD inside the namespace of a node, a pod, an etcd "
                         "member or `underlay`, with this terminal; exits with its status. "
                         "Put --name before the target: `sandbox exec --name demo n1 -- ip "
                         "route`.")
    ex.add_argument("target", metavar="NODE|POD")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    ip = ssub.add_parser("iperf", help="TCP throughput from one pod to another (iperf3)",
                         description="Measure TCP throughput from the first pod to the second "
                         "across the overlay (an iperf3 server in the second, started and "
                         "stopped by this command).")
    ip.add_argument("src", metavar="POD")
    ip.add_argument("dst", metavar="POD")
    ip.add_argument("--seconds", type=cli.seconds, default=3.0, help="how long to measure, "
                    "at most 600 (default: %(default)s)")

    w = ssub.add_parser("watch", help="live table of every node's view of every peer",
                        description="Redraws, in place, how every node's agent sees every "
                        "other node (alive, suspect, dead; * = not programmed), the agents' "
                        "process states and the faults in effect, until Ctrl-C.")
    w.add_argument("--interval", type=cli.seconds, default=1.0, help="seconds between frames "
                   "(default: %(default)s)")
    w.add_argument("--count", type=cli.int_range(0), default=0, help="stop after this many "
                   "frames (default: 0, until Ctrl-C)")

    from overlay.sandbox.chaos import KINDS

    ch = ssub.add_parser(
        "chaos", help="faults at random, then prove the cluster heals (a nemesis)",
        formatter_class=raw, description="Inject faults at random for --seconds (the seed makes "
        "the sequence reproducible), up to --overlap at once; after each round, check by "
        "means independent of the agent (etcdctl, ip, bridge, ping) that the cluster is whole "
        "again within --heal-bound seconds. Writes a report (JSON and Markdown) listing every "
        "fault with its heal time and every violation with its evidence; exits 1 on a "
        "violation. Partitions last longer than the agents' lease TTL (`sandbox up "
        "--lease-ttl`). Every fault is undone on the way out, Ctrl-C included.\n\nfaults:\n"
        + "\n".join(f"  {k:15} {v}" for k, v in KINDS.items()))
    ch.add_argument("--seconds", type=cli.seconds, default=60.0, help="start no new round "
                    "after this many seconds, at most a day (default: %(default)s)")
    ch.add_argument("--seed", type=cli.int_range(0), default=1, help="the same seed on the "
                    "same topology plays the same faults (default: %(default)s)")
    ch.add_argument("--overlap", type=cli.int_range(1), default=1, help="at most this many "
                    "faults at once (default: %(default)s)")
    ch.add_argument("--heal-bound", type=cli.seconds, default=60.0, help="seconds a round may "
                    "take to heal after its last undo (default: %(default)s)")
    ch.add_argument("--spare", default="", metavar="NAMES", help="comma-separated nodes or "
                    "etcd members whose processes are never killed, stopped or rebooted (they get "
                    "every other fault): long-lived witnesses, e.g. for a leak check "
                    "(default: none)")
    ch.add_argument("--report", type=cli.path, default=None, metavar="PREFIX", help="write "
                    "PREFIX.json and PREFIX.md (default: chaos-<name>-<seed> in the current "
                    "directory)")
