"""cni/: the conflists and the documentation agree with install-cni, the DaemonSet's
ConfigMap and the code."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from overlay.cni import spec, wire
from overlay.cni.install import InstallOptions, install, read_conflist

ROOT = Path(__file__).resolve().parents[2]
CNI = ROOT / "cni"
README = (CNI / "README.md").read_text()
EXAMPLES = sorted((CNI / "examples").glob("*.conflist"))


def installed(tmp_path: Path, **opts: Any) -> bytes:
    _, conf = install(InstallOptions(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d",
                                     **opts))
    return conf.read_bytes()


def configmap_conflist() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "overlay.yaml").read_text())
    cm = next(d for d in docs if d and d.get("kind") == "ConfigMap")
    doc: dict[str, Any] = json.loads(cm["data"]["cni-conf.json"])
    return doc


def test_the_default_conflist_is_what_install_cni_writes(tmp_path):
    assert (CNI / "10-overlay.conflist").read_bytes() == installed(tmp_path)


def test_the_daemonset_installs_the_same_conflist():
    assert configmap_conflist() == json.loads((CNI / "10-overlay.conflist").read_text())


def test_the_ip_masq_example_is_what_install_cni_ip_masq_writes(tmp_path):
    assert (CNI / "examples" / "ip-masq.conflist").read_bytes() == installed(tmp_path,
                                                                             ip_masq=True)


def test_the_chained_example_puts_overlay_first_then_portmap_bandwidth_tuning():
    doc = read_conflist(CNI / "examples" / "chained.conflist")
    assert [p["type"] for p in doc["plugins"]] == ["overlay", "portmap", "bandwidth", "tuning"]
    default = json.loads((CNI / "10-overlay.conflist").read_text())
    assert doc["plugins"][:2] == default["plugins"]


@pytest.mark.parametrize("path", [CNI / "10-overlay.conflist", *EXAMPLES],
                         ids=lambda p: p.name)
def test_every_conflist_is_valid_for_the_plugin(path, tmp_path):
    doc = read_conflist(path)
    # What libcni hands the first plugin: its entry with the list's version and name.
    conf = {**doc["plugins"][0], "cniVersion": doc["cniVersion"], "name": doc["name"]}
    parsed = spec.parse_conf(json.dumps(conf).encode(), "ADD")
    assert parsed.agent_socket == wire.DEFAULT_SOCKET and parsed.hairpin


def keys_read_by_the_plugin() -> set[str]:
    """The config keys overlay.cni.spec reads from the plugin's config: doc.get("k") and
    _bool(doc, "k") in parse_conf and _parse_fields."""
    tree = ast.parse(Path(spec.__file__).read_text())
    parsers = [n for n in tree.body if isinstance(n, ast.FunctionDef)
               and n.name in ("parse_conf", "_parse_fields")]
    assert len(parsers) == 2
    keys = set()
    for node in (n for fn in parsers for n in ast.walk(fn)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name) \
                and f.value.id in ("doc", "dns_doc") and node.args:
            arg = node.args[0]
        elif isinstance(f, ast.Name) and f.id == "_bool" and len(node.args) == 2:
            arg = node.args[1]
        else:
            continue
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            keys.add(arg.value)
    return keys


def test_the_readme_documents_every_key_the_plugin_reads():
    keys = keys_read_by_the_plugin()
    assert {"agentSocket", "hairpinMode", "ipMasq", "mtu", "dns", "ipam"} <= keys
    missing = sorted(k for k in keys if f"`{k}`" not in README)
    assert not missing, f"cni/README.md does not document {missing}"


def test_the_readme_states_the_wire_format_the_code_speaks():
    magic = " ".join(f"{b:02x}" for b in wire.MAGIC)
    assert magic in README and "`OVLCNI1\\0`" in README
    assert str(wire.MAX_FIELD) in README
    for key in (*wire.ENV_KEYS, wire.NETNS_ERROR, "SCM_RIGHTS"):
        assert f"`{key}" in README, key
    # Where a DEL or GC waits for the agent, and where the replay rule is stated.
    assert f"`<dir of agentSocket>/{wire.PENDING_DIR}/" in README
    assert "### The records, and the replay rule" in README
    for version in wire.SUPPORTED_VERSIONS:
        assert f"`{version}`" in README, version


def test_cni_holds_data_and_documentation_only():
    kinds = {p.suffix for p in CNI.rglob("*") if p.is_file()}
    assert kinds <= {".conflist", ".md"}, kinds
