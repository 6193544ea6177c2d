"""`overlayctl sandbox node|pod|fault|etcd|exec|iperf|watch|chaos`: a running sandbox as a
network lab. Each command says what it did; every error is one sentence: a lab step that
failed here (exit 1), the rest through overlay.cli like every other command."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from overlay.ctl import render
from overlay.errors import ConfigError
from overlay.sandbox import lab
from overlay.sandbox.observe import agent_state
from overlay.sandbox.sandbox import Pod, Sandbox, SandboxError

LAB_COMMANDS = ("node", "pod", "fault", "etcd", "exec", "iperf", "watch", "chaos")


def progress(msg: str) -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    sb = Sandbox(args.name)
    try:
        sb.st  # noqa: B018 - says "not up" as a sentence before anything else
        return int(globals()[f"cmd_{args.sb_cmd}"](sb, args))
    except SandboxError as exc:
        print(f"overlayctl sandbox {args.sb_cmd}: {exc.message}", file=sys.stderr)
        if exc.log:
            print(f"---- log ----\n{exc.log}\n-------------", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:  # a tool the lab runs; OSError: overlay.cli
        err = exc.stderr or b""
        why = (err.decode(errors="replace") if isinstance(err, bytes) else str(err)
               ).strip().splitlines()[-1:]
        print(f"overlayctl sandbox {args.sb_cmd}: `{' '.join(map(str, exc.cmd))}` failed "
              f"(exit {exc.returncode})" + (f": {why[0]}" if why else ""), file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"overlayctl sandbox {args.sb_cmd}: `{' '.join(map(str, exc.cmd))}` did not "
              f"finish within {exc.timeout:g}s", file=sys.stderr)
        return 1


def subnets(sb: Sandbox, node: str) -> str:
    """The node's subnets in a sentence (the raw `subnet` is empty on an IPv6-only node)."""
    me = sb.status(node).self
    return render.subnets_text(me.subnet, me.subnet6, " and ")


def addresses(p: Pod) -> str:
    """A pod's addresses: IPv4, IPv6 or both on a dual-stack cluster."""
    return render.subnets_text(p.ip, p.ip6, " and ")


def cmd_node(sb: Sandbox, args: argparse.Namespace) -> int:
    name, action = args.node, args.action
    if name is None and action != "add":
        raise SandboxError("node", f"`sandbox node {action}` needs the node's name")
    if action == "add":
        if name is not None and any(h.name == name for h in sb.st.nodes):
            raise SandboxError("node", f"a node named {name} exists already")
        if name is not None and not name.isalnum():
            raise SandboxError("node", f"node name {name!r} must be letters and digits")
        h = sb.add_node(name)
        print(f"node {h.name} added (underlay {h.underlay_ip}, namespace {h.netns}): ready, "
              f"subnet {subnets(sb, h.name)}; add pods with `overlayctl sandbox pod "
              f"add {h.name} --name {sb.name}`")
        return 0
    sb.node(name)
    if action == "remove":
        done = lab.remove_node(sb, name)
        print(f"node {name} removed: " + "; ".join([*done, "namespace and files deleted"]))
    elif action == "kill":
        pid = lab.kill_agent(sb, name, signal.SIGKILL)
        print(f"agent on {name} (pid {pid}) killed with SIGKILL; its pods keep their network; "
              f"`sandbox node restart {name}` starts it again")
    elif action == "restart":
        was = agent_state(sb, name)
        pid = lab.restart_agent(sb, name)
        print(f"agent on {name} {'restarted' if was != 'not running' else 'started'} "
              f"(pid {pid}) and ready, subnet {subnets(sb, name)}")
    elif action in ("stop", "cont"):
        pid = lab.pause_agent(sb, name, action == "stop")
        print(f"agent on {name} (pid {pid}) " + (
            "stopped with SIGSTOP: its peers will see it suspect, then dead; `sandbox node "
            f"cont {name}` resumes it" if action == "stop" else "continued with SIGCONT"))
    elif action == "reboot":
        t0 = time.monotonic()
        pods = lab.reboot(sb, name)
        print(f"node {name} rebooted in {time.monotonic() - t0:.1f}s: namespace, devices and "
              f"runtime state recreated, persisted state kept; agent ready (pid "
              f"{sb.node(name).pid}), subnet {subnets(sb, name)}; "
              f"{len(pods)} pod(s) attached again: "
              + (", ".join(f"{p.name} {addresses(p)}" for p in pods) or "none"))
    return 0


def cmd_pod(sb: Sandbox, args: argparse.Namespace) -> int:
    if args.action == "add":
        p = lab.add_pod(sb, args.target, args.pod)
        print(f"pod {p.name} added on {p.node}: {addresses(p)} (namespace {p.netns}, container "
              f"{p.container_id})")
    else:
        p = sb.pod(args.target)
        lab.del_pod(sb, args.target)
        print(f"pod {p.name} deleted from {p.node} (CNI DEL; namespace {p.netns} removed"
              + (f", {p.ip} released)" if p.ip else ")"))
    return 0


