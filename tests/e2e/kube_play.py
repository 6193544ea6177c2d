"""make e2e-kube: the DaemonSet of deploy/kubernetes/overlay.yaml, run for real.

Three sandbox nodes (network namespaces on a simulated underlay, with a real
etcd) play the DaemonSet's pod template with `podman kube play`, host
networking being the node's namespace. What podman is given differs from
the manifest in only what a one-machine cluster needs, and each difference
is printed: the hostPath directories are the node's own (every node is a
namespace on the same machine), the downward API's spec.nodeName and
status.hostIP become the node's name and underlay address (podman has no
scheduler), the optional etcd Secret, absent (plain http etcd), is an empty
directory as the kubelet mounts it, containerPorts are dropped (podman
refuses them with host networking, where they only document the ports),
the conflist's agentSocket is the node's own /run/overlay/cni.sock, the
ConfigMap is named per node (podman keeps it as a named volume), and
etcd-endpoints in the ConfigMap is the sandbox's etcd (the step
deploy/README.md asks of every user).

Then, as a runtime on those nodes would: containers started by podman
through the plugin the init container installed (CNI, with portmap
chained), every container reaches every other over HTTP, a restarted agent
container and a rolled-out config edit keep their traffic and leave no pod
in Init, deleting the containers releases their addresses and veths, and
`overlayctl uninstall` from the image leaves nothing on the nodes.
Exits non-zero on the first failed check; removes everything it made.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE, ROOT, RUN_ID, CheckFailed, Checks, Podman, main, node_conf, run

from overlay.sandbox.sandbox import Sandbox

MANIFEST = ROOT / "deploy/kubernetes/overlay.yaml"
NODES = ("n1", "n2", "n3")
PER_NODE = 2
HOST_DIRS = {"/opt/cni/bin": "opt-cni-bin", "/etc/cni/net.d": "etc-cni-net.d",
             "/run/overlay": "run-overlay", "/var/lib/overlay": "var-lib-overlay"}

sb = Sandbox(f"k{RUN_ID}")
work = Path(f"/var/tmp/overlay-e2e-kube-{RUN_ID}")
made_pods: dict[str, Podman] = {}      # pod name -> podman of its node
made_ctrs: dict[str, Podman] = {}      # workload container -> podman of its node

# Fetches every URL given (a container reaching its peers); prints "ok"/"fail <url>".
FETCH = """
import sys, urllib.request
bad = []
for url in sys.argv[1:]:
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except Exception as exc:
        bad.append(f"{url} ({exc})")
print("ok" if not bad else "fail " + "; ".join(bad))
"""
# Fetches one URL every 0.2 s until /tmp/stop exists; prints "sent N failed M", then
# one line per failure: the wall-clock time it started and why.
LOOP = """
import os, sys, time, urllib.request
sent = failed = 0
fails = []
while not os.path.exists("/tmp/stop"):
    sent += 1
    t = time.time()
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2).read()
    except Exception as exc:
        failed += 1
        fails.append(f"{t:.2f} {time.time() - t:.2f}s {exc!r}")
    time.sleep(0.2)
