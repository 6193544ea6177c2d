"""The installed plugin on a host with nothing but itself: a chroot holding busybox
(static) and what `overlayctl install-cni` wrote, no python3, no shared libc.

Driven like a runtime: CNI_* variables, the config the runtime builds from the
installed conflist on stdin, CNI_NETNS a real pod namespace, from the node's
network namespace. The node agent's run dir (its socket, and where the plugin
records a DEL it could not deliver) and the pod namespaces are bind-mounted into
the chroot at their own paths, in a private mount namespace made for each call
(`unshare --mount`): the mounts end with the call, whatever happens to the test.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import dump_logs, sandbox_up, wait_until

from overlay.sandbox.runtime import Call, exec_plugin
from overlay.sandbox.sandbox import Sandbox, sh, tool

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
PLUGIN = "/opt/cni/bin/overlay"


class Chroot:
    def __init__(self, sb: Sandbox, root: Path, node: str = "n1") -> None:
        self.sb, self.root, self.node = sb, root, node
        self.run_dir = sb.node_dir(node) / "run"
        conflist = json.loads((root / "etc/cni/net.d/10-overlay.conflist").read_text())
        # What a runtime passes to the first plugin of the list.
        self.conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"],
                     **conflist["plugins"][0]}

    def prefix(self, netns: str | None) -> list[str]:
        mounts = [(str(self.run_dir), f"{self.root}{self.run_dir}")]
        if netns:
            target = self.root / "run" / "netns" / netns
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
            mounts.append((f"/run/netns/{netns}", str(target)))
        script = "set -e; " + "; ".join(f"mount --bind {shlex.quote(a)} {shlex.quote(b)}"
                                        for a, b in mounts)
        script += f'; exec chroot {shlex.quote(str(self.root))} "$@"'
        return [*self.sb.exec_prefix(self.sb.node(self.node).netns), "unshare", "--mount",
                "--propagation", "private", "sh", "-c", script, "sh"]

    def call(self, command: str, cid: str = "", netns: str | None = None,
             conf: dict[str, Any] | None = None) -> Call:
        return exec_plugin(PLUGIN, command, conf or self.conf, container_id=cid,
                           netns=f"/run/netns/{netns}" if netns else "",
                           ifname="eth0" if cid else "", cni_path="/opt/cni/bin",
                           prefix=self.prefix(netns), timeout=60)

    def allocated_to(self, cid: str) -> list[str]:
        return [p.name for p in (self.run_dir / "ipam" / "ip").iterdir()
                if p.read_text().split("\n")[0] == cid]

    def pending(self) -> list[Path]:
        return sorted((self.run_dir / "cni-pending").glob("*.req"))

    def host_links(self) -> set[str]:
        out = self.sb.run_in(self.sb.node(self.node).netns, "ip", "-j", "link").stdout
        return {link["ifname"] for link in json.loads(out)}


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    if not BUSYBOX.is_file() or shutil.which("unshare") is None:
        pytest.fail("needs /bin/busybox (apt-get install busybox-static) and unshare "
                    "(util-linux): run `make deps`", pytrace=False)
    with sandbox_up(2, 1) as s:
        yield s


@pytest.fixture(scope="module")
def chroot(sb: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Chroot:
    root = tmp_path_factory.mktemp("chroot")
    (root / "bin").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    # The installed plugin and conflist, written by install-cni into the chroot.
    p = subprocess.run([tool("overlayctl"), "install-cni", "--bin-dir", f"{root}/opt/cni/bin",
                        "--conf-dir", f"{root}/etc/cni/net.d", "--no-portmap",
                        "--agent-socket", str(sb.cni_socket("n1"))],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    (root / str(sb.node_dir("n1") / "run").lstrip("/")).mkdir(parents=True)
    return Chroot(sb, root)


@pytest.fixture
def pods(sb: Sandbox) -> Iterator[Any]:
    made: list[str] = []

    def make() -> str:
        name = sb.ns(f"c{len(made)}")
        sh("ip", "netns", "add", name)
        made.append(name)
        return name

    yield make
    for name in made:
        sh("ip", "netns", "del", name, check=False)


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest, sb: Sandbox) -> Iterator[None]:
    yield
    if getattr(request.node, "rep_call_failed", False):
        dump_logs(sb)


def test_the_chroot_has_no_python_and_no_shared_libc(chroot):
    files = sorted(str(p.relative_to(chroot.root)) for p in chroot.root.rglob("*")
                   if p.is_file() or p.is_symlink())
    assert files == ["bin/busybox", "bin/sh", "etc/cni/net.d/10-overlay.conflist",
                     "opt/cni/bin/overlay"]
    p = subprocess.run([*chroot.prefix(None), "/bin/sh", "-c",
                        "command -v python3 || ls /lib /lib64 /usr/lib || echo nothing"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.stdout.split("\n")[-2] == "nothing", p.stdout


def test_version(chroot):
    c = chroot.call("VERSION", conf={"cniVersion": "0.4.0"})
    assert c.rc == 0, c.stderr
    assert json.loads(c.stdout) == {"cniVersion": "0.4.0", "supportedVersions": [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}


def test_add_gives_a_pod_that_reaches_another_node_and_del_releases_it(sb, chroot, pods):
    pod = pods()
    add = chroot.call("ADD", "chroot-pod", pod)
    assert add.rc == 0, (add.stdout, add.stderr)
    res = json.loads(add.stdout)
    ip = res["ips"][0]["address"].split("/")[0]
    host = next(i["name"] for i in res["interfaces"] if i["name"].startswith("veth"))
    assert chroot.allocated_to("chroot-pod") == [ip] and host in chroot.host_links()
    other = next(p for p in sb.st.pods if p.node == "n2")
    assert sb.ping(pod, other.ip, count=3), f"{ip} on n1 cannot reach {other.ip} on n2"
    assert sb.ping(other.netns, ip), f"{other.ip} on n2 cannot reach {ip} on n1"
    assert chroot.call("CHECK", "chroot-pod", pod, {**chroot.conf, "prevResult": res}).rc == 0
    dele = chroot.call("DEL", "chroot-pod", pod, {**chroot.conf, "prevResult": res})
    assert (dele.rc, dele.stdout) == (0, b""), dele.stdout
    assert not chroot.allocated_to("chroot-pod") and host not in chroot.host_links()
    assert not sb.ping(other.netns, ip)


def test_with_the_agent_down_del_is_recorded_and_done_when_the_agent_starts(sb, chroot, pods):
    pod, later = pods(), pods()
    add = chroot.call("ADD", "chroot-down", pod)
    assert add.rc == 0, add.stdout
    res = json.loads(add.stdout)
    host = next(i["name"] for i in res["interfaces"] if i["name"].startswith("veth"))
    sb.stop_agent("n1", signal.SIGKILL)
    try:
        c = chroot.call("ADD", "chroot-later", later)
        assert c.rc == 11 and json.loads(c.stdout)["code"] == 11, c.stdout
        status = chroot.call("STATUS", conf={**chroot.conf, "cniVersion": "1.1.0"})
        assert status.rc == 50 and json.loads(status.stdout)["code"] == 50
        dele = chroot.call("DEL", "chroot-down", pod)
        assert (dele.rc, dele.stdout) == (0, b""), dele.stdout
        assert len(chroot.pending()) == 1  # recorded, through the bind mount, in the run dir
        assert chroot.allocated_to("chroot-down") and host in chroot.host_links()
    finally:
        sb.start_agent("n1")
    sb.wait_ready("n1", 30)
    assert not chroot.pending()
    assert not chroot.allocated_to("chroot-down")
    assert host not in chroot.host_links()
    wait_until(lambda: "eth0" not in sh("ip", "-n", pod, "link").stdout.decode(), 10)
