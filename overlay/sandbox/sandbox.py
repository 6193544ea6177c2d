"""A whole cluster on one machine, built from network namespaces.

  underlay   ovs-<name>-ul      a bridge (br0) joining every host's eth0
  etcd       ovs-<name>-etcd1.. real etcd processes
  nodes      ovs-<name>-n1..    a real overlayd each
  pods       ovs-<name>-n1-p1.. attached by running the CNI conflist, like a runtime

Pods get IPv4, IPv6 or both (`ip_family`); the underlay is IPv4 (172.30.0.0/16)
or IPv6 (fd30::/64) (`underlay_family`). With `segments` > 1 the underlay is
routed: one bridge per segment (br0, br1..., in ovs-<name>-ul; segment k is
172.(29+k).0.0/16 or fd(2f+k)::/64) joined by a router namespace ovs-<name>-rt,
and node n<i> sits on segment ((i-1) mod segments) + 1: DirectRouting then
has both kinds of peers.

Nothing is created in the root namespace: every device lives in a namespace
this module made, every process it starts is recorded by PID in
/run/overlay-sandbox/<name>/state.json, and `down` removes all of it.

Every host's underlay address has a fixed MAC, and every host knows every
other one on its segment by a permanent neighbour entry: the kernel's ARP
(and IPv6 neighbour) table is shared by all namespaces and overflows at 1,024
learned entries (gc_thresh3, settable only in the root namespace), which a
full mesh of ~32 hosts reaches. Permanent entries do not count.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from overlay.cni.install import InstallOptions, install
from overlay.devnames import vxlan_name
from overlay.model import hostport
from overlay.sandbox.runtime import NetworkList

BASE = Path("/run/overlay-sandbox")
# Daemons this process started, kept so they are reaped through their Popen
# (processes started by an earlier `overlayctl sandbox up` are handled by PID).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
UNDERLAY_NET = "172.30.0.0/16"
# Hosts set up at once by `up` (namespaces, links, files; pods).
PARALLEL = 8
NAME_RE = re.compile(r"^[a-z0-9]{1,12}$")
IP_FAMILIES = ("ipv4", "ipv6", "dual")
DEFAULT_CIDR6 = "fd00:10:244::/56"
MAX_SEGMENTS = 4


class SandboxError(Exception):
    """A step failed. `step` names it; `log` is the tail of the log that explains it."""

    def __init__(self, step: str, message: str, log: str = "") -> None:
        super().__init__(f"{step}: {message}")
        self.step, self.message, self.log = step, message, log


def sh(*args: str, check: bool = True, timeout: float = 60, input: bytes | None = None
       ) -> subprocess.CompletedProcess[bytes]:
    p = subprocess.run(list(args), capture_output=True, timeout=timeout, check=False,
                       input=input)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, args, p.stdout, p.stderr)
    return p


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def tool(name: str) -> str:
    """A console script of this installation (next to the running interpreter)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise SandboxError("setup", f"{name} is not installed (run `make install`)")
    return found


@dataclass
class Pod:
    name: str
    node: str
    netns: str
    container_id: str
    ifname: str = "eth0"
    ip: str = ""  # its IPv4 address, or its IPv6 one on an IPv6-only cluster
    result: Any = None
    ip6: str = ""  # its IPv6 address (dual-stack and IPv6-only)

    def address(self, family: int) -> str:
        if family == 6:
            return self.ip6
        return self.ip if ":" not in self.ip else ""


@dataclass
class Host:
    name: str
    netns: str
    underlay_ip: str
    role: str  # "etcd", "node", "outside"
    pid: int = 0
    log: str = ""
    dir: str = ""
    segment: int = 1  # which underlay segment (bridge br<segment-1>) it is plugged into


@dataclass
class State:
    name: str
    dir: str
    underlay: str
    etcd: list[Host] = field(default_factory=list)
    nodes: list[Host] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    others: list[Host] = field(default_factory=list)
    cidr: str = "10.244.0.0/16"
    subnet_len: int = 24
    vni: int = 1
    port: int = 8472
    agent_args: list[str] = field(default_factory=list)
    etcd_tls: bool = False
    underlay_mtu: int = 1500
    tls: bool = False  # agents talk mutual TLS with certificates from <dir>/pki
    ip_family: str = "ipv4"  # pods: ipv4, ipv6 or dual
    underlay_family: int = 4
    segments: int = 1
    cidr6: str = DEFAULT_CIDR6
    subnet_len6: int = 64
    direct_routing: bool = False
    # Faults in effect (overlay.sandbox.lab changes them; `fault heal` lifts them).
    loss_percent: int = 0
    partitioned: list[str] = field(default_factory=list)
    bandwidth: dict[str, str] = field(default_factory=dict)  # host -> tc rate
    powered_off: list[str] = field(default_factory=list)  # nodes mid-reboot: no namespace

    @property
    def pod_families(self) -> tuple[int, ...]:
        return {"ipv4": (4,), "ipv6": (6,), "dual": (4, 6)}[self.ip_family]

    @classmethod
    def load(cls, path: Path) -> State:
        doc = json.loads(path.read_text())
        doc["etcd"] = [Host(**h) for h in doc.get("etcd", [])]
        doc["nodes"] = [Host(**h) for h in doc.get("nodes", [])]
        doc["others"] = [Host(**h) for h in doc.get("others", [])]
        doc["pods"] = [Pod(**p) for p in doc.get("pods", [])]
        return cls(**doc)