print(f"sent {sent} failed {failed}")
print("\\n".join(fails))
"""


EVENTS: list[tuple[float, str]] = []  # (wall-clock time, what the script did)
# Where to keep every overlayd container's log before its pod is removed (diagnosis).
LOG_DIR = os.environ.get("E2E_LOG_DIR")


def event(what: str) -> None:
    EVENTS.append((time.time(), what))


def timeline(failures: list[str]) -> list[str]:
    """The failed requests ("<time> <took> <why>") among what the script did meanwhile."""
    rows = [(t, f"   {w}") for t, w in EVENTS]
    for line in failures:
        t, _, rest = line.partition(" ")
        rows.append((float(t), f"!! request failed after {rest}"))
    rows.sort()
    t0 = rows[0][0] if rows else 0.0
    return [f"  {t - t0:7.2f}s {w}" for t, w in rows]


def node_dir(node: str, what: str) -> Path:
    return work / node / HOST_DIRS[what]


def pod_yaml(node: str, ds: dict[str, Any]) -> Path:
    tpl = copy.deepcopy(ds["spec"]["template"])
    spec = tpl["spec"]
    for v in spec["volumes"]:
        if "configMap" in v:
            v["configMap"]["name"] = cm_name(node)
        if "hostPath" in v:
            v["hostPath"]["path"] = str(node_dir(node, v["hostPath"]["path"]))
        if v.get("secret", {}).get("optional"):
            # What the kubelet mounts for an absent optional Secret (podman 4.3 fails on it).
            v.pop("secret")
            v["emptyDir"] = {}
    host_ip = sb.node(node).underlay_ip
    for c in spec["initContainers"] + spec["containers"]:
        # With hostNetwork they only document the ports; podman 4.3 refuses them.
        c.pop("ports", None)
        for e in c.get("env", []):
            if "configMapKeyRef" in e.get("valueFrom", {}):
                e["valueFrom"]["configMapKeyRef"]["name"] = cm_name(node)
            ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if ref in ("spec.nodeName", "status.hostIP"):
                e.pop("valueFrom")
                e["value"] = node if ref == "spec.nodeName" else host_ip
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"overlay-{RUN_ID}-{node}", "labels": tpl["metadata"]["labels"],
                        "annotations": {**tpl["metadata"].get("annotations", {}),
                                        # podman 4.3 removes "once" init containers while
                                        # they still run; "always" keeps them (and logs)
                                        "io.podman.annotations.init.container.type":
                                            "always"}},
           "spec": spec}
    path = work / node / "pod.yaml"
    path.write_text(yaml.safe_dump(pod, sort_keys=False))
    return path


def cm_name(node: str) -> str:
    return f"kube-overlay-cfg-{RUN_ID}-{node}"


def configmap_yaml(cm: dict[str, Any], node: str, name: str) -> Path:
    """The ConfigMap as `node` sees it: the plugin runs on the host, where this node's
    /run/overlay is its own directory."""
    cm = copy.deepcopy(cm)
    cm["metadata"]["name"] = cm_name(node)
    conf = json.loads(cm["data"]["cni-conf.json"])
    conf["plugins"][0]["agentSocket"] = str(node_dir(node, "/run/overlay") / "cni.sock")
    cm["data"]["cni-conf.json"] = json.dumps(conf, indent=2)
    path = work / node / name
    path.write_text(yaml.safe_dump(cm, sort_keys=False))
    return path


def readyz(node: str) -> object:
    """The agent's /readyz from inside the node (hostNetwork: port 9181 there)."""
    p = run(["ip", "netns", "exec", sb.ns(node), sys.executable, "-c",
             "import urllib.request,sys\n"
             "try: print(urllib.request.urlopen('http://127.0.0.1:9181/readyz', timeout=2)"
             ".status)\nexcept Exception as e: print(e)"], check=False)
    return True if p.stdout.strip() == "200" else p.stdout.strip() or p.stderr.strip()


def play(node: str, pod: Path, cm: Path, replace: bool = False) -> None:
    pm = made_pods.setdefault(f"overlay-{RUN_ID}-{node}", podman_for(node))
    args = ["kube", "play", "--configmap", str(cm)]
    if replace:
        # As the kubelet replaces a pod: the old one goes (stopped first: stop_agent), then
        # the new one starts. podman keeps a ConfigMap as a named volume: removed too, so
        # the edit is seen.
        event(f"{node}: podman pod rm")
        pm("pod", "rm", "-f", "-t", "10", f"overlay-{RUN_ID}-{node}")
        event(f"{node}: pod removed")
        pm("volume", "rm", "-f", cm_name(node))
    event(f"{node}: podman kube play")
    try:
        pm(*args, str(pod), timeout=600)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc}\n{pod_logs(pm, f'overlay-{RUN_ID}-{node}')}") from None
    event(f"{node}: kube play returned")


