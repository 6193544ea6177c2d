"""`overlayctl install-cni`: put the plugin and its conflist where runtimes look.

The plugin is the static executable built from native/ (shipped in this
package as overlay/cni/overlay-plugin): it needs no Python and no shared libc
on the host, so the same file serves a host with this package installed and
one without (the DaemonSet's init container copies it onto the host). Both
files are written to a temporary name and renamed, so a runtime never sees
half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import overlay
from overlay.cni.spec import NETWORK_NAME_RE
from overlay.errors import ConfigError, PermanentError

CONFLIST_NAME = "10-overlay.conflist"


@dataclass(frozen=True)
class InstallOptions:
    bin_dir: Path = Path("/opt/cni/bin")
    conf_dir: Path = Path("/etc/cni/net.d")
    agent_socket: str = "/run/overlay/cni.sock"
    network_name: str = "overlay"
    cni_version: str = "1.0.0"
    portmap: bool = True
    hairpin: bool = True
    ip_masq: bool = False
    conflist_file: Path | None = None


def plugin_binary() -> Path:
    """The static CNI plugin this package ships (built by setup.py from native/)."""
    return Path(overlay.__file__).resolve().parent / "cni" / "overlay-plugin"


def read_conflist(path: Path) -> dict[str, Any]:
    """A conflist given as a file (a ConfigMap), checked before it is installed."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError("--conflist", f"{path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError("--conflist", f"{path}: not valid JSON: {exc}") from None
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    if not isinstance(plugins, list) or not plugins or not isinstance(plugins[0], dict):
        raise ConfigError("--conflist", f"{path}: needs a non-empty \"plugins\" list")
    if plugins[0].get("type") != "overlay":
        raise ConfigError("--conflist", f"{path}: the first plugin must be of type "
                          f"\"overlay\", not {plugins[0].get('type')!r}")
    for key in ("name", "cniVersion"):
        if not isinstance(doc.get(key), str):
            raise ConfigError("--conflist", f"{path}: needs \"{key}\"")
    checked: dict[str, Any] = doc
    return checked


def conflist(opts: InstallOptions) -> dict[str, Any]:
    plugin: dict[str, Any] = {"type": "overlay", "agentSocket": opts.agent_socket}
    if opts.hairpin:
        plugin["hairpinMode"] = True
    if opts.ip_masq:
        plugin["ipMasq"] = True
    plugins = [plugin]
    if opts.portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True},
                        "snat": True})
    return {"cniVersion": opts.cni_version, "name": opts.network_name, "plugins": plugins}


def _atomic(path: Path, data: str | bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check(opts: InstallOptions) -> dict[str, Any]:
    """Everything `install` can refuse before it writes anything; the conflist to write."""
    if not NETWORK_NAME_RE.match(opts.network_name):
        raise ConfigError("--network-name", f"{opts.network_name!r}: a network name is a "
                          "letter or digit, then letters, digits, '.', '_' or '-'")
    if not os.path.isabs(opts.agent_socket):
        raise ConfigError("--agent-socket", f"{opts.agent_socket!r}: give an absolute path "
                          "(the plugin runs from the runtime's working directory)")
    return read_conflist(opts.conflist_file) if opts.conflist_file else conflist(opts)


def install(opts: InstallOptions) -> tuple[Path, Path]:
    doc = check(opts)
    src = plugin_binary()
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise PermanentError(f"the CNI plugin {src} is missing ({exc.strerror}): this "
                             "installation was built without it; build it with `make native` "
                             "and reinstall the package") from None
    binary = opts.bin_dir / "overlay"
    conf = opts.conf_dir / CONFLIST_NAME
    for path, what, flag in ((binary, data, "--bin-dir"),
                             (conf, json.dumps(doc, indent=2) + "\n", "--conf-dir")):
        try:
            _atomic(path, what, 0o755 if path == binary else 0o644)
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise PermanentError(f"cannot install {path} ({flag} {path.parent}): "
                                 f"{exc.filename or path}: {reason}") from None
    return binary, conf
