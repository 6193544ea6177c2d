"""`overlayctl install-cni`: put the plugin and its conflist where runtimes look.

The executable written to the bin dir is a small launcher that starts Python
with -I -S (no site, no user paths: ~2 ms less per pod start) and imports
only the stdlib-only client. Both files are written to a temporary name and
renamed, so a runtime never sees half a file.

`standalone` writes instead a zip application holding the client and the
few stdlib-only modules it may import (the offline DEL path), for a host
where this package is not installed: the DaemonSet's init container
installs it onto the host, where the host's own python3 runs it.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import overlay
from overlay.errors import ConfigError

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
    python: str = sys.executable
    conflist_file: Path | None = None
    standalone: bool = False

# What the client may import: itself, the offline answers and their helpers
# (all standard library only; checked by the tests).
STANDALONE_MODULES = ("__init__.py", "devnames.py", "cni/__init__.py", "cni/wire.py",
                      "cni/client.py", "cni/offline.py", "cni/spec.py", "cni/ipam.py")


def launcher_text(python: str) -> str:
    site = str(Path(overlay.__file__).resolve().parent.parent)
    return (
        f"#!{python} -IS\n"
        "# The overlay CNI plugin, installed by `overlayctl install-cni`.\n"
        "import sys\n"
        f"sys.path.insert(0, {site!r})\n"
        "from overlay.cni.client import exit_main\n"
        "exit_main()\n"
    )


def standalone_bytes(python: str) -> bytes:
    """A zip application: `#!<python> -IS`, then a zip of the client's modules."""
    pkg = Path(overlay.__file__).resolve().parent
    buf = io.BytesIO()
    buf.write(f"#!{python} -IS\n".encode())
    # Stored, not deflated: nothing to decompress on each pod start.
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for rel in STANDALONE_MODULES:
            z.write(pkg / rel, f"overlay/{rel}")
        z.writestr("__main__.py", "# The overlay CNI plugin, installed by `overlayctl "
                   "install-cni --standalone`.\n"
                   "from overlay.cni.client import exit_main\nexit_main()\n")
    return buf.getvalue()


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


def install(opts: InstallOptions) -> tuple[Path, Path]:
    doc = read_conflist(opts.conflist_file) if opts.conflist_file else conflist(opts)
    binary = opts.bin_dir / "overlay"
    if opts.standalone:
        _atomic(binary, standalone_bytes(opts.python), 0o755)
    else:
        _atomic(binary, launcher_text(opts.python), 0o755)
    conf = opts.conf_dir / CONFLIST_NAME
    _atomic(conf, json.dumps(doc, indent=2) + "\n", 0o644)
    return binary, conf
