"""Changing a running sandbox: nodes, pods, underlay faults, etcd members.

What `overlayctl sandbox node|pod|fault|etcd|exec|iperf|watch` do, and the
moves of the chaos runner (overlay/sandbox/nemesis.py). Everything acts on
namespaces and processes the sandbox made and recorded in its state; a
process is signalled by the PID the sandbox started, never by name.

A reboot is what a machine does: the agent dies with the power, the node's
namespace goes with every device in it, the pods go, the runtime state
(/run/overlay: sockets, address allocations) goes; the persisted state
(/var/lib/overlay: the node's name, VTEP MAC, last subnet) stays. On power-on
the agent starts again and the runtime attaches the node's pods again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from overlay.sandbox.faults import port_name
from overlay.sandbox.observe import agent_state, etcd_leases, process_state
from overlay.sandbox.sandbox import Pod, Sandbox, SandboxError, kill_and_wait, pid_alive, sh

RATE_RE = re.compile(r"^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$")


# --- nodes ---------------------------------------------------------------------------


def _running_agent(sb: Sandbox, node: str) -> int:
    state = agent_state(sb, node)
    if state in ("not running", "powered off"):
        raise SandboxError("node", f"the agent on {node} is {state}")
    return sb.node(node).pid


def kill_agent(sb: Sandbox, node: str, sig: int = signal.SIGKILL) -> int:
    """Stop the agent with `sig` (SIGKILL: a crash; SIGTERM: a clean stop). Its pid."""
    pid = _running_agent(sb, node)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
    sb.stop_agent(node, sig)
    return pid


def pause_agent(sb: Sandbox, node: str, pause: bool = True) -> int:
    """SIGSTOP (a hung process: the socket accepts, nothing answers) or SIGCONT."""
    pid = _running_agent(sb, node)
    os.kill(pid, signal.SIGSTOP if pause else signal.SIGCONT)
    return pid


def start_agent(sb: Sandbox, node: str, wait: float | None = 60) -> int:
    """Start the agent (after kill); with `wait`, until it is ready."""
    if node in sb.st.powered_off:
        raise SandboxError("node", f"{node} is powered off (mid-reboot); `sandbox node reboot "
                           f"{node}` brings it back")
    if pid_alive(sb.node(node).pid):
        raise SandboxError("node", f"the agent on {node} is already running "
                           f"(pid {sb.node(node).pid})")
    pid = sb.start_agent(node)
    if wait is not None:
        sb.wait_ready(node, wait)
    return pid


def restart_agent(sb: Sandbox, node: str, wait: float = 60) -> int:
    h = sb.node(node)
    if node in sb.st.powered_off:
        return start_agent(sb, node)  # raises, saying why
    if pid_alive(h.pid):
        kill_agent(sb, node, signal.SIGTERM)
    return start_agent(sb, node, wait)


def power_off(sb: Sandbox, node: str) -> None:
    """The first half of a reboot: agent, namespace, devices, pods and /run gone."""
    st, h = sb.st, sb.node(node)
    if node in st.powered_off:
        return
    if pid_alive(h.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(h.pid, signal.SIGCONT)
        sb.stop_agent(node, signal.SIGKILL, timeout=5)
    st.powered_off.append(node)
    sb.save()
    for pod in (p for p in st.pods if p.node == node):
        sh("ip", "netns", "del", pod.netns, check=False)
        pod.ip, pod.result = "", None
    # The underlay end first: a namespace's devices go asynchronously after `netns del`,
    # and the port's name must be free again for power-on.
    sh("ip", "-n", st.underlay, "link", "del", port_name(node), check=False)
    sh("ip", "netns", "del", h.netns, check=False)
    run = sb.node_dir(node) / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    sb.save()


def power_on(sb: Sandbox, node: str, wait: float = 60) -> list[Pod]:
    """The second half: a fresh namespace on the underlay, the agent started from its
    persisted state, and the node's pods attached again (as the runtime does at boot)."""
    st, h = sb.st, sb.node(node)
    if node not in st.powered_off:
        raise SandboxError("node", f"{node} is not powered off")
    with sb.step(f"power on {node}"):
        sh("ip", "-n", st.underlay, "link", "del", port_name(node), check=False)
        sb._new_ns(h.netns)
        sb._plug(node, h.netns, h.underlay_ip, st.underlay_mtu)
        if node in st.bandwidth:  # the cap was on the link that went with the namespace
            sb.limit_bandwidth(node, st.bandwidth[node])
        st.powered_off.remove(node)
        sb.save()
        sb.start_agent(node)
    sb.wait_ready(node, wait)
    names = [p.name for p in st.pods if p.node == node]
    st.pods = [p for p in st.pods if p.node != node]
    sb.save()
    return [add_pod(sb, node, n) for n in names]


