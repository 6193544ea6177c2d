"""make e2e-systemd: deploy/systemd/overlayd.service under a real systemd (PID 1).

A podman container (--systemd=always) from the image `make image` built,
with systemd added and the unit installed as deploy/README.md says, runs in
sandbox node n2's network namespace; node n1 runs a plain overlayd. The
unit's etcd endpoint is a host name that does not resolve at first.

Checks: the agent waits for the name (no exit, no restart, the status says
why), then reaches `active` (Type=notify) once the name is added to the
container's /etc/hosts; pods on n1 and n2 reach each other; a SIGKILL of
overlayd is restarted by systemd without losing pod traffic; `systemctl stop`
leaves pods' traffic and the node's lease in place; `systemctl start` brings
it back. Exits non-zero on the first failed check; removes everything it made.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGE, ROOT, RUN_ID, Checks, Podman, main

from overlay.cni.install import InstallOptions, install
from overlay.sandbox.sandbox import Sandbox

ETCD_NAME = "etcd.overlay-e2e.test"
TAG = f"localhost/overlay-systemd-e2e:{RUN_ID}"
CTR = f"overlay-systemd-{RUN_ID}"
sb = Sandbox(f"s{RUN_ID}")
work = Path(f"/var/tmp/overlay-e2e-systemd-{RUN_ID}")
made: list[str] = []


def unit(prop: str) -> str:
    p = Podman(None)("exec", CTR, "systemctl", "show", "-p", prop, "--value", "overlayd",
                     check=False)
    return p.stdout.strip()


def ping_during(src_ns: str, dst: str, seconds: float) -> subprocess.Popen[bytes]:
    count = int(seconds / 0.2)
    return subprocess.Popen(["ip", "netns", "exec", src_ns, "ping", "-n", "-q", "-i", "0.2",
                             "-W", "1", "-c", str(count), dst], stdout=subprocess.PIPE)


def loss(p: subprocess.Popen[bytes]) -> str:
    out = (p.communicate(timeout=120)[0] or b"").decode()
    line = next((x for x in out.splitlines() if "packet loss" in x), out.strip())
    return line


def body(c: Checks) -> None:
    pm = Podman(None)
    pm("build", "--network", "host", "--pull=never", "--build-arg", f"IMAGE={IMAGE}",
       "-f", "tests/e2e/systemd.Containerfile",
       "--ignorefile", "deploy/kubernetes/Containerfile.dockerignore", "-t", TAG, str(ROOT),
       timeout=900)
    made.append("image")
    c.ok(f"image {TAG}: {IMAGE} + systemd + the unit, enabled")

    sb.up(1, 0)
    sb.add_bare_node("n2")
    # What the host provides (a container sees /proc/sys read-only), as kubeadm requires.
    sb.run_in(sb.ns("n2"), "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    d = sb.node_dir("n2")
    (d / "state").mkdir(parents=True, exist_ok=True)
    install(InstallOptions(bin_dir=sb.dir / "cni" / "bin", conf_dir=d / "net.d",
                           agent_socket=str(sb.cni_socket("n2"))))
    env = work / "overlayd.env"
    env.write_text(f"OVERLAYD_ETCD_ENDPOINTS=http://{ETCD_NAME}:2379\n"
                   "OVERLAYD_NODE_NAME=n2\n"
                   'OVERLAYD_ARGS="--iface eth0 --health-addr 127.0.0.1:9181"\n')
    pm("run", "-d", "--name", CTR, "--systemd=always", "--network", f"ns:/run/netns/{sb.ns('n2')}",
       "--cap-add", "NET_ADMIN", "--cap-add", "SYS_ADMIN",
       "-v", f"{env}:/etc/default/overlayd:ro", "-v", f"{d / 'run'}:/run/overlay",
       "-v", f"{d / 'state'}:/var/lib/overlay", TAG)
    made.append("container")
    # "starting" while overlayd is: multi-user.target waits for it (Type=notify).
    c.wait(lambda: pm("exec", CTR, "cat", "/proc/1/comm", check=False).stdout.strip()
           == "systemd" and pm("exec", CTR, "systemctl", "is-system-running", check=False)
           .stdout.strip() in ("starting", "running", "degraded"),
           "systemd is up as PID 1", 120, 1)

    c.wait(lambda: f"cannot resolve etcd host '{ETCD_NAME}'" in unit("StatusText") or
           unit("StatusText"), f"overlayd waits for {ETCD_NAME} and says so in its status", 60)
    pid = unit("MainPID")
    time.sleep(5)
    state = (unit("ActiveState"), unit("NRestarts"), unit("MainPID"))
    c.check(state == ("activating", "0", pid),
            f"5 s later: still activating, not restarted, same process ({pid})", state)

    etcd_ip = sb.st.etcd[0].underlay_ip
    pm("exec", CTR, "sh", "-c", f"echo '{etcd_ip} {ETCD_NAME}' >> /etc/hosts")
    c.wait(lambda: unit("ActiveState") == "active" or unit("StatusText"),
           f"{ETCD_NAME} added to /etc/hosts: the unit is active (Type=notify READY)", 90)
    c.check(unit("StatusText").startswith("ready"), f"status: {unit('StatusText')}")
    sb.wait_converged(60)
    p1, p2 = sb.add_pod("n1"), sb.add_pod("n2")
    c.check(sb.ping(p1.netns, p2.ip, count=3) and sb.ping(p2.netns, p1.ip, count=3),
            f"pods reach each other across n1 and n2 ({p1.ip} <-> {p2.ip})")

    pid = unit("MainPID")
    pinger = ping_during(p1.netns, p2.ip, 12)
    time.sleep(1)
    pm("exec", CTR, "kill", "-KILL", pid)
    c.wait(lambda: (unit("NRestarts") == "1" and unit("ActiveState") == "active"
           and unit("MainPID") != pid) or unit("ActiveState"),
           f"SIGKILL of overlayd ({pid}): restarted by systemd, active again", 60)
    result = loss(pinger)
    c.check(" 0% packet loss" in result, f"pod traffic during the kill and restart: {result}")

    pinger = ping_during(p1.netns, p2.ip, 6)
    pm("exec", CTR, "systemctl", "stop", "overlayd")
    c.check(unit("ActiveState") == "inactive", "systemctl stop: inactive")
    result = loss(pinger)
    c.check(" 0% packet loss" in result, f"pod traffic with overlayd stopped: {result}")
    doc = json.loads(sb.etcdctl("get", "--prefix", "/overlay/subnets/", "-w", "json").stdout)
    mine = [kv for kv in doc.get("kvs", [])
            if json.loads(base64.b64decode(kv["value"])).get("node") == "n2"]
    granted = None
    if mine:
        ttl = sb.etcdctl("lease", "timetolive", f"{int(mine[0]['lease']):x}").stdout.decode()
        m = re.search(r"granted with TTL\((\d+)s\)", ttl)
        granted = int(m.group(1)) if m else None
    # overlayd's default --restart-grace: the peers keep the node's routes for 5 minutes
    # (not the 60 s lease TTL) while it is stopped.
    c.check(granted == 300, "n2's lease is still in etcd after the stop, on an etcd lease "
            "of the restart grace (300 s), not the 60 s TTL", (doc, granted))
    pm("exec", CTR, "systemctl", "start", "overlayd")
    c.check(unit("ActiveState") == "active", "systemctl start: active again (returns when ready)")
    made.append("passed")


def cleanup() -> None:
    pm = Podman(None)
    if "container" in made and "passed" not in made:
        for cmd in (["systemctl", "status", "--no-pager", "-l", "overlayd"],
                    ["journalctl", "--no-pager", "-n", "25", "-u", "overlayd"]):
            out = pm("exec", CTR, *cmd, check=False)
            print("\n".join("    | " + x for x in (out.stdout + out.stderr).splitlines()))
    if "container" in made:
        pm("rm", "-f", "-t", "5", CTR, check=False)
    if "image" in made:
        pm("rmi", "-f", TAG, check=False)
    sb.down()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    work.mkdir(parents=True, exist_ok=True)
    main(body, "e2e-systemd: overlayd.service under systemd as PID 1", cleanup)