def stop_agent(c: Checks, node: str, whole_pod: bool = True) -> None:
    """As the kubelet stops a pod (or one container of it): SIGTERM, SIGKILL after the
    grace period (10 s here, 30 in the manifest). The agent must be gone well within
    it, timed from its own "received SIGTERM" line to the container's exit, and not by
    its stop watchdog."""
    pm = podman_for(node)
    pod, agent = f"overlay-{RUN_ID}-{node}", f"overlay-{RUN_ID}-{node}-overlayd"
    keep_log(node)
    event(f"{node}: podman stop {pod if whole_pod else agent}")
    stopped = pm(*(("pod", "stop", "-t", "10", pod) if whole_pod else
                   ("stop", "-t", "10", agent)), check=False)
    event(f"{node}: stopped")
    log = pm("logs", "-t", agent, check=False)
    lines = (log.stdout + log.stderr).splitlines()
    term = [ln.split()[0] for ln in lines if "received SIGTERM" in ln]
    end = pm("inspect", "--format", "{{.State.FinishedAt.UnixNano}}", agent, check=False)
    took = None
    if term and end.returncode == 0 and int(end.stdout.strip() or 0) > 0:
        # podman's log stamps are RFC 3339 with nanoseconds; Python takes microseconds
        stamp = term[-1].rstrip("Z")
        sent = datetime.fromisoformat(stamp[:26]).replace(tzinfo=UTC).timestamp()
        took = int(end.stdout) / 1e9 - sent
    evidence = "\n".join([f"`podman stop` exited {stopped.returncode}: "
                          f"{stopped.stderr.strip()}", *lines[-40:]])
    c.check(took is not None and took < 10 and not any("Timeout (" in ln for ln in lines),
            f"{node}: overlayd stopped {took or 0:.2f}s after SIGTERM (podman's grace 10 s)",
            evidence)
    # podman 4.3 can lose a race with a container that exits just as the grace ends
    # (`runc kill` finds it gone); the agent was timed above, so this is podman's alone.
    if stopped.returncode != 0:
        print(f"  note: `podman stop` on {node} exited {stopped.returncode}, the agent "
              f"had stopped: {stopped.stderr.strip()[-300:]}", flush=True)


def keep_log(node: str) -> None:
    if LOG_DIR:
        name = f"overlay-{RUN_ID}-{node}-overlayd"
        log = podman_for(node)("logs", "-t", name, check=False)
        n = len(list(Path(LOG_DIR).glob(f"{node}-*.log")))
        (Path(LOG_DIR) / f"{node}-{n}.log").write_text(log.stdout + log.stderr)


def pod_logs(pm: Podman, pod: str) -> str:
    """The last lines of every container of `pod`, to say why it failed."""
    names = pm("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}",
               check=False).stdout.split()
    out = []
    for name in names:
        log = pm("logs", "--tail", "15", name, check=False)
        out.append(f"---- {name}\n{(log.stdout + log.stderr).strip()}")
    return "\n".join(out)


_podmans: dict[str, Podman] = {}


def podman_for(node: str) -> Podman:
    if node not in _podmans:
        conf = node_conf(work / node / "containers.conf",
                         [node_dir(node, "/opt/cni/bin"), "/usr/lib/cni"],
                         node_dir(node, "/etc/cni/net.d"))
        _podmans[node] = Podman(sb.ns(node), conf)
    return _podmans[node]


def container_ip(pm: Podman, name: str) -> str:
    out = pm("inspect", "--format", "{{json .NetworkSettings.Networks}}", name).stdout
    nets = json.loads(out)
    return str(nets["overlay"]["IPAddress"])


def node_leftovers(node: str) -> dict[str, list[str]]:
    ns = sb.ns(node)
    links = json.loads(run(["ip", "-n", ns, "-j", "link", "show"]).stdout)
    ours = sorted(str(lk["ifname"]) for lk in links
                  if str(lk["ifname"]).startswith(("overlay.", "cni0", "veth")))
    tables = [t for t in run(["ip", "netns", "exec", ns, "nft", "list", "tables"]).stdout
              .splitlines() if "overlay" in t]
    files = sorted(str(p.relative_to(work)) for d in HOST_DIRS
                   for p in node_dir(node, d).glob("*") if not runtimes(p))
    return {"links": ours, "nft": tables, "files": files}