def cmd_fault(sb: Sandbox, args: argparse.Namespace) -> int:
    c = args.fault_cmd
    if c == "partition":
        lab.partition(sb, args.host)
        print(f"{args.host} partitioned: every underlay frame to or from it is dropped; "
              "`sandbox fault heal` lifts it")
    elif c == "loss":
        lab.set_loss(sb, args.percent)
        print(f"underlay loss set to {args.percent}% of all frames" if args.percent
              else "underlay loss lifted")
    elif c == "bandwidth":
        lab.limit(sb, args.host, args.rate)
        print(f"{args.host}'s underlay link capped at {args.rate} in both directions")
    else:
        lifted = lab.heal(sb)
        print("healed: " + (", ".join(lifted) + " lifted" if lifted else
                            "no underlay fault was in effect"))
    return 0


def cmd_etcd(sb: Sandbox, args: argparse.Namespace) -> int:
    if args.action == "kill":
        lab.etcd_kill(sb, args.member)
    else:
        lab.etcd_restart(sb, args.member)
    running, total = lab.etcd_running(sb)
    quorum = "quorum kept" if running * 2 > total else "quorum LOST: etcd refuses every request"
    print(f"etcd member {args.member} " + ("killed (SIGKILL; its data stays)" if args.action ==
                                           "kill" else "running again") +
          f"; {running} of {total} members running, {quorum}")
    return 0


def cmd_exec(sb: Sandbox, args: argparse.Namespace) -> int:
    cmd = list(args.command)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise SandboxError("exec", "no command given: `sandbox exec NODE|POD -- CMD ...`")
    ns = lab.namespace_of(sb, args.target)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False).returncode
    except KeyboardInterrupt:
        return 130


def cmd_iperf(sb: Sandbox, args: argparse.Namespace) -> int:
    if args.seconds > 600:
        raise ConfigError("--seconds", "at most 600")
    r = lab.iperf(sb, args.src, args.dst, args.seconds)
    print(f"{r['src']} -> {r['dst']} ({r['dstIP']}): {bit_rate(r['bitsPerSecond'])} "
          f"over {r['seconds']:g}s, {r['retransmits']} retransmits")
    return 0


def bit_rate(bps: float) -> str:
    """2.35 Gbit/s, 812 Mbit/s, 96.4 kbit/s: a capped or lossy link is not '0.00 Gbit/s'."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            v = bps / scale
            return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{bps:.0f} bit/s"


def cmd_watch(sb: Sandbox, args: argparse.Namespace) -> int:
    tty = sys.stdout.isatty()
    frames = 0
    try:
        while True:
            t0 = time.monotonic()
            if not sb.state_path.exists():
                raise SandboxError("watch", f"sandbox {sb.name} is gone")
            sb.state = type(sb.st).load(sb.state_path)  # other commands change it meanwhile
            frame = render.watch_frame(lab.views(sb, timeout=min(1.0, args.interval)))
            # In place on a terminal (home, clear to the end); frames one after another else.
            sys.stdout.write(("\x1b[H\x1b[J" if tty else ("\n" if frames else "")) + frame)
            sys.stdout.flush()
            frames += 1
            if args.count and frames >= args.count:
                return 0
            time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        return 0


def cmd_chaos(sb: Sandbox, args: argparse.Namespace) -> int:
    from overlay.sandbox.chaos import markdown
    from overlay.sandbox.nemesis import Nemesis

    if args.seconds > 24 * 3600:
        raise ConfigError("--seconds", "at most a day (86400)")
    prefix = Path(args.report or f"chaos-{sb.name}-{args.seed}")
    nem = Nemesis(sb, args.seed, args.seconds, args.overlap, args.heal_bound, progress,
                  spared=[x for x in args.spare.split(",") if x])
    doc = nem.run()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    js, md = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".md")
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    heal = doc["heal"]
    print(f"\n{doc['result'].upper()}: {len(doc['faults'])} faults in {len(doc['rounds'])} "
          f"rounds over {doc['duration_s']:.0f}s (seed {doc['seed']}), "
          f"{len(doc['violations'])} violations"
          + (f"; heal median {heal['median_s']}s, worst {heal['max_s']}s" if heal.get("n")
             else "")
          + (f"; stopped: {doc['stopped']}" if doc["stopped"] else "")
          + ("; interrupted, every fault undone" if doc["interrupted"] else ""))
    print(f"report: {js} and {md}")
    for v in doc["violations"][:10]:
        print(f"  round {v['round']}: {v['invariant']} ({v['subject']}): {v['message']}")
    if doc["interrupted"]:
        return 130
    return 0 if doc["result"] == "pass" else 1
