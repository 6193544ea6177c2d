"""`overlayctl install-cni`: what it writes, and that it writes it atomically."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from overlay.cni.install import InstallOptions, install, plugin_binary

OVERLAYCTL = str(Path(sys.executable).parent / "overlayctl")


def run_install(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OVERLAYCTL, "install-cni", "--bin-dir", str(tmp_path / "bin"),
                           "--conf-dir", str(tmp_path / "net.d"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_writes_the_static_plugin_and_a_conflist_with_portmap(tmp_path):
    p = run_install(tmp_path, "--agent-socket", "/run/x/cni.sock", "--cni-version", "0.4.0")
    assert p.returncode == 0, p.stderr
    binary, conf = tmp_path / "bin" / "overlay", tmp_path / "net.d" / "10-overlay.conflist"
    assert str(binary) in p.stdout and str(conf) in p.stdout
    assert stat.S_IMODE(binary.stat().st_mode) == 0o755
    assert binary.read_bytes() == plugin_binary().read_bytes()
    assert stat.S_IMODE(conf.stat().st_mode) == 0o644
    doc = json.loads(conf.read_text())
    assert doc["cniVersion"] == "0.4.0" and doc["name"] == "overlay"
    overlay, portmap = doc["plugins"]
    assert overlay == {"type": "overlay", "agentSocket": "/run/x/cni.sock", "hairpinMode": True}
    assert portmap["type"] == "portmap" and portmap["capabilities"] == {"portMappings": True}
    # Nothing but the two files: no temporary left behind.
    assert sorted(os.listdir(tmp_path / "bin")) == ["overlay"]
    assert sorted(os.listdir(tmp_path / "net.d")) == ["10-overlay.conflist"]


def test_options_no_portmap_and_ip_masq(tmp_path):
    p = run_install(tmp_path, "--no-portmap", "--ip-masq", "--network-name", "pods")
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "net.d" / "10-overlay.conflist").read_text())
    assert doc["name"] == "pods"
    assert [pl["type"] for pl in doc["plugins"]] == ["overlay"]
    assert doc["plugins"][0]["ipMasq"] is True


def test_the_installed_plugin_runs_without_the_agent(tmp_path):
    assert run_install(tmp_path, "--agent-socket", str(tmp_path / "none.sock")).returncode == 0
    binary = tmp_path / "bin" / "overlay"
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    p = subprocess.run([str(binary)], input=b'{"cniVersion": "0.3.1"}', env=env,
                       capture_output=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"cniVersion": "0.3.1", "supportedVersions": [
        "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    conf = json.dumps({"cniVersion": "1.0.0", "name": "overlay", "type": "overlay",
                       "agentSocket": str(tmp_path / "none.sock")}).encode()
    env = {**env, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/self/ns/net",
           "CNI_IFNAME": "eth0"}
    p = subprocess.run([str(binary)], input=conf, env=env, capture_output=True, timeout=30,
                       check=False)
    doc = json.loads(p.stdout)
    assert p.returncode != 0 and doc["code"] == 11 and "try again later" in doc["msg"]
    assert str(tmp_path / "none.sock") in doc["details"]


def test_reinstalling_replaces_files_by_rename(tmp_path):
    opts = InstallOptions(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d")
    binary, conf = install(opts)
    inodes = (binary.stat().st_ino, conf.stat().st_ino)
    with open(conf) as held:  # a runtime in the middle of reading the old file
        old = held.read()
        install(InstallOptions(bin_dir=opts.bin_dir, conf_dir=opts.conf_dir, portmap=False))
        held.seek(0)
        assert held.read() == old  # the old file was never rewritten in place
    assert (binary.stat().st_ino, conf.stat().st_ino) != inodes
    assert len(json.loads(conf.read_text())["plugins"]) == 1


def test_concurrent_readers_never_see_a_partial_conflist(tmp_path):
    opts = InstallOptions(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d",
                          agent_socket="/run/x/" + "s" * 20000)
    _, conf = install(opts)
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            text = conf.read_text()
            reads += 1
            try:
                json.loads(text)
            except ValueError:
                bad.append(text[:80])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            install(InstallOptions(bin_dir=opts.bin_dir, conf_dir=opts.conf_dir,
                                   agent_socket=opts.agent_socket, portmap=bool(i % 2)))
    finally:
        stop.set()
        t.join()
    assert reads > 0 and not bad
    assert sorted(os.listdir(tmp_path / "net.d")) == ["10-overlay.conflist"]


def test_a_build_without_the_plugin_is_a_clear_error(tmp_path, monkeypatch):
    import overlay.cni.install as inst
    from overlay.errors import PermanentError

    monkeypatch.setattr(inst, "plugin_binary", lambda: tmp_path / "missing" / "overlay")
    with pytest.raises(PermanentError, match="make native") as e:
        install(InstallOptions(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d"))
    assert e.type is PermanentError  # a broken installation, not a usage error: exit 1
    assert not (tmp_path / "bin" / "overlay").exists()