Progress = Callable[[str], None]


def _quiet(msg: str) -> None:
    pass


class Sandbox:
    def __init__(self, name: str = "demo", progress: Progress = _quiet,
                 base: Path = BASE) -> None:
        if not NAME_RE.match(name):
            raise SandboxError("setup", f"sandbox name {name!r} must be 1-12 of [a-z0-9]")
        self.name = name
        self.dir = base / name
        self.progress = progress
        self.state_path = self.dir / "state.json"
        self.state: State | None = State.load(self.state_path) if self.state_path.exists() \
            else None
        self._lock = threading.RLock()  # `up` works on several hosts at once
        self.timings: dict[str, float] = {}  # what the last `up` took

    # --- naming -----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return f"ovs-{self.name}-"

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    @property
    def st(self) -> State:
        if self.state is None:
            raise SandboxError("sandbox", f"sandbox {self.name!r} is not up "
                               f"(no {self.state_path})")
        return self.state

    def save(self) -> None:
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.st), indent=2) + "\n")
            os.replace(tmp, self.state_path)

    @contextlib.contextmanager
    def step(self, what: str, log: Path | None = None) -> Iterator[None]:
        self.progress(f"  {what} ...")
        t0 = time.monotonic()
        try:
            yield
        except SandboxError:
            raise
        except subprocess.CalledProcessError as exc:
            out = (exc.stderr or b"").decode(errors="replace") + (exc.stdout or b"").decode(
                errors="replace")
            raise SandboxError(what, f"`{' '.join(map(str, exc.cmd))}` exited {exc.returncode}",
                               out.strip() or (tail(log) if log else "")) from None
        except Exception as exc:
            raise SandboxError(what, f"{type(exc).__name__}: {exc}",
                               tail(log) if log else "") from None
        self.progress(f"  {what}: done in {time.monotonic() - t0:.1f}s")

    # --- hosts ----------------------------------------------------------------

    def exec_prefix(self, host_ns: str) -> list[str]:
        return ["ip", "netns", "exec", host_ns]

    def run_in(self, host_ns: str, *cmd: str, check: bool = True, timeout: float = 60
               ) -> subprocess.CompletedProcess[bytes]:
        return sh(*self.exec_prefix(host_ns), *cmd, check=check, timeout=timeout)

    def _new_ns(self, ns: str) -> None:
        if ns in list_netns():
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _plug(self, host: str, ns: str, ip: str, mtu: int = 1500, segment: int = 1) -> None:
        """Connect host namespace `ns` to the bridge of underlay `segment` as eth0 with `ip`
        (and a default route through the router when the underlay has segments)."""
        ul = self.st.underlay
        from overlay.sandbox.faults import port_name

        port = port_name(host)
        sh("ip", "-n", ul, "link", "add", port, "mtu", str(mtu), "type", "veth", "peer", "name",
           "eth0", "netns", ns, "mtu", str(mtu), "address", underlay_mac(ip))
        sh("ip", "-n", ul, "link", "set", port, "master", f"br{segment - 1}", "up")
        self._address(ns, "eth0", ip)
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        if self.st.segments > 1:
            sh("ip", "-n", ns, "route", "add", "default", "via", self.router_ip(segment),
               "dev", "eth0")

    def _address(self, ns: str, dev: str, ip: str) -> None:
        if ":" in ip:
            # nodad: usable at once, not after a second of duplicate address detection
            sh("ip", "-n", ns, "addr", "add", f"{ip}/64", "dev", dev, "nodad")
        else:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/16", "dev", dev)

    def _neighbours(self, hosts: Sequence[Host]) -> None:
        """Permanent neighbour entries in each of `hosts` for every other host on its
        underlay segment, and in every other host there for each of `hosts` (see the
        module doc; hosts on other segments are reached through the router)."""
        st = self.st
        every = [*st.etcd, *st.nodes, *st.others]
        new = {h.name for h in hosts}
        todo: dict[str, list[Host]] = {}
        for h in every:
            todo[h.netns] = [x for x in every if x.name != h.name and x.segment == h.segment
                             and (h.name in new or x.name in new)]

        def one(ns: str) -> None:
            lines = "".join(f"neigh replace {x.underlay_ip} lladdr {underlay_mac(x.underlay_ip)}"
                            " dev eth0 nud permanent\n" for x in todo[ns])
            if lines:
                sh("ip", "-n", ns, "-batch", "-", input=lines.encode())

        with ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(one, [ns for ns, xs in todo.items() if xs]))

    def underlay_ip(self, role: str, index: int, segment: int = 1) -> str:
        third = {"etcd": 0, "node": 1, "outside": 2}[role]
        if self.st.underlay_family == 6:
            return str(ipaddress.ip_address(f"fd{0x2f + segment:x}::{third}:{10 + index}"))
        return f"172.{29 + segment}.{third}.{10 + index}"

    def router_ip(self, segment: int) -> str:
        if self.st.underlay_family == 6:
            return f"fd{0x2f + segment:x}::ffff"
        return f"172.{29 + segment}.255.254"

    def node_segment(self, index: int) -> int:
        return (index - 1) % self.st.segments + 1

    def _router(self) -> None:
        """The router namespace joining the segments' bridges (forwarding on there only)."""
        st = self.st
        rt = self.ns("rt")
        self._new_ns(rt)
        knob = ("net.ipv6.conf.all.forwarding" if st.underlay_family == 6
                else "net.ipv4.ip_forward")
        self.run_in(rt, "sysctl", "-q", "-w", f"{knob}=1")
        for seg in range(1, st.segments + 1):
            sh("ip", "-n", st.underlay, "link", "add", "br" + str(seg - 1), "type", "bridge")
            sh("ip", "-n", st.underlay, "link", "set", "br" + str(seg - 1), "up")
            port = f"r-{seg}"
            sh("ip", "-n", st.underlay, "link", "add", port, "type", "veth", "peer", "name",
               f"seg{seg}", "netns", rt)
            sh("ip", "-n", st.underlay, "link", "set", port, "master", f"br{seg - 1}", "up")
            self._address(rt, f"seg{seg}", self.router_ip(seg))
            sh("ip", "-n", rt, "link", "set", f"seg{seg}", "up")

    # --- up -------------------------------------------------------------------

    def up(self, nodes: int = 3, pods_per_node: int = 2, *, etcd_members: int = 1,
           cidr: str = "10.244.0.0/16", subnet_len: int = 24, vni: int = 1,
           port: int = 8472, agent_args: Sequence[str] = (), wait: float = 60,
           underlay_mtu: int = 1500, tls: bool = False, etcd_tls: bool = False,
           ip_family: str = "ipv4", underlay_family: int = 4, segments: int = 1,
           cidr6: str = DEFAULT_CIDR6, subnet_len6: int = 64,
           direct_routing: bool = False, net_conf: str | None = None) -> State:
        """`net_conf`: a network config (flannel's net-conf.json) written as it is with
        `overlayctl network init --config-file`, instead of the one the other
        arguments describe (its families, networks and DirectRouting win)."""
        if net_conf is not None:
            from overlay.errors import ConfigError
            from overlay.model import NetworkConfig

            try:
                conf = NetworkConfig.from_json(net_conf)
            except ConfigError as exc:
                raise SandboxError("up", f"network config: {exc}") from None
            ip_family = {(4,): "ipv4", (6,): "ipv6", (4, 6): "dual"}[conf.families]
            cidr, subnet_len = str(conf.network or cidr), conf.subnet_len
            cidr6, subnet_len6 = str(conf.ipv6_network or cidr6), conf.ipv6_subnet_len
            vni, port, direct_routing = conf.vni, conf.port, conf.direct_routing
        if ip_family not in IP_FAMILIES:
            raise SandboxError("up", f"ip family {ip_family!r} is not one of "
                               f"{', '.join(IP_FAMILIES)}")
        if underlay_family not in (4, 6):
            raise SandboxError("up", f"underlay family {underlay_family} is not 4 or 6")
        if not 1 <= segments <= MAX_SEGMENTS:
            raise SandboxError("up", f"underlay segments {segments} is not in 1..{MAX_SEGMENTS}")
        if self.state is not None:
            raise SandboxError("up", f"sandbox {self.name!r} already exists; run "
                               f"`overlayctl sandbox down --name {self.name}` first")
        if os.geteuid() != 0:
            raise SandboxError("up", "the sandbox needs root (it creates network namespaces)")
        for binary in ("ip", "etcd", "ping"):
            if shutil.which(binary) is None:
                raise SandboxError("up", f"{binary} is not installed (apt-get install iproute2 "
                                   "etcd-server iputils-ping)")
        leftovers = [n for n in list_netns() if n.startswith(self.prefix)]
        for n in leftovers:
            sh("ip", "netns", "del", n, check=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.state = State(name=self.name, dir=str(self.dir), underlay=self.ns("ul"),
                           cidr=cidr, subnet_len=subnet_len, vni=vni, port=port,
                           agent_args=list(agent_args), underlay_mtu=underlay_mtu,
                           tls=tls, etcd_tls=etcd_tls, ip_family=ip_family,
                           underlay_family=underlay_family, segments=segments, cidr6=cidr6,
                           subnet_len6=subnet_len6, direct_routing=direct_routing)
        self.save()
        t0 = time.monotonic()
        with self.step("underlay network" + (f" ({segments} routed segments)"
                                             if segments > 1 else "")):
            self._new_ns(self.st.underlay)
            if segments > 1:
                self._router()
            else:
                sh("ip", "-n", self.st.underlay, "link", "add", "br0", "type", "bridge")
                sh("ip", "-n", self.st.underlay, "link", "set", "br0", "up")
        self.start_etcd(etcd_members)
        with self.step("network config in etcd"):
            if net_conf is not None:
                conf_file = self.dir / "net-conf.json"
                conf_file.write_text(net_conf)
                self.etcdctl_overlay("network", "init", "--config-file", str(conf_file))
            else:
                self.etcdctl_overlay("network", "init", *self.network_flags())
        with self.step("CNI plugin"):
            install(InstallOptions(bin_dir=self.dir / "cni" / "bin",
                                   conf_dir=self.dir / "cni" / "unused"))
        if tls:
            with self.step("certificate authority for mutual TLS between agents"):
                self.pki()
        if nodes == 0:
            self.progress(f"sandbox {self.name} up in {time.monotonic() - t0:.1f}s: etcd only")
            return self.st
        names = [f"n{i}" for i in range(1, nodes + 1)]
        with self.step(f"{nodes} node hosts"):
            with ThreadPoolExecutor(PARALLEL) as ex:
                hosts = list(ex.map(self._node_host, names))
            st = self.st
            st.nodes += hosts
            self.save()
            self._neighbours(hosts)
        for n in names:
            self.start_agent(n)
        t_agents = time.monotonic()
        self.wait_all_ready(names, wait)
        self.wait_converged(wait)
        t_agents = time.monotonic() - t_agents
        with self.step(f"{nodes * pods_per_node} pods"), ThreadPoolExecutor(PARALLEL) as ex:
            list(ex.map(lambda a: self.add_pod(*a),
                        [(n, f"{n}-p{i}") for n in names for i in range(1, pods_per_node + 1)]))
        self.timings = {"up_s": round(time.monotonic() - t0, 1),
                        "agents_ready_and_programmed_s": round(t_agents, 1)}
        self.progress(f"sandbox {self.name} up in {time.monotonic() - t0:.1f}s: "
                      f"{nodes} nodes (agents ready and every peer programmed "
                      f"{t_agents:.1f}s after they started), "
                      f"{nodes * pods_per_node} pods")
        return self.st

    def network_flags(self) -> list[str]:
        """`overlayctl network init` flags for this sandbox's cluster."""
        st = self.st
        flags = ["--vni", str(st.vni), "--port", str(st.port)]
        if 4 in st.pod_families:
            flags += ["--cidr", st.cidr, "--subnet-len", str(st.subnet_len)]
        else:
            flags += ["--no-ipv4"]
        if 6 in st.pod_families:
            flags += ["--ipv6-cidr", st.cidr6, "--ipv6-subnet-len", str(st.subnet_len6)]
        if st.direct_routing:
            flags += ["--direct-routing"]
        return flags

    @property
    def etcd_scheme(self) -> str:
        return "https" if self.st.etcd_tls else "http"

    def etcd_endpoints(self) -> str:
        return ",".join(f"{self.etcd_scheme}://{hostport(h.underlay_ip, 2379)}"
                        for h in self.st.etcd)

    # --- etcd with client-certificate authentication -------------------------------

    def etcd_pki(self) -> Any:
        """A CA of its own for etcd: agent certificates for the membership do not open it."""
        from overlay.sandbox.pki import CertificateAuthority

        return CertificateAuthority(self.dir / "pki-etcd", "overlay sandbox etcd CA")

    def etcd_client_files(self, name: str) -> tuple[Path, Path, Path]:
        """(cert, key, ca) for client `name`, issued on first use."""
        d = self.dir / "pki-etcd"
        cert, key = d / f"client-{name}.crt", d / f"client-{name}.key"
        if not cert.exists():
            issued = self.etcd_pki().issue(f"client-{name}")
            return issued.cert, issued.key, issued.ca
        return cert, key, d / "ca.crt"

    def etcd_agent_args(self, name: str) -> list[str]:
        if not self.st.etcd_tls:
            return []
        cert, key, ca = self.etcd_client_files(name)
        return ["--etcd-cafile", str(ca), "--etcd-certfile", str(cert), "--etcd-keyfile",
                str(key)]

    def _etcdctl_tls(self) -> list[str]:
        if not self.st.etcd_tls:
            return []
        cert, key, ca = self.etcd_client_files("etcdctl")
        return ["--cacert", str(ca), "--cert", str(cert), "--key", str(key)]

    def start_etcd(self, members: int = 1) -> None:
        st = self.st
        hosts = []
        for i in range(1, members + 1):
            name = f"etcd{i}"
            hosts.append(Host(name, self.ns(name), self.underlay_ip("etcd", i), "etcd",
                              log=str(self.dir / "logs" / f"{name}.log"),
                              dir=str(self.dir / name)))
        cluster = ",".join(f"{h.name}=http://{hostport(h.underlay_ip, 2380)}" for h in hosts)
        for h in hosts:
            with self.step(f"etcd host {h.name} ({h.underlay_ip})", Path(h.log)):
                self._new_ns(h.netns)
                self._plug(h.name, h.netns, h.underlay_ip)
                st.etcd.append(h)
                self.save()
                self._spawn_etcd(h, cluster, "new")
        for h in hosts:
            with self.step(f"etcd {h.name} healthy", Path(h.log)):
                self.wait_etcd(h)

    def _spawn_etcd(self, h: Host, cluster: str, cluster_state: str) -> None:
        Path(h.dir).mkdir(parents=True, exist_ok=True)
        scheme = self.etcd_scheme
        client, peer = hostport(h.underlay_ip, 2379), hostport(h.underlay_ip, 2380)
        cmd = [
            "etcd", "--name", h.name, "--data-dir", h.dir,
            "--listen-client-urls", f"{scheme}://{client},{scheme}://127.0.0.1:2379",
            "--advertise-client-urls", f"{scheme}://{client}",
            "--listen-peer-urls", f"http://{peer}",
            "--initial-advertise-peer-urls", f"http://{peer}",
            "--initial-cluster", cluster, "--initial-cluster-state", cluster_state,
            "--initial-cluster-token", f"ovs-{self.name}",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
        ]
        if self.st.etcd_tls:
            server = self.etcd_pki().issue(h.name, (h.underlay_ip, "127.0.0.1"))
            cmd += ["--cert-file", str(server.cert), "--key-file", str(server.key),
                    "--client-cert-auth", "--trusted-ca-file", str(server.ca)]
        h.pid = self._spawn(h.netns, cmd, Path(h.log))
        self.save()

    def wait_etcd(self, h: Host, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.run_in(h.netns, "etcdctl", "--endpoints",
                            f"{self.etcd_scheme}://127.0.0.1:2379", *self._etcdctl_tls(),
                            "--command-timeout=2s", "endpoint", "health", check=False)
            if p.returncode == 0:
                return
            if not pid_alive(h.pid):
                raise RuntimeError(f"etcd {h.name} exited")
            time.sleep(0.2)
        raise TimeoutError(f"etcd {h.name} not healthy after {timeout:.0f}s")

    def etcd_host(self, name: str) -> Host:
        for h in self.st.etcd:
            if h.name == name:
                return h
        raise SandboxError("etcd", f"no etcd member {name!r}")

    def kill_etcd(self, name: str) -> None:
        """SIGKILL one etcd member (its data directory stays for a restart)."""
        h = self.etcd_host(name)
        kill_and_wait(h.pid, signal.SIGKILL, 5)
        h.pid = 0
        self.save()

    def restart_etcd(self, name: str, wait: bool = True) -> None:
        """Start a killed member again, rejoining the existing cluster with its data."""
        h = self.etcd_host(name)
        cluster = ",".join(f"{m.name}=http://{hostport(m.underlay_ip, 2380)}"
                           for m in self.st.etcd)
        self._spawn_etcd(h, cluster, "existing")
        if wait:
            self.wait_etcd(h)

    def signal_etcd(self, sig: int, members: Sequence[str] | None = None) -> None:
        """Send `sig` to etcd members we started (all by default): SIGSTOP freezes one."""
        for h in self.st.etcd:
            if (members is None or h.name in members) and pid_alive(h.pid):
                os.kill(h.pid, sig)

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run etcdctl on the first live etcd host against its local member."""
        h = next((m for m in self.st.etcd if pid_alive(m.pid)), self.st.etcd[0])
        return self.run_in(h.netns, "etcdctl", "--endpoints",
                           f"{self.etcd_scheme}://127.0.0.1:2379", *self._etcdctl_tls(), *args,
                           check=check)

    def etcdctl_overlay(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """Run `overlayctl <args>` on the first etcd host, against the local etcd."""
        h = self.st.etcd[0]
        return self.run_in(h.netns, tool("overlayctl"), *args, "--etcd-endpoints",
                           f"{self.etcd_scheme}://127.0.0.1:2379",
                           *self.etcd_agent_args("overlayctl"))

    def _spawn(self, ns: str, cmd: list[str], log: Path, env: dict[str, str] | None = None
               ) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        # Reap daemons that died meanwhile (killed by a test, crashed): no zombies pile up.
        for pid, child in list(_CHILDREN.items()):
            if child.poll() is not None:
                del _CHILDREN[pid]
        with open(log, "ab") as f:
            p = subprocess.Popen([*self.exec_prefix(ns), *cmd], stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir,
                                 env={**os.environ, **(env or {})})
        _CHILDREN[p.pid] = p
        return p.pid

    # --- nodes ----------------------------------------------------------------

    def node(self, name: str) -> Host:
        for h in self.st.nodes:
            if h.name == name:
                return h
        raise SandboxError("node", f"no node {name!r} in sandbox {self.name}")

    def node_dir(self, name: str) -> Path:
        return self.dir / "nodes" / name

    def agent_socket(self, name: str) -> Path:
        return self.node_dir(name) / "run" / "overlayd.sock"

    def cni_socket(self, name: str) -> Path:
        return self.node_dir(name) / "run" / "cni.sock"

    def conflist_path(self, name: str) -> Path:
        return self.node_dir(name) / "net.d" / "10-overlay.conflist"

    def cni_path(self) -> str:
        return f"{self.dir / 'cni' / 'bin'}:/usr/lib/cni"

    @property
    def vxlan_device(self) -> str:
        """The VXLAN device every node has (its name depends on the VNI)."""
        return vxlan_name(self.st.vni)

    def kernel_entries(self, node: str) -> dict[str, set[tuple[str, str]]]:
        """The peer entries on a node's VXLAN device, as `ip` and `bridge` show them:
        route (dst, gateway), permanent neigh (dst, lladdr), fdb (mac, dst)."""
        ns, dev = self.node(node).netns, self.vxlan_device

        def j(*cmd: str) -> list[dict[str, Any]]:
            out = self.run_in(ns, *cmd, check=False).stdout
            return list(json.loads(out)) if out.strip() else []

        routes = {(str(r["dst"]), str(r.get("gateway"))) for r in j("ip", "-j", "route", "show",
                                                                 "dev", dev)}
        neighs = {(str(n["dst"]), str(n.get("lladdr"))) for n in j("ip", "-j", "neigh", "show",
                                                                "dev", dev)
                  if "PERMANENT" in (n.get("state") or [])}
        fdbs = {(str(f["mac"]), str(f.get("dst"))) for f in j("bridge", "-j", "fdb", "show",
                                                             "dev", dev) if f.get("dst")}
        return {"route": routes, "neigh": neighs, "fdb": fdbs}

    def add_node(self, name: str | None = None, *, wait: bool = True,
                 extra_args: Sequence[str] = (), preferred_subnet: str | None = None) -> Host:
        st = self.st
        if name is None:
            used = {h.name for h in st.nodes}
            name = next(f"n{i}" for i in range(1, 10_000) if f"n{i}" not in used)
        h = self._host_of(name)
        where = f", segment {h.segment}" if st.segments > 1 else ""
        with self.step(f"node {name} ({h.underlay_ip}{where})"):
            h = self._node_host(name, preferred_subnet)
            st.nodes.append(h)
            self.save()
            self._neighbours([h])
            self.start_agent(name, extra_args)
        if wait:
            self.wait_ready(name)
        return h

    def _host_of(self, name: str) -> Host:
        index = int(name[1:]) if name[1:].isdigit() else len(self.st.nodes) + 100
        seg = self.node_segment(index)
        return Host(name, self.ns(name), self.underlay_ip("node", index, seg), "node",
                    log=str(self.dir / "logs" / f"{name}.log"), dir=str(self.node_dir(name)),
                    segment=seg)

    def _node_host(self, name: str, preferred_subnet: str | None = None) -> Host:
        """A node's namespace on the underlay and its files; no agent yet."""
        h = self._host_of(name)
        self._new_ns(h.netns)
        self._plug(name, h.netns, h.underlay_ip, self.st.underlay_mtu, h.segment)
        d = self.node_dir(name)
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(parents=True, exist_ok=True)
        if preferred_subnet is not None:
            # As if this node held the subnet before (its persisted identity).
            from overlay.agent.state import Identity, random_mac, save
            from overlay.model import parse_cidr

            save(d / "state", Identity(name, random_mac(), parse_cidr(preferred_subnet)))
        install(InstallOptions(bin_dir=self.dir / "cni" / "bin", conf_dir=d / "net.d",
                               agent_socket=str(self.cni_socket(name))))
        if self.st.tls:
            self.pki().issue(name, (h.underlay_ip,))
        return h

    def add_bare_node(self, name: str) -> Host:
        """A node namespace on the underlay with no agent: for an overlayd that something
        else runs there (podman, systemd in a container). Its run dir (`node_dir/run`) and
        conflist (`conflist_path`) are where `add_pod` looks, as for any node."""
        st = self.st
        h = self._host_of(name)
        with self.step(f"bare node {name} ({h.underlay_ip})"):
            self._new_ns(h.netns)
            self._plug(name, h.netns, h.underlay_ip, st.underlay_mtu, h.segment)
            (self.node_dir(name) / "run").mkdir(parents=True, exist_ok=True)
            st.nodes.append(h)
            self.save()
            self._neighbours([h])
        return h

    def agent_cmd(self, name: str, extra_args: Sequence[str] = ()) -> list[str]:
        d = self.node_dir(name)
        args = [*self.st.agent_args, *extra_args]
        # eth0 unless the caller chooses the underlay itself.
        chosen = {"--iface", "--iface-regex", "--public-ip"} & {a.split("=")[0] for a in args}
        return [
            tool("overlayd"), "--node-name", name, "--etcd-endpoints", self.etcd_endpoints(),
            *([] if chosen else ["--iface", "eth0"]),
            "--run-dir", str(d / "run"), "--state-dir", str(d / "state"),
            "--health-addr", "127.0.0.1:9181",
            *self.tls_args(name), *self.etcd_agent_args(name), *args,
        ]

    # --- membership: certificates ------------------------------------------------

    def pki(self) -> Any:
        from overlay.sandbox.pki import CertificateAuthority

        return CertificateAuthority(self.dir / "pki")

    def tls_args(self, name: str) -> list[str]:
        if not self.st.tls:
            return []
        d = self.dir / "pki"
        return ["--tls-cert", str(d / f"{name}.crt"), "--tls-key", str(d / f"{name}.key"),
                "--tls-ca", str(d / "ca.crt")]

    def start_agent(self, name: str, extra_args: Sequence[str] = (),
                    env: dict[str, str] | None = None) -> int:
        h = self.node(name)
        h.pid = self._spawn(h.netns, self.agent_cmd(name, extra_args), Path(h.log), env)
        self.save()
        return h.pid

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        h = self.node(name)
        if h.pid and pid_alive(h.pid):
            kill_and_wait(h.pid, sig, timeout)
        h.pid = 0
        self.save()

    def status(self, name: str, timeout: float = 2.0) -> Any:
        from overlay.agent.localclient import local_status

        return local_status(self.agent_socket(name), timeout)

    def wait_ready(self, name: str, timeout: float = 60) -> None:
        h = self.node(name)
        with self.step(f"agent {name} ready", Path(h.log)):
            deadline = time.monotonic() + timeout
            last = "no answer"
            while time.monotonic() < deadline:
                if not pid_alive(h.pid):
                    raise RuntimeError(f"overlayd on {name} exited")
                try:
                    st = self.status(name)
                    if st.ready:
                        return
                    last = "; ".join(f"{c.name}: {c.message}" for c in st.conditions if not c.ok)
                except Exception as exc:  # not listening yet
                    last = str(exc).splitlines()[0][:200]
                time.sleep(0.1)
            raise TimeoutError(f"not ready after {timeout:.0f}s ({last})")

    def wait_all_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        """Until every agent of `names` is ready (they start at once: one wait)."""
        with self.step(f"{len(names)} agents ready"):
            deadline = time.monotonic() + timeout
            todo = list(names)
            why: dict[str, str] = {}

            def ready(n: str) -> bool:
                if not pid_alive(self.node(n).pid):
                    raise RuntimeError(f"overlayd on {n} exited:\n{tail(Path(self.node(n).log))}")
                try:
                    st = self.status(n)
                except Exception as exc:  # not listening yet
                    why[n] = str(exc).splitlines()[0][:200]
                    return False
                why[n] = "; ".join(f"{c.name}: {c.message}" for c in st.conditions if not c.ok)
                return bool(st.ready)

            with ThreadPoolExecutor(PARALLEL) as ex:
                while todo:
                    todo = [n for n, ok in zip(todo, ex.map(ready, todo), strict=True) if not ok]
                    if not todo:
                        return
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"not ready after {timeout:.0f}s: " + ", ".join(
                            f"{n} ({why.get(n, '')})" for n in todo[:5]))
                    time.sleep(0.2)

    def wait_converged(self, timeout: float = 60) -> None:
        """Until every node has programmed every other node (what `up` promises)."""
        names = [h.name for h in self.st.nodes]
        with self.step("peers programmed on every node"):
            deadline = time.monotonic() + timeout
            missing: list[str] = []
            while time.monotonic() < deadline:
                missing = []
                for n in names:
                    try:
                        st = self.status(n)
                    except Exception:
                        missing.append(f"{n}: no answer")
                        continue
                    done = {p.record.name for p in st.peers if p.programmed}
                    missing += [f"{n} lacks {m}" for m in names if m != n and m not in done]
                if not missing:
                    return
                time.sleep(0.1)
            raise TimeoutError("not converged: " + ", ".join(missing[:6]))

    # --- pods -----------------------------------------------------------------

    def network(self, node: str) -> NetworkList:
        return NetworkList(self.conflist_path(node), self.cni_path(),
                           prefix=self.exec_prefix(self.node(node).netns))

    def add_pod(self, node: str, name: str | None = None) -> Pod:
        st = self.st
        if name is None:
            used = {p.name for p in st.pods}
            name = next(f"{node}-p{i}" for i in range(1, 10_000) if f"{node}-p{i}" not in used)
        pod = Pod(name=name, node=node, netns=self.ns(name), container_id=f"sandbox-{name}")
        with self.step(f"pod {name}"):
            self._new_ns(pod.netns)
            with self._lock:
                st.pods.append(pod)
                self.save()
            pod.result = self.network(node).add(pod.container_id, f"/run/netns/{pod.netns}",
                                                pod.ifname)
            addrs = [ip["address"].split("/")[0] for ip in pod.result["ips"]]
            pod.ip = addrs[0]
            pod.ip6 = next((a for a in addrs if ":" in a), "")
            self.save()
        return pod

    def del_pod(self, name: str) -> None:
        pod = self.pod(name)
        self.network(pod.node).delete(pod.container_id, f"/run/netns/{pod.netns}", pod.ifname,
                                      pod.result)
        sh("ip", "netns", "del", pod.netns, check=False)
        self.st.pods = [p for p in self.st.pods if p.name != name]
        self.save()

    def pod(self, name: str) -> Pod:
        for p in self.st.pods:
            if p.name == name:
                return p
        raise SandboxError("pod", f"no pod {name!r}")

    def ping(self, src_ns: str, dst: str, count: int = 1, timeout: float = 2,
             size: int | None = None, dont_fragment: bool = False) -> bool:
        args = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout)]
        if count > 1:
            args += ["-i", "0.2"]
        if size is not None:
            args += ["-s", str(size)]
        if dont_fragment:
            args += ["-M", "do"]
        p = self.run_in(src_ns, *args, dst, check=False, timeout=timeout * count + 10)
        return p.returncode == 0

    def check(self, workers: int = 8, family: int | None = None
              ) -> tuple[list[tuple[Pod, Pod, bool]], int, int]:
        """Ping every pod from every pod, over `family` (default: the first the pods have)."""
        fam = family or self.st.pod_families[0]
        pods = [p for p in self.st.pods if p.address(fam)]
        pairs = [(a, b) for a in pods for b in pods if a is not b]

        def probe(pair: tuple[Pod, Pod]) -> bool:
            a, b = pair
            dst = b.address(fam)
            # One retry: the very first packet may wait on ARP/NDP inside a pod.
            return self.ping(a.netns, dst) or self.ping(a.netns, dst, timeout=2)

        with ThreadPoolExecutor(max_workers=workers) as ex:
            oks = list(ex.map(probe, pairs))
        results = [(a, b, ok) for (a, b), ok in zip(pairs, oks, strict=True)]
        return results, sum(oks), len(pairs)

    # --- underlay faults --------------------------------------------------------

    def set_faults(self, loss_percent: int = 0, partitioned: Sequence[str] = ()) -> None:
        """Drop `loss_percent`% of all underlay frames and everything to/from `partitioned`."""
        from overlay.sandbox.faults import Faults, ruleset

        p = subprocess.run([*self.exec_prefix(self.st.underlay), "nft", "-f", "-"],
                           input=ruleset(Faults(loss_percent, frozenset(partitioned))).encode(),
                           capture_output=True, timeout=30, check=False)
        if p.returncode != 0:
            raise SandboxError("faults", p.stderr.decode(errors="replace").strip())
        self.st.loss_percent, self.st.partitioned = loss_percent, sorted(set(partitioned))
        self.save()

    def clear_faults(self) -> None:
        self.set_faults()

    def limit_bandwidth(self, host: str, rate: str = "1mbit") -> None:
        """Cap traffic to and from `host` on the underlay (tbf on both ends of its link)."""
        from overlay.sandbox.faults import port_name

        ns = self._host(host).netns
        for where, dev in ((self.st.underlay, port_name(host)), (ns, "eth0")):
            sh("ip", "netns", "exec", where, "tc", "qdisc", "replace", "dev", dev, "root",
               "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms")
        self.st.bandwidth[host] = rate
        self.save()

    def unlimit_bandwidth(self, host: str) -> None:
        from overlay.sandbox.faults import port_name

        ns = self._host(host).netns
        for where, dev in ((self.st.underlay, port_name(host)), (ns, "eth0")):
            sh("ip", "netns", "exec", where, "tc", "qdisc", "del", "dev", dev, "root",
               check=False)
        self.st.bandwidth.pop(host, None)
        self.save()

    def _host(self, name: str) -> Host:
        for h in (*self.st.nodes, *self.st.etcd, *self.st.others):
            if h.name == name:
                return h
        raise SandboxError("host", f"no host {name!r} in sandbox {self.name}")

    # --- other hosts ----------------------------------------------------------

    def move_node(self, name: str, segment: int) -> Host:
        """Re-plug node `name` into underlay `segment` with that segment's address, its agent
        restarted (a host moved to another rack). Its pods stay as they are."""
        st = self.st
        h = self.node(name)
        if not 1 <= segment <= st.segments:
            raise SandboxError("move", f"segment {segment} is not in 1..{st.segments}")
        index = int(name[1:]) if name[1:].isdigit() else 100
        with self.step(f"move node {name} to segment {segment}"):
            self.stop_agent(name)
            from overlay.sandbox.faults import port_name

            sh("ip", "-n", st.underlay, "link", "del", port_name(name), check=False)
            h.segment, h.underlay_ip = segment, self.underlay_ip("node", index, segment)
            self._plug(name, h.netns, h.underlay_ip, st.underlay_mtu, segment)
            self.save()
            self._neighbours([h])
            self.start_agent(name)
        self.wait_ready(name)
        return h

    def add_outside_host(self, name: str = "outside") -> Host:
        st = self.st
        h = Host(name, self.ns(name), self.underlay_ip("outside", len(st.others) + 1), "outside")
        with self.step(f"outside host {name} ({h.underlay_ip})"):
            self._new_ns(h.netns)
            self._plug(name, h.netns, h.underlay_ip)
            st.others.append(h)
            self.save()
        return h

    # --- down -----------------------------------------------------------------

    def _netns_inodes(self) -> set[tuple[int, int]]:
        out = set()
        for n in list_netns():
            if n.startswith(self.prefix):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/run/netns/{n}")
                    out.add((st.st_dev, st.st_ino))
        return out

    def down(self) -> None:
        # Another process (`overlayctl sandbox node restart`, a chaos run) may have started
        # agents since this object read the state: the file has their PIDs.
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            self.state = State.load(self.state_path)
        st = self.state
        if st is not None:
            ours = self._netns_inodes()
            # A recorded PID may belong to someone else by now (the process died, e.g. on a
            # reboot of the machine or a killed run, and the number was reused): signal only
            # processes inside one of this sandbox's namespaces.
            procs = [h for h in (*st.nodes, *st.etcd, *st.others)
                     if h.pid and (not ours or netns_inode(h.pid) in ours)]
            for h in procs:
                if pid_alive(h.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(h.pid, signal.SIGTERM)
                        os.kill(h.pid, signal.SIGCONT)  # a stopped one (chaos, `node stop`)
            for h in procs:
                kill_and_wait(h.pid, signal.SIGTERM, 10)
        for n in list_netns():
            if n.startswith(self.prefix):
                sh("ip", "netns", "del", n, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = None


def netns_inode(pid: int) -> tuple[int, int] | None:
    """(device, inode) of a process's network namespace; None if it is gone."""
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def underlay_mac(ip: str) -> str:
    """The fixed MAC of a host's underlay address (locally administered): 02:0a and the
    IPv4 address, or 02, the segment's byte and the last four bytes of the IPv6 one."""
    packed = ipaddress.ip_address(ip).packed
    octets = (b"\x0a" + packed) if len(packed) == 4 else packed[1:2] + packed[-4:]
    return "02:" + ":".join(f"{b:02x}" for b in octets)


def list_netns() -> list[str]:
    p = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.decode().splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    _reap(pid)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def kill_and_wait(proc: int | subprocess.Popen[Any], sig: int, timeout: float) -> None:
    """Stop a process we started (by PID or Popen), escalating to SIGKILL after `timeout`."""
    if isinstance(proc, subprocess.Popen):
        _CHILDREN.setdefault(proc.pid, proc)  # reaped through its Popen, which learns the code
    pid = proc if isinstance(proc, int) else proc.pid
    if not pid_alive(pid):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _CHILDREN[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
