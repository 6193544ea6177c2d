"""What an operator sees: health, readiness, metrics, sd_notify, JSON logs, trace.

The agents listen inside their node namespaces, so every request is made by a
small Python HTTP client run there (`ip netns exec`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import sandbox_up, wait_until

from overlay.cni.install import plugin_binary
from overlay.sandbox.runtime import NetworkList, exec_plugin
from overlay.sandbox.sandbox import Sandbox, tool

HEALTH, METRICS = 9181, 9182

FETCH = """
import json, sys, urllib.error, urllib.request
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=5)
    code, body = r.status, r.read()
except urllib.error.HTTPError as e:
    code, body = e.code, e.read()
print(json.dumps({"code": code, "body": body.decode()}))
"""


@pytest.fixture(scope="module")
def obs() -> Iterator[Sandbox]:
    """2 nodes x 1 pod; JSON logs, a separate metrics port, a short lease TTL."""
    with sandbox_up(2, 1, agent_args=["--log-format", "json", "--metrics-addr",
                                      f"127.0.0.1:{METRICS}", "--lease-ttl", "5"]) as sb:
        yield sb


def get(sb: Sandbox, node: str, port: int, path: str) -> tuple[int, str]:
    p = sb.run_in(sb.node(node).netns, sys.executable, "-c", FETCH,
                  f"http://127.0.0.1:{port}{path}", timeout=30)
    doc = json.loads(p.stdout)
    return doc["code"], doc["body"]


def scrape(sb: Sandbox, node: str) -> dict[str, float]:
    """Samples of the Prometheus text format: {'name{label="v",...}': value}."""
    code, text = get(sb, node, METRICS, "/metrics")
    assert code == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_healthz_and_readyz(obs):
    code, body = get(obs, "n1", HEALTH, "/healthz")
    assert code == 200 and json.loads(body)["status"] == "alive"
    code, body = get(obs, "n1", HEALTH, "/readyz")
    doc = json.loads(body)
    assert code == 200 and doc["ready"] is True
    for cond in ("lease", "device", "reconciled"):
        assert doc["conditions"][cond]["ok"], doc
    assert get(obs, "n1", METRICS, "/readyz")[0] == 200  # both ports serve all routes


def test_readyz_is_503_until_the_node_is_ready(obs, tmp_path):
    """An agent that cannot reach etcd is alive but not ready."""
    ns = obs.node("n1").netns
    cmd = [tool("overlayd"), "--node-name", "probe", "--etcd-endpoints", "http://127.0.0.1:9",
           "--iface", "eth0", "--run-dir", str(tmp_path / "run"), "--state-dir",
           str(tmp_path / "state"), "--health-addr", "127.0.0.1:9191"]
    p = subprocess.Popen([*obs.exec_prefix(ns), *cmd], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        def answered() -> bool:
            try:
                return get(obs, "n1", 9191, "/healthz")[0] == 200
            except (ValueError, subprocess.CalledProcessError):
                return False

        wait_until(answered, timeout=15, interval=0.2)
        code, body = get(obs, "n1", 9191, "/readyz")
        assert code == 503 and json.loads(body)["ready"] is False
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0, err


def test_metrics_count_peers_reconciles_leases_and_cni(obs):
    m = scrape(obs, "n1")
    assert m["overlay_ready"] == 1
    states = {k: v for k, v in m.items() if k.startswith("overlay_peers{")}
    assert sum(states.values()) == 1 and set(states) >= {
        f'overlay_peers{{state="{s}"}}' for s in ("alive", "suspect", "dead", "left", "unknown")}
    for kind in ("route", "neigh", "fdb"):
        assert m[f'overlay_programmed_entries{{kind="{kind}"}}'] == 1
    assert m['overlay_reconcile_passes_total{result="ok"}'] >= 1
    assert m["overlay_reconcile_duration_seconds_count"] >= 1
    assert m["overlay_lease_acquisitions_total"] == 1
    assert m['overlay_cni_requests_total{command="ADD",result="ok"}'] == 1
    assert m['overlay_cni_request_duration_seconds_count{command="ADD"}'] == 1
    # TTL 5 s: a renewal every ~1.25 s.
    wait_until(lambda: scrape(obs, "n1").get('overlay_lease_renewals_total{result="ok"}', 0)
               >= 1, timeout=30, interval=0.5)
    assert scrape(obs, "n1")["overlay_etcd_reachable"] == 1
    # The membership layer counts into these; they exist before it sends anything.
    _, text = get(obs, "n1", METRICS, "/metrics")
    for fam in ("overlay_gossip_messages_total", "overlay_gossip_bytes_total",
                "overlay_netlink_errors_total", "overlay_repairs_total"):
        assert f"# TYPE {fam} counter" in text


def test_cni_requests_by_command_and_result(obs):
    net = obs.network("n1")
    conf = dict(net.conf["plugins"][0], name=net.conf["name"], cniVersion=net.conf["cniVersion"])
    plugin = str(Path(obs.cni_path().split(":")[0]) / "overlay")
    bad = exec_plugin(plugin, "ADD", conf, container_id="obs-bad", netns="/run/netns/"
                      + obs.node("n1").netns, ifname="x" * 16, prefix=net.prefix)
    assert bad.rc != 0
    code = json.loads(bad.stdout)["code"]
    gone = exec_plugin(plugin, "DEL", conf, container_id="obs-none", ifname="eth0",
                       prefix=net.prefix)
    assert gone.rc == 0, gone.stdout
    m = scrape(obs, "n1")
    assert m[f'overlay_cni_requests_total{{command="ADD",result="{code}"}}'] == 1
    assert m['overlay_cni_requests_total{command="DEL",result="ok"}'] >= 1
    assert m['overlay_cni_request_duration_seconds_count{command="DEL"}'] >= 1


def test_json_logs_one_line_per_kernel_change(obs):
    log = Path(obs.node("n1").log)
    before = len(log.read_text().splitlines())
    peer = obs.status("n2").self
    ns = obs.node("n1").netns
    repairs = scrape(obs, "n1").get('overlay_repairs_total{kind="fdb"}', 0)
    obs.run_in(ns, "bridge", "fdb", "del", peer.vtep_mac, "dev", "overlay.1", "dst",
               peer.underlay_ip)

    def repaired() -> bool:
        out = obs.run_in(ns, "bridge", "fdb", "show", "dev", "overlay.1").stdout.decode()
        return f"{peer.vtep_mac} dst {peer.underlay_ip}" in out

    wait_until(repaired, timeout=30)
    time.sleep(1.2)  # two more passes: a second line would show up now
    lines = log.read_text().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in docs)
    new = [d for d in docs[before:] if d.get("event") == "kernel-change"]
    assert len(new) == 1, new
    d = new[0]
    assert (d["level"], d["kind"], d["action"]) == ("info", "fdb", "add")
    assert d["why"].startswith("repair") and peer.vtep_mac in d["msg"], d
    assert scrape(obs, "n1")['overlay_repairs_total{kind="fdb"}'] == repairs + 1
    # Start-up changes are logged the same way: devices, then the peer's entries.
    kinds = [(x["kind"], x["action"]) for x in docs if x.get("event") == "kernel-change"]
    assert ("device", "create") in kinds and ("route", "add") in kinds


def test_systemd_is_notified_ready_only_when_ready_and_stopping_on_stop(obs):
    path = obs.dir / "notify.sock"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(1)
    msgs: list[str] = []

    def until(token: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msgs.append(rx.recv(4096).decode())
            except TimeoutError:
                continue
            if token in msgs[-1].split("\n"):
                return
        raise AssertionError(f"no {token} within {timeout}s: {msgs}")

    try:
        obs.stop_agent("n2")
        obs.start_agent("n2", env={"NOTIFY_SOCKET": str(path)})
        until("READY=1", 30)
        code, body = get(obs, "n2", HEALTH, "/readyz")
        assert code == 200, body  # READY=1 means ready
        fields = dict(line.split("=", 1) for line in msgs[-1].split("\n"))
        assert fields["MAINPID"] == str(obs.node("n2").pid)  # `ip netns exec` execs overlayd
        assert fields["STATUS"].startswith("ready: node n2, subnet 10.244.")
        assert any("STATUS=acquiring a subnet lease" in m for m in msgs[:-1]), msgs
        obs.stop_agent("n2")
        until("STOPPING=1", 10)
        assert "STATUS=stopping on SIGTERM" in msgs[-1]
    finally:
        rx.close()
        path.unlink(missing_ok=True)
        if not obs.node("n2").pid:
            obs.start_agent("n2")
            obs.wait_ready("n2", 30)


def test_nodes_reach_every_pod_and_pods_reach_every_node_without_nat(obs):
    for node in obs.st.nodes:
        for pod in obs.st.pods:
            assert obs.ping(node.netns, pod.ip) or obs.ping(node.netns, pod.ip), \
                f"{node.name} -> {pod.name}"
            assert obs.ping(pod.netns, node.underlay_ip) or \
                obs.ping(pod.netns, node.underlay_ip), f"{pod.name} -> {node.name}"


def _trace(sb: Sandbox, a: str, b: str, *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([tool("overlayctl"), "trace", a, b, "--name", sb.name, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stderr is not None
    line = p.stderr.readline()
    assert line.startswith("capturing on br0"), line + p.stderr.read()
    return p


def test_trace_shows_outer_and_inner_headers_of_a_ping(obs):
    a = next(p for p in obs.st.pods if p.node == "n1")
    b = next(p for p in obs.st.pods if p.node == "n2")
    n1, n2 = obs.node("n1"), obs.node("n2")
    p = _trace(obs, a.ip, b.ip, "--count", "4", "--timeout", "20", "--json")
    assert obs.ping(a.netns, b.ip, count=2)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    seen = [json.loads(line) for line in out.splitlines()]
    assert [s["direction"] for s in seen] == ["a>b", "b>a", "a>b", "b>a"]
    for s in seen:
        fwd = s["direction"] == "a>b"
        outer, inner = s["outer"], s["inner"]
        assert s["vni"] == 1 and outer["proto"] == "udp" and outer["detail"].endswith("> 8472")
        assert (outer["ip_src"], outer["ip_dst"]) == ((n1.underlay_ip, n2.underlay_ip) if fwd
                                                     else (n2.underlay_ip, n1.underlay_ip))
        assert (inner["ip_src"], inner["ip_dst"]) == ((a.ip, b.ip) if fwd else (b.ip, a.ip))
        assert inner["detail"].startswith("echo-request" if fwd else "echo-reply")
    assert seen[0]["inner"]["eth_dst"] == obs.status("n2").self.vtep_mac


def test_trace_shows_where_packets_are_lost(obs):
    """Replies dropped on the far node: the trace shows requests and no reply."""
    a = next(p for p in obs.st.pods if p.node == "n1")
    b = next(p for p in obs.st.pods if p.node == "n2")
    ns = obs.node("n2").netns
    rules = (f"table ip lose {{\n chain forward {{\n  type filter hook forward priority 0;\n"
             f"  ip daddr {b.ip} icmp type echo-request drop\n }}\n}}\n")
    subprocess.run([*obs.exec_prefix(ns), "nft", "-f", "-"], input=rules.encode(), check=True)
    try:
        p = _trace(obs, a.ip, b.ip, "--count", "2", "--timeout", "8")
        assert not obs.ping(a.netns, b.ip, count=2, timeout=1)
        out, err = p.communicate(timeout=30)
    finally:
        obs.run_in(ns, "nft", "delete", "table", "ip", "lose", check=False)
    assert p.returncode == 0, err
    assert re.search(rf"#1 \+[\d.]+s {re.escape(a.ip)} > {re.escape(b.ip)} VXLAN vni 1\n"
                     rf"   outer  eth \S+ > \S+  ip {re.escape(obs.node('n1').underlay_ip)} > ",
                     out), out
    assert "icmp echo-reply" not in out
    assert f"2 packets: {a.ip} > {b.ip}: 2, {b.ip} > {a.ip}: 0" in out
    assert f"nothing came back from {b.ip}" in out
    assert obs.ping(a.netns, b.ip)


def test_standalone_plugin_from_install_cni_attaches_a_pod(obs, tmp_path):
    """What the DaemonSet's init container installs on a host (the same flags): the
    static executable, which needs neither this package nor Python."""
    bindir = tmp_path / "bin"
    p = subprocess.run([tool("overlayctl"), "install-cni", "--standalone", "--bin-dir",
                        str(bindir), "--conf-dir", str(tmp_path / "net.d"), "--agent-socket",
                        str(obs.cni_socket("n1"))], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert (bindir / "overlay").read_bytes() == plugin_binary().read_bytes()
    conf = json.loads((tmp_path / "net.d" / "10-overlay.conflist").read_text())
    net = NetworkList(conf, f"{bindir}:/usr/lib/cni", prefix=obs.exec_prefix(obs.node("n1").netns))
    ns = obs.ns("n1-sa")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = net.add("standalone-pod", f"/run/netns/{ns}")
        addr = ipaddress.IPv4Interface(res["ips"][0]["address"]).ip
        assert addr in ipaddress.IPv4Network(obs.status("n1").self.subnet)
        other = next(p for p in obs.st.pods if p.node == "n2")
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        assert obs.ping(ns, other.ip) or obs.ping(ns, other.ip)
        net.delete("standalone-pod", f"/run/netns/{ns}", result=res)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]}
    v = subprocess.run([str(bindir / "overlay")], input=b'{"cniVersion": "1.0.0"}', env=env,
                       capture_output=True, timeout=30)
    assert "1.0.0" in json.loads(v.stdout)["supportedVersions"]


def test_network_init_from_a_file_is_idempotent_on_a_running_node(obs, tmp_path):
    """What the DaemonSet's network-init container does on every node, including
    nodes whose cni0 and overlay.1 already hold cluster addresses."""
    f = tmp_path / "net-conf.json"
    f.write_text('{"Network": "10.244.0.0/16", "SubnetLen": 24, '
                 '"Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}')
    base = [*obs.exec_prefix(obs.node("n1").netns), tool("overlayctl"), "network", "init",
            "--etcd-endpoints", obs.etcd_endpoints(), "--config-file"]
    p = subprocess.run([*base, str(f)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "already in /overlay/network/config, identical" in p.stdout
    f.write_text('{"Network": "10.245.0.0/16", "SubnetLen": 24}')
    p = subprocess.run([*base, str(f)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "a network config already exists" in p.stderr, p.stderr
    f.write_text('{"Network": "10.244.0.0/16", "SubnetLen": 40}')
    p = subprocess.run([*base, str(f)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and p.stderr.startswith("overlayctl: invalid "), p.stderr
    cfg = obs.etcdctl("get", "--print-value-only", "/overlay/network/config").stdout
    assert json.loads(cfg)["Network"] == "10.244.0.0/16"


def test_network_init_refuses_a_cidr_on_the_nodes_own_underlay(obs):
    """Run on a node, `network init --force` with the underlay's own network as the
    cluster CIDR stops before etcd: pods would be unreachable."""
    ns = obs.node("n1").netns
    before = obs.etcdctl("get", "--print-value-only", "/overlay/network/config").stdout
    p = subprocess.run([*obs.exec_prefix(ns), tool("overlayctl"), "network", "init",
                        "--etcd-endpoints", obs.etcd_endpoints(), "--cidr", "172.30.0.0/16",
                        "--subnet-len", "24", "--force"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "invalid --cidr: 172.30.0.0/16 overlaps 172.30.0.0/16, which is in use on this " \
           "host" in p.stderr
    assert "Warning" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert obs.etcdctl("get", "--print-value-only", "/overlay/network/config").stdout == before