def runtimes(p: Path) -> bool:
    """A file of the container runtime's in the node's CNI config dir (podman's lock and
    the network `kube play` makes), not overlay's: uninstall must leave it."""
    return p.parent.name == "etc-cni-net.d" and (
        p.name == "cni.lock" or (p.name.startswith("podman") and p.suffix == ".conflist"))


def runtime_files(node: str) -> list[str]:
    return sorted(p.name for p in node_dir(node, "/etc/cni/net.d").glob("*") if runtimes(p))


def body(c: Checks) -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    objs = {d["kind"]: d for d in docs}
    ds, cm = objs["DaemonSet"], copy.deepcopy(objs["ConfigMap"])
    images = {x["image"] for x in ds["spec"]["template"]["spec"]["initContainers"]
              + ds["spec"]["template"]["spec"]["containers"]}
    c.check(images == {IMAGE}, f"the manifest runs the image `make image` built ({IMAGE})",
            images)
    c.check(run([*Podman(None).cmd("image", "exists", IMAGE)], check=False).returncode == 0,
            f"{IMAGE} is in podman's storage")

    sb.up(0, 0)
    endpoint = f"http://{sb.st.etcd[0].underlay_ip}:2379"
    # The sandbox writes a network config; the manifest's network-init must write it.
    sb.etcdctl("del", "/overlay/network/config")
    for n in NODES:
        sb.add_bare_node(n)
        # The host's part (deploy/README.md; kubeadm checks it): the agent's container
        # sees /proc/sys read-only.
        sb.run_in(sb.ns(n), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for d in HOST_DIRS:
            node_dir(n, d).mkdir(parents=True, exist_ok=True)
    c.ok(f"sandbox: etcd at {endpoint}, nodes {', '.join(NODES)} on the underlay, no agents, "
         "net.ipv4.ip_forward=1 on the nodes")
    print("  what podman is given that differs from the manifest:\n"
          "    hostPath /opt/cni/bin, /etc/cni/net.d, /run/overlay, /var/lib/overlay -> "
          f"{work}/<node>/...\n"
          "    env from spec.nodeName / status.hostIP -> the node's name / underlay IP\n"
          f"    ConfigMap etcd-endpoints -> {endpoint}; cni-conf.json's agentSocket -> "
          "the node's own /run/overlay; the ConfigMap named per node (podman keeps it as "
          "a named volume shared by every pod that names it)\n"
          "    the optional etcd Secret, absent (plain http etcd) -> an empty directory, as "
          "the kubelet mounts it (podman 4.3 does not know optional Secrets)\n"
          "    containerPorts dropped (with hostNetwork they only document the ports; "
          "podman 4.3 refuses them)\n"
          "    init containers of type \"always\" (podman 4.3 fails removing \"once\" ones)",
          flush=True)
    cm["data"]["etcd-endpoints"] = endpoint

    t0 = time.monotonic()
    for n in NODES:
        play(n, pod_yaml(n, ds), configmap_yaml(cm, n, "configmap.yaml"))
    c.ok(f"`podman kube play` of the DaemonSet's pod on {len(NODES)} nodes "
         f"({time.monotonic() - t0:.0f}s)")
    for n in NODES:
        plugin = node_dir(n, "/opt/cni/bin") / "overlay"
        conflist = node_dir(n, "/etc/cni/net.d") / "10-overlay.conflist"
        c.check(plugin.is_file() and conflist.is_file(),
                f"{n}: init container install-cni put the plugin and the conflist on the host")
    got = sb.etcdctl("get", "--print-value-only", "/overlay/network/config").stdout.decode()
    c.check(json.loads(got) == json.loads(cm["data"]["net-conf.json"]),
            "init container network-init wrote the ConfigMap's net-conf.json to etcd", got)
    for n in NODES:
        c.wait(lambda n=n: readyz(n), f"{n}: overlayd /readyz answers 200", 120)
    leases = sb.etcdctl("get", "--prefix", "--keys-only", "/overlay/subnets/").stdout.decode()
    c.check(len(leases.split()) == len(NODES), f"{len(NODES)} subnet leases in etcd", leases)

    # Workloads, attached by podman through CNI: our plugin, then portmap.
    ips: dict[str, str] = {}
    for n in NODES:
        pm = podman_for(n)
        for i in range(PER_NODE):
            name = f"w{RUN_ID}-{n}-{i}"
            made_ctrs[name] = pm
            extra = ["-p", "8080:8080"] if i == 0 else []
            pm("run", "-d", "--name", name, "--network", "overlay", *extra, IMAGE,
               "python3", "-m", "http.server", "8080")
            ips[name] = container_ip(pm, name)
    c.ok(f"{len(ips)} containers started by podman through the plugin: "
         + ", ".join(f"{k.split('-', 1)[1]}={v}" for k, v in ips.items()))
    urls = {name: f"http://{ip}:8080/" for name, ip in ips.items()}

    def all_pairs() -> object:
        bad = []
        for name, pm in made_ctrs.items():
            targets = [u for other, u in urls.items() if other != name]
            out = pm("exec", name, "python3", "-c", FETCH, *targets, check=False).stdout.strip()
            if out != "ok":
                bad.append(f"{name}: {out}")
        return True if not bad else "; ".join(bad)

    n_pairs = len(ips) * (len(ips) - 1)
    c.wait(all_pairs, f"every container reaches every other over HTTP ({n_pairs} pairs)", 60, 2)
    # hostPort through the chained portmap, from another node's namespace.
    n1_ip = sb.node("n1").underlay_ip
    p = run(["ip", "netns", "exec", sb.ns("n2"), sys.executable, "-c",
             f"import urllib.request; print(urllib.request.urlopen('http://{n1_ip}:8080/', "
             "timeout=5).status)"], check=False)
    c.check(p.stdout.strip() == "200", "hostPort 8080 on n1 answers from node n2 (portmap)",
            p.stdout + p.stderr)

    def traffic_during(what: str, action: Any) -> None:
        src, dst = f"w{RUN_ID}-n1-1", f"w{RUN_ID}-n2-1"
        pm = made_ctrs[src]
        pm("exec", src, "rm", "-f", "/tmp/stop")
        EVENTS.clear()
        event(f"HTTP loop {src} -> {dst} ({urls[dst]})")
        loop = pm.popen("exec", src, "python3", "-c", LOOP, urls[dst])
        time.sleep(2)
        action()
        time.sleep(2)
        pm("exec", src, "touch", "/tmp/stop")
        lines = (loop.communicate(timeout=60)[0] or b"").decode().strip().splitlines()
        out = lines[0] if lines else ""
        parts = out.split()
        ok = len(parts) == 4 and parts[0] == "sent" and int(parts[1]) > 10 and parts[3] == "0"
        c.check(ok, f"{what}: HTTP n1 -> n2 every 0.2 s meanwhile, none failed ({out})",
                "\n".join([out, *timeline(lines[1:])]))

    def restart_agent() -> None:
        stop_agent(c, "n2", whole_pod=False)
        event("n2: podman start overlayd")
        podman_for("n2")("start", f"overlay-{RUN_ID}-n2-overlayd")
        event("n2: started")
        c.wait(lambda: readyz("n2"), "n2: overlayd container restarted, ready again", 120)

    traffic_during("agent container on n2 restarted", restart_agent)

    # A config edit, rolled out node by node as a DaemonSet update would.
    edited = copy.deepcopy(cm)
    net = json.loads(edited["data"]["net-conf.json"])
    net["SubnetLen"] = 25
    edited["data"]["net-conf.json"] = json.dumps(net)
    conf = json.loads(edited["data"]["cni-conf.json"])
    conf["plugins"][0]["hairpinMode"] = False
    edited["data"]["cni-conf.json"] = json.dumps(conf, indent=2)

    def roll_out() -> None:
        for n in NODES:
            stop_agent(c, n)
            play(n, work / n / "pod.yaml", configmap_yaml(edited, n, "configmap-edited.yaml"),
                 replace=True)
            c.wait(lambda n=n: readyz(n), f"{n}: pod replaced with the edited ConfigMap, "
                   "init containers done, agent ready (not stuck in Init)", 120)
            event(f"{n}: /readyz 200")

    traffic_during("ConfigMap edit rolled out to every node", roll_out)
    for n in NODES:
        got_conf = json.loads((node_dir(n, "/etc/cni/net.d") / "10-overlay.conflist")
                              .read_text())
        c.check(got_conf["plugins"][0]["hairpinMode"] is False,
                f"{n}: the edited conflist is installed")
    got2 = sb.etcdctl("get", "--print-value-only", "/overlay/network/config").stdout.decode()
    c.check(json.loads(got2) == json.loads(cm["data"]["net-conf.json"]),
            "the network config in etcd is kept (an edit is not applied under running nodes)")
    logs = podman_for("n1")("logs", f"overlay-{RUN_ID}-n1-network-init", check=False)
    if logs.returncode == 0:
        c.check("keeping the network config" in logs.stdout + logs.stderr,
                "network-init's log says it kept etcd's config and why", logs.stderr[-300:])
    c.wait(all_pairs, "every container still reaches every other", 60, 2)

    # Containers removed: CNI DEL releases the address, the veth and the port mapping.
    for name, pm in list(made_ctrs.items()):
        pm("rm", "-f", "-t", "2", name)
        del made_ctrs[name]
    for n in NODES:
        allocated = list((node_dir(n, "/run/overlay") / "ipam" / "ip").glob("*"))
        veths = [x for x in node_leftovers(n)["links"] if x.startswith("veth")]
        c.check(not allocated and not veths,
                f"{n}: containers removed: no address allocated, no veth left",
                (allocated, veths))

    # Undo: stop the agents (delete the pods), then uninstall from the image.
    for pod, pm in list(made_pods.items()):
        pm("pod", "rm", "-f", "-t", "5", pod)
        del made_pods[pod]
    for n in NODES:
        before, theirs = node_leftovers(n), runtime_files(n)
        mounts = []
        for d in HOST_DIRS:
            mounts += ["-v", f"{node_dir(n, d)}:/host{d}"]
        out = podman_for(n)(
            "run", "--rm", "--network", "host", "--cap-add", "NET_ADMIN", *mounts, IMAGE,
            "overlayctl", "uninstall", "--bin-dir", "/host/opt/cni/bin",
            "--conf-dir", "/host/etc/cni/net.d", "--run-dir", "/host/run/overlay",
            "--state-dir", "/host/var/lib/overlay", "--etcd-endpoints", endpoint)
        after = node_leftovers(n)
        removed = [line for line in out.stdout.splitlines() if line.startswith("removed")]
        kept = runtime_files(n)
        c.check(after == {"links": [], "nft": [], "files": []} and set(theirs) <= set(kept),
                f"{n}: `overlayctl uninstall` in the image removed {len(removed)} things "
                f"({', '.join(before['links'])}; {len(before['nft'])} nft tables; "
                f"{len(before['files'])} files): nothing of overlay left, the runtime's "
                f"files kept ({', '.join(theirs) or 'none'})", (after, theirs, kept, out.stdout))
    leases = sb.etcdctl("get", "--prefix", "--keys-only", "/overlay/subnets/").stdout.decode()
    c.check(not leases.strip(), "no subnet lease left in etcd", leases)


def volumes() -> set[str]:
    return set(Podman(None)("volume", "ls", "-q", check=False).stdout.split())


VOLUMES_BEFORE = volumes()


def cleanup() -> None:
    for name, pm in made_ctrs.items():
        pm("rm", "-f", "-t", "0", name, check=False)
    for pod, pm in made_pods.items():
        pm("pod", "rm", "-f", "-t", "0", pod, check=False)
    for vol in volumes() - VOLUMES_BEFORE:  # ConfigMap, Secret, emptyDir volumes of the run
        Podman(None)("volume", "rm", "-f", vol, check=False)
    sb.down()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    work.mkdir(parents=True, exist_ok=True)
    _ = urllib
    main(body, "e2e-kube: the DaemonSet played by podman on 3 sandbox nodes", cleanup)