def reboot(sb: Sandbox, node: str, down_seconds: float = 0, wait: float = 60) -> list[Pod]:
    power_off(sb, node)
    time.sleep(down_seconds)
    return power_on(sb, node, wait)


def remove_node(sb: Sandbox, node: str) -> list[str]:
    """Take a node out for good: its pods deleted through CNI, the agent leaves the cluster
    (releasing its subnet), its namespace and files go. What was done, in words."""
    from overlay.agent.localclient import local_leave

    st, h = sb.st, sb.node(node)
    done = []
    for pod in [p for p in st.pods if p.node == node]:
        try:
            del_pod(sb, pod.name)
            done.append(f"pod {pod.name} deleted")
        except Exception as exc:  # the namespace goes below anyway
            _forget_pod(sb, pod)
            done.append(f"pod {pod.name}: DEL failed ({str(exc).splitlines()[0]}); removed")
    if process_state(h.pid) == "running":
        try:
            local_leave(sb.agent_socket(node))
            deadline = time.monotonic() + 15
            while pid_alive(h.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            done.append("the agent left the cluster (subnet released)")
        except Exception as exc:
            done.append(f"leave failed ({str(exc).splitlines()[0][:120]})")
    if pid_alive(h.pid):
        kill_and_wait(h.pid, signal.SIGTERM, 10)
    for key in lease_keys_of(sb, node):
        sb.etcdctl("del", key, check=False)
        done.append(f"its lease {key} deleted from etcd")
    sh("ip", "netns", "del", h.netns, check=False)
    shutil.rmtree(sb.node_dir(node), ignore_errors=True)
    st.nodes = [x for x in st.nodes if x.name != node]
    if node in st.powered_off:
        st.powered_off.remove(node)
    st.bandwidth.pop(node, None)
    sb.save()
    if node in st.partitioned:
        sb.set_faults(st.loss_percent, [x for x in st.partitioned if x != node])
    return done


def lease_keys_of(sb: Sandbox, node: str) -> list[str]:
    """The etcd keys under /overlay/subnets/ whose record names `node` (etcdctl)."""
    leases, _ = etcd_leases(sb)
    return [lease.key for lease in leases if lease.node == node]


# --- pods ----------------------------------------------------------------------------


def next_pod_name(sb: Sandbox, node: str) -> str:
    used = {p.name for p in sb.st.pods}
    return next(f"{node}-p{i}" for i in range(1, 100_000) if f"{node}-p{i}" not in used)


def _forget_pod(sb: Sandbox, pod: Pod) -> None:
    sh("ip", "netns", "del", pod.netns, check=False)
    sb.st.pods = [p for p in sb.st.pods if p.name != pod.name]
    sb.save()


def add_pod(sb: Sandbox, node: str, name: str | None = None) -> Pod:
    """ADD through the node's conflist; as a runtime does, a failed ADD is followed by DEL
    and the pod's namespace goes (nothing of it stays in the sandbox state)."""
    if node in sb.st.powered_off:
        raise SandboxError("pod", f"{node} is powered off")
    sb.node(node)
    name = name or next_pod_name(sb, node)
    if any(p.name == name for p in sb.st.pods):
        raise SandboxError("pod", f"a pod named {name!r} exists already")
    try:
        return sb.add_pod(node, name)
    except SandboxError:
        pod = next((p for p in sb.st.pods if p.name == name), None)
        if pod is not None:
            with contextlib.suppress(Exception):
                sb.network(node).delete(pod.container_id, f"/run/netns/{pod.netns}", pod.ifname)
            _forget_pod(sb, pod)
        raise


def del_pod(sb: Sandbox, name: str) -> None:
    """DEL through the conflist, then the namespace goes; a DEL error is a SandboxError
    (the pod stays recorded, as a runtime would retry)."""
    from overlay.sandbox.runtime import CniCallError

    pod = sb.pod(name)
    if not pod.ip:  # never attached (its node is powered off)
        _forget_pod(sb, pod)
        return
    try:
        sb.del_pod(name)
    except CniCallError as exc:
        raise SandboxError("pod", f"DEL of {name} failed: {exc}") from None


# --- underlay faults -----------------------------------------------------------------


def partition(sb: Sandbox, host: str, on: bool = True) -> None:
    """Cut `host` (a node or an etcd member) off the underlay, or join it again."""
    sb._host(host)
    cut = set(sb.st.partitioned)
    cut = cut | {host} if on else cut - {host}
    sb.set_faults(sb.st.loss_percent, sorted(cut))


def set_loss(sb: Sandbox, percent: int) -> None:
    if not 0 <= percent <= 100:
        raise SandboxError("fault", f"loss {percent}% is not between 0 and 100")
    sb.set_faults(percent, sb.st.partitioned)


def limit(sb: Sandbox, host: str, rate: str) -> None:
    if not RATE_RE.match(rate):
        raise SandboxError("fault", f"rate {rate!r} is not a tc rate such as 1mbit, 500kbit, "
                           "10mbps")
    sb._host(host)
    if host in sb.st.powered_off:
        raise SandboxError("fault", f"{host} is powered off")
    sb.limit_bandwidth(host, rate)


def heal(sb: Sandbox) -> list[str]:
    """Lift every underlay fault: loss, partitions, bandwidth caps. What was lifted."""
    st = sb.st
    lifted = [f"partition of {h}" for h in st.partitioned]
    if st.loss_percent:
        lifted.append(f"{st.loss_percent}% loss")
    for host, rate in sorted(st.bandwidth.items()):
        if host not in st.powered_off:
            sb.unlimit_bandwidth(host)
        else:
            st.bandwidth.pop(host)
        lifted.append(f"{rate} cap on {host}")
    sb.clear_faults()
    return lifted


# --- etcd ----------------------------------------------------------------------------


def etcd_running(sb: Sandbox) -> tuple[int, int]:
    """(members running, members in the cluster)."""
    return sum(1 for h in sb.st.etcd if pid_alive(h.pid)), len(sb.st.etcd)


def etcd_kill(sb: Sandbox, member: str) -> None:
    h = sb.etcd_host(member)
    if not pid_alive(h.pid):
        raise SandboxError("etcd", f"etcd member {member} is not running")
    with contextlib.suppress(ProcessLookupError):
        os.kill(h.pid, signal.SIGCONT)
    sb.kill_etcd(member)


def etcd_restart(sb: Sandbox, member: str, wait: bool = True) -> None:
    h = sb.etcd_host(member)
    if pid_alive(h.pid):
        raise SandboxError("etcd", f"etcd member {member} is running already (pid {h.pid})")
    running, total = etcd_running(sb)
    # Alone without quorum it cannot answer a health check: wait only when it can.
    sb.restart_etcd(member, wait=wait and (running + 1) * 2 > total)


# --- where things run ----------------------------------------------------------------


def namespace_of(sb: Sandbox, target: str) -> str:
    """The namespace of a node, pod, etcd member or `underlay`."""
    st = sb.st
    if target in ("underlay", "ul"):
        return st.underlay
    for h in (*st.nodes, *st.etcd, *st.others):
        if h.name == target:
            if target in st.powered_off:
                raise SandboxError("exec", f"{target} is powered off")
            return h.netns
    for p in st.pods:
        if p.name == target:
            if not p.ip:
                raise SandboxError("exec", f"pod {target} is not running (its node is "
                                   "powered off)")
            return p.netns
    known = [h.name for h in (*st.nodes, *st.etcd)] + [p.name for p in st.pods]
    raise SandboxError("exec", f"no node, pod or etcd member {target!r} in sandbox {sb.name} "
                       f"(there are: {', '.join(known) or 'none'}, and underlay)")


def iperf(sb: Sandbox, src: str, dst: str, seconds: float = 3) -> dict[str, Any]:
    """TCP throughput from pod `src` to pod `dst` (iperf3; the server is ours, by PID)."""
    a, b = sb.pod(src), sb.pod(dst)
    if not (a.ip and b.ip):
        raise SandboxError("iperf", "both pods must be running")
    if shutil.which("iperf3") is None:
        raise SandboxError("iperf", "iperf3 is not installed (apt-get install iperf3)")
    server = subprocess.Popen(
        [*sb.exec_prefix(b.netns), "iperf3", "-s", "-1", "-B", b.ip, "-p", "5201",
         "--idle-timeout", str(int(seconds) + 30)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ss = sb.run_in(b.netns, "ss", "-Hltn", "sport = :5201", check=False).stdout
            if ss.strip() or server.poll() is not None:
                break
            time.sleep(0.05)
        client = sb.run_in(a.netns, "iperf3", "-c", b.ip, "-p", "5201", "-t", f"{seconds:g}",
                           "-J", "--connect-timeout", "3000", check=False,
                           timeout=seconds + 30)
        try:
            doc = json.loads(client.stdout)
        except ValueError:
            doc = {}
        if client.returncode != 0 or "end" not in doc:
            why = doc.get("error") or client.stderr.decode(errors="replace").strip() or \
                f"exit {client.returncode}"
            raise SandboxError("iperf", f"iperf3 from {src} to {dst} ({b.ip}) failed: {why}")
        end = doc["end"]
        return {"src": src, "dst": dst, "dstIP": b.ip, "seconds": seconds,
                "bitsPerSecond": end["sum_received"]["bits_per_second"],
                "retransmits": end["sum_sent"].get("retransmits", 0)}
    finally:
        kill_and_wait(server, signal.SIGTERM, 5)


# --- every node's view of every peer -------------------------------------------------


def views(sb: Sandbox, timeout: float = 1.0) -> dict[str, Any]:
    """What `sandbox watch` shows: each node's agent state and its peers, as its local API
    says, and the faults in effect. An agent that does not answer in `timeout` is shown as
    such (a stopped one accepts the connection and never replies)."""
    from overlay.agent.localclient import status_json

    st = sb.st

    def one(node: str) -> dict[str, Any]:
        d: dict[str, Any] = {"name": node, "process": agent_state(sb, node), "ready": False,
                             "subnet": None, "ipv6Subnet": None, "peers": {}, "error": None}
        if d["process"] != "running":
            return d
        try:
            s = status_json(sb.status(node, timeout))
        except Exception as exc:
            d["error"] = str(exc).splitlines()[0][:120] or type(exc).__name__
            return d
        d.update(ready=s["ready"], subnet=s["node"]["subnet"],
                 ipv6Subnet=s["node"]["ipv6Subnet"], degraded=s["degraded"],
                 peers={p["name"]: {"state": p["state"], "programmed": p["programmed"],
                                    "inEtcd": p.get("inEtcd", True)} for p in s["peers"]})
        return d

    names = [h.name for h in st.nodes]
    with ThreadPoolExecutor(max(1, min(8, len(names)))) as ex:
        nodes = list(ex.map(one, names))
    running, total = etcd_running(sb)
    return {"name": st.name, "time": time.time(), "nodes": nodes,
            "etcd": {"running": running, "members": total,
                     "down": [h.name for h in st.etcd if not pid_alive(h.pid)]},
            "faults": {"lossPercent": st.loss_percent, "partitioned": list(st.partitioned),
                       "bandwidth": dict(st.bandwidth), "poweredOff": list(st.powered_off)}}
