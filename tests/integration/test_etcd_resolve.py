"""An etcd host name that does not resolve at boot is waited for, not fatal.

At boot, DNS (or the /etc/hosts entry a provisioning tool writes) often comes
after the agent starts. It used to be reported as invalid configuration
(exit 2), which systemd's RestartPreventExitStatus=2 turned into an agent
stopped for good. The agent now keeps trying and says what it waits for.

The node's /etc/hosts is its own: `ip netns exec` bind-mounts
/etc/netns/<namespace>/hosts over /etc/hosts for the processes it starts,
and glibc reads that file on every lookup, so appending a line makes the
name resolve for the running agent.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from overlay.sandbox.sandbox import Sandbox, pid_alive

pytestmark = pytest.mark.integration

NAME = "etcd.overlay-test.invalid"


@pytest.fixture
def netns_etc() -> Iterator[Callable[[str], Path]]:
    made: list[Path] = []

    def make(ns: str) -> Path:
        d = Path("/etc/netns") / ns
        d.mkdir(parents=True, exist_ok=True)
        made.append(d)
        hosts = d / "hosts"
        hosts.write_text("127.0.0.1 localhost\n")
        return hosts

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path("/etc/netns").rmdir()  # only if nothing else uses it


def test_unresolvable_etcd_host_is_retried_until_it_resolves(
        make_sandbox: Callable[..., Sandbox], netns_etc: Callable[[str], Path]) -> None:
    sb = make_sandbox(nodes=1, pods_per_node=0)
    hosts = netns_etc(sb.ns("n2"))
    h = sb.add_node("n2", wait=False, extra_args=["--etcd-endpoints", f"http://{NAME}:2379"])

    def waiting_for_name() -> bool:
        try:
            st = sb.status("n2")
        except Exception:
            return False
        return any(NAME in c.message for c in st.conditions if not c.ok)

    wait_until(waiting_for_name, 30, 0.2)
    time.sleep(3)  # several retries later: still running, still saying why
    assert pid_alive(h.pid), Path(h.log).read_text()[-2000:]
    st = sb.status("n2")
    assert not st.ready
    assert any(f"cannot resolve etcd host {NAME!r}" in c.message for c in st.conditions), \
        [(c.name, c.message) for c in st.conditions]

    etcd_ip = sb.st.etcd[0].underlay_ip
    with hosts.open("a") as f:  # in place: the bind mount follows the inode
        f.write(f"{etcd_ip} {NAME}\n")
    sb.wait_ready("n2", 60)
    sb.wait_converged(60)
    log = Path(h.log).read_text()
    assert "invalid configuration" not in log
    assert f"cannot resolve etcd host {NAME!r}" in log  # said once why it waited
