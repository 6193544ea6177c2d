"""deploy/: the systemd unit and the Kubernetes manifests, checked against the code.

The unit is verified by systemd itself (`systemd-analyze verify`, which works
offline on unit files; no systemd needs to be running). The manifests are
parsed and every command line in them is parsed by the real argument parsers
of overlayd and overlayctl, so a renamed flag breaks this test, not a cluster.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from overlay.agent.main import build_parser as overlayd_parser
from overlay.cni.install import read_conflist
from overlay.ctl.main import build_parser as overlayctl_parser
from overlay.model import NetworkConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "overlayd.service"
ENV_FILE = DEPLOY / "systemd" / "overlayd.env"
MANIFEST = DEPLOY / "kubernetes" / "overlay.yaml"
CONTAINERFILE = DEPLOY / "kubernetes" / "Containerfile"


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (quotes removed)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = " ".join(shlex.split(value))
    return out


def parse_ok(parser: Any, argv: list[str]) -> Any:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{parser.prog} rejects {argv}")


# --- systemd --------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file system root for `systemd-analyze --root`: the system's own units (for
    the targets ours refers to), ours, and stand-ins for the binaries it runs."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (in APT_PKGS)",
                    pytrace=False)
    root = tmp_path_factory.mktemp("root")
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    settings = unit_settings(UNIT.read_text())
    for line in settings["ExecStart"] + settings.get("ExecStartPre", []):
        binary = root / line.lstrip("+-@:!").split()[0].lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    return root


def test_systemd_analyze_verify_accepts_the_unit(unit_root):
    p = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}", UNIT.name],
                       capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; those are warnings on stderr.
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_systemd_analyze_verify_would_catch_a_mistake(unit_root):
    """The check above is not vacuous: a typo in the unit is reported."""
    unit = unit_root / "etc/systemd/system" / UNIT.name
    good = unit.read_text()
    try:
        unit.write_text(good.replace("Type=notify", "Type=notfy").replace(
            "RestrictRealtime=yes", "RestrictRealtme=yes"))
        p = subprocess.run(["systemd-analyze", "verify", f"--root={unit_root}", UNIT.name],
                           capture_output=True, text=True, timeout=60)
        assert "Failed to parse service type" in p.stderr
        assert "Unknown key 'RestrictRealtme'" in p.stderr
    finally:
        unit.write_text(good)


def test_unit_hardening_exposure(unit_root):
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={unit_root}",
                        UNIT.name], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for overlayd.service: ([\d.]+)", p.stdout)
    assert m, p.stdout + p.stderr
    print(f"systemd-analyze security: exposure {m.group(1)} (0 = most restricted, 10 = none)")
    assert float(m.group(1)) <= 3.0, p.stdout


def test_unit_is_a_notify_service_that_restarts_and_keeps_net_admin():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"]
    assert s["RestartPreventExitStatus"] == ["2"]  # overlayd's "invalid configuration"
    caps = s["CapabilityBoundingSet"][0].split()
    assert set(caps) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}
    assert "AF_NETLINK" in s["RestrictAddressFamilies"][0]
    assert s["RestrictNamespaces"] == ["net"]
    assert s["RuntimeDirectory"] == ["overlay"] and s["RuntimeDirectoryPreserve"] == ["yes"]
    assert s["StateDirectory"] == ["overlay"]
    assert s["EnvironmentFile"] == ["/etc/default/overlayd"]
    assert s["ExecStart"] == ["/opt/overlay/bin/overlayd $OVERLAYD_ARGS"]


def test_environment_file_flags_are_overlayds():
    env = env_file(ENV_FILE)
    args = parse_ok(overlayd_parser(), shlex.split(env["OVERLAYD_ARGS"]))
    assert args.iface and args.health_addr and args.metrics_addr
    assert set(env) <= {"OVERLAYD_ETCD_ENDPOINTS", "OVERLAYD_NODE_NAME", "OVERLAYD_ARGS"}
    # The variables overlayd reads itself (see its --help epilog).
    assert "OVERLAYD_ETCD_ENDPOINTS" in overlayd_parser().epilog


# --- Kubernetes -----------------------------------------------------------------


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) substitution in command/args, failing on undefined ones."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"$({m.group(1)}) is not defined in the container's env"
        return env[m.group(1)]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def container_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: f"<{e['name']}>" for e in c.get("env", [])}


def test_objects_and_namespace(objects):
    assert set(objects) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    ns = objects["Namespace"]["metadata"]["name"]
    assert objects["Namespace"]["metadata"]["labels"][
        "pod-security.kubernetes.io/enforce"] == "privileged"
    for kind in ("ServiceAccount", "ConfigMap", "DaemonSet"):
        assert objects[kind]["metadata"]["namespace"] == ns, kind
    assert objects["ServiceAccount"]["automountServiceAccountToken"] is False


def test_daemonset_pod_spec(objects):
    ds = objects["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    assert spec["priorityClassName"] == "system-node-critical"
    effects = {t["effect"] for t in spec["tolerations"] if t["operator"] == "Exists"}
    assert effects == {"NoSchedule", "NoExecute"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    host = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host == {"/run/overlay", "/var/lib/overlay", "/opt/cni/bin", "/etc/cni/net.d"}
    # The pod's netns arrives as a file descriptor: no /proc or /run/netns from the host.
    for c in spec["initContainers"] + spec["containers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']} mounts undefined volume {m['name']}"
    assert volumes["overlay-cfg"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]


def test_agent_args_are_overlayd_flags_and_probes_match(objects, monkeypatch):
    spec = objects["DaemonSet"]["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    assert agent["command"] == ["overlayd"]
    env = container_env(agent)
    # Given as the environment overlayd reads, not $(VAR) (not every runtime expands it).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = parse_ok(overlayd_parser(), [expand(a, env) for a in agent["args"]])
    assert not any("$(" in a for a in agent["args"])
    assert args.node_name == "<OVERLAYD_NODE_NAME>"  # the Kubernetes node name
    refs = {e["name"]: e["valueFrom"] for e in agent["env"]}
    assert refs["OVERLAYD_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert args.etcd_endpoints == "<OVERLAYD_ETCD_ENDPOINTS>" and args.log_format == "json"
    health_port = int(args.health_addr.rpartition(":")[2])
    metrics_port = int(args.metrics_addr.rpartition(":")[2])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        assert agent[probe]["httpGet"] == {"path": path, "port": health_port}, probe
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"health": health_port, "metrics": metrics_port}
    ann = objects["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) == metrics_port
    caps = agent["securityContext"]["capabilities"]["add"]
    assert set(caps) == {"NET_ADMIN", "SYS_ADMIN"}
    mounts = {m["mountPath"]: m["name"] for m in agent["volumeMounts"]}
    assert mounts.get(str(args.run_dir)) == "run" and mounts.get(str(args.state_dir)) == "state"
    # etcd TLS files come from the (optional) Secret's directory, if it has them.
    assert (args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile) == (None, None, None)
    assert mounts.get(args.etcd_tls_dir) == "etcd-tls"
    for e in agent["env"]:
        ref = e["valueFrom"].get("configMapKeyRef")
        if ref:
            assert ref["key"] in objects["ConfigMap"]["data"]


def test_init_containers_run_overlayctl_with_its_flags_and_the_configmap(objects, monkeypatch):
    spec = objects["DaemonSet"]["spec"]["template"]["spec"]
    data = objects["ConfigMap"]["data"]
    inits = {c["name"]: c for c in spec["initContainers"]}
    install = inits["install-cni"]
    args = parse_ok(overlayctl_parser(), install["command"][1:])
    assert install["command"][0] == "overlayctl" and args.cmd == "install-cni"
    # The static plugin needs no host Python: none of the obsolete flags that asked for one.
    assert not args.standalone and args.python is None, install["command"]
    mounts = {m["mountPath"]: m["name"] for m in install["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[str(args.bin_dir)]]["hostPath"]["path"] == "/opt/cni/bin"
    assert volumes[mounts[str(args.conf_dir)]]["hostPath"]["path"] == "/etc/cni/net.d"
    cfg_dir, key = str(args.conflist.parent), args.conflist.name
    assert mounts[cfg_dir] == "overlay-cfg" and key in data

    init = inits["network-init"]
    for name, value in container_env(init).items():
        monkeypatch.setenv(name, value)
    assert not any("$(" in a for a in init["command"])
    nargs = parse_ok(overlayctl_parser(), [expand(a, container_env(init))
                                           for a in init["command"][1:]])
    assert nargs.etcd_endpoints == "<OVERLAYD_ETCD_ENDPOINTS>"
    assert (nargs.cmd, nargs.net_cmd) == ("network", "init")
    assert nargs.config_file.name in data and not nargs.force
    # An edited ConfigMap must not keep restarted pods in Init: what etcd has is kept.
    assert nargs.keep_existing
    imounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert imounts.get(nargs.etcd_tls_dir) == "etcd-tls"
    assert (nargs.etcd_cafile, nargs.etcd_certfile, nargs.etcd_keyfile) == (None, None, None)


def test_etcd_tls_secret_is_optional(objects):
    volumes = {v["name"]: v for v in objects["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["etcd-tls"]["secret"]["optional"] is True


def test_one_image_name_everywhere(objects):
    """The manifest, `make image`, the Containerfile's and the READMEs' examples agree."""
    spec = objects["DaemonSet"]["spec"]["template"]["spec"]
    (image,) = {c["image"] for c in spec["initContainers"] + spec["containers"]}
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version and image.endswith(f":{version.group(1)}")
    make = re.search(r"^IMAGE\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert make and make.group(1).replace("$(VERSION)", version.group(1)) == image
    for doc in (DEPLOY / "README.md", ROOT / "README.md", CONTAINERFILE, MANIFEST):
        named = set(re.findall(r"\b[\w.-]+(?:/[\w.-]+)+:\d+\.\d+\.\d+\b", doc.read_text()))
        named = {n for n in named if n.rsplit(":", 1)[0].endswith("/overlay")}
        assert named <= {image}, (doc.name, named)


def test_configmap_network_config_and_conflist_are_valid(objects, tmp_path):
    data = objects["ConfigMap"]["data"]
    cfg = NetworkConfig.from_json(data["net-conf.json"])
    assert str(cfg.network) == "10.244.0.0/16" and cfg.subnet_len == 24 and cfg.vni == 1
    path = tmp_path / "cni-conf.json"
    path.write_text(data["cni-conf.json"])
    conf = read_conflist(path)
    sock = Path(conf["plugins"][0]["agentSocket"])
    agent = objects["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    args = parse_ok(overlayd_parser(), [expand(a, container_env(agent)) for a in agent["args"]])
    assert sock == args.run_dir / "cni.sock"  # where overlayd serves the plugin
    assert all(re.fullmatch(r"[a-z0-9.-]+", k) for k in data)


def test_containerfile_builds_what_the_manifest_runs(objects):
    text = CONTAINERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "${BASE}" for f in froms)
    base = re.search(r"^ARG BASE=(\S+)", text, re.M)  # what a registry build uses
    assert base and base.group(1) == "docker.io/library/debian:12-slim"
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), f"COPY {part}: not in the repository"
    path = re.search(r"^ENV PATH=(\S+)", text, re.M)
    assert path and path.group(1).split(":")[0] == "/opt/overlay/bin"
    assert "python3 -m venv /opt/overlay" in text and "pip install --no-cache-dir ." in text
    runtime = text.split("FROM ")[-1]
    for pkg in ("python3", "nftables", "tcpdump"):
        assert re.search(rf"\b{pkg}\b", runtime), f"runtime image lacks {pkg}"
    spec = objects["DaemonSet"]["spec"]["template"]["spec"]
    images = {c["image"] for c in spec["initContainers"] + spec["containers"]}
    assert len(images) == 1
    commands = {c["command"][0] for c in spec["initContainers"] + spec["containers"]}
    assert commands <= {"overlayd", "overlayctl"}  # console scripts of the venv on PATH


def test_deploy_readme_covers_both_ways(objects):
    text = (DEPLOY / "README.md").read_text()
    for needle in ("systemd-analyze verify", "/etc/default/overlayd", "overlayctl network init",
                   "overlayctl install-cni", "kubectl apply", "overlay-etcd-tls",
                   "Containerfile"):
        assert needle in text, needle


def test_the_state_dir_with_the_signing_key_survives_restarts(objects):
    """Membership is signed by default (issue 11): the key lives in the state dir, which
    both ways of running keep on the host, writable by the agent."""
    spec = objects["DaemonSet"]["spec"]["template"]["spec"]
    (agent,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    state = mounts["/var/lib/overlay"]
    assert not state.get("readOnly")
    vol = next(v for v in spec["volumes"] if v["name"] == state["name"])
    assert vol["hostPath"]["path"] == "/var/lib/overlay"
    assert not any(a.startswith("--state-dir") for a in agent["args"])
    unit = (DEPLOY / "systemd" / "overlayd.service").read_text()
    assert "StateDirectory=overlay" in unit and "StateDirectoryMode=0700" in unit
    assert "--state-dir" not in (DEPLOY / "systemd" / "overlayd.env").read_text()
