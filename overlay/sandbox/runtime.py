"""A minimal container runtime's CNI side, as libcni does it.

Runs each plugin of a conflist as a subprocess with CNI_* env vars and the
plugin config on stdin, injecting `name`, `cniVersion`, `runtimeConfig`
(for the capabilities a plugin declares) and `prevResult`; DEL runs the chain
in reverse with the final ADD result. Used by the sandbox, the tests and the
benchmarks so that they drive plugins exactly the way a runtime does.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CniCallError(Exception):
    def __init__(self, plugin: str, command: str, rc: int, stdout: bytes, stderr: bytes) -> None:
        self.plugin, self.command, self.rc = plugin, command, rc
        self.stdout, self.stderr = stdout, stderr
        try:
            doc = json.loads(stdout)
            self.code = int(doc.get("code", -1))
            self.msg = str(doc.get("msg", ""))
            self.details = str(doc.get("details", ""))
        except (ValueError, AttributeError, TypeError):
            self.code, self.msg, self.details = -1, stdout.decode(errors="replace"), ""
        super().__init__(f"{plugin} {command} failed (exit {rc}, code {self.code}): {self.msg}"
                         + (f" ({self.details})" if self.details else "")
                         + (f"\nstderr: {stderr.decode(errors='replace').strip()}"
                            if stderr.strip() else ""))


@dataclass(frozen=True)
class Call:
    rc: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.stdout) if self.stdout.strip() else None


def find_plugin(ptype: str, cni_path: str) -> str:
    for d in cni_path.split(":"):
        p = Path(d) / ptype
        if d and p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise FileNotFoundError(f"CNI plugin {ptype!r} not found in {cni_path}")


def exec_plugin(
    path: str,
    command: str,
    conf: dict[str, Any] | bytes,
    *,
    container_id: str = "",
    netns: str = "",
    ifname: str = "",
    cni_args: str = "",
    cni_path: str = "",
    prefix: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Call:
    """Run one plugin once. `prefix` (e.g. ['ip', 'netns', 'exec', NS]) runs it elsewhere."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_COMMAND": command, "CNI_PATH": cni_path}
    if container_id:
        env["CNI_CONTAINERID"] = container_id
    if netns:
        env["CNI_NETNS"] = netns
    if ifname:
        env["CNI_IFNAME"] = ifname
    if cni_args:
        env["CNI_ARGS"] = cni_args
    if extra_env:
        env.update(extra_env)
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    t0 = time.perf_counter()
    p = subprocess.run([*prefix, path], input=data, env=env, capture_output=True,
                       timeout=timeout, check=False)
    return Call(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def plugin_conf(conflist: dict[str, Any], plugin: dict[str, Any],
                runtime_config: dict[str, Any] | None, prev: Any) -> dict[str, Any]:
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    caps = plugin.get("capabilities") or {}
    rc = {k: v for k, v in (runtime_config or {}).items() if caps.get(k)}
    if rc:
        conf["runtimeConfig"] = rc
    if prev is not None:
        conf["prevResult"] = prev
    return conf


class NetworkList:
    """One conflist, executed in a given network namespace context."""

    def __init__(self, conflist: dict[str, Any] | Path, cni_path: str,
                 prefix: Sequence[str] = ()) -> None:
        self.conf: dict[str, Any] = (json.loads(conflist.read_text())
                                     if isinstance(conflist, Path) else conflist)
        self.cni_path = cni_path
        self.prefix = tuple(prefix)

    def _run(self, command: str, plugin: dict[str, Any], container_id: str, netns: str,
             ifname: str, prev: Any, runtime_config: dict[str, Any] | None,
             cni_args: str) -> Any:
        path = find_plugin(plugin["type"], self.cni_path)
        conf = plugin_conf(self.conf, plugin, runtime_config, prev)
        call = exec_plugin(path, command, conf, container_id=container_id, netns=netns,
                           ifname=ifname, cni_args=cni_args, cni_path=self.cni_path,
                           prefix=self.prefix)
        if call.rc != 0:
            raise CniCallError(plugin["type"], command, call.rc, call.stdout, call.stderr)
        return call.json()

    def add(self, container_id: str, netns: str, ifname: str = "eth0",
            runtime_config: dict[str, Any] | None = None, cni_args: str = "") -> Any:
        prev = None
        for plugin in self.conf["plugins"]:
            prev = self._run("ADD", plugin, container_id, netns, ifname, prev, runtime_config,
                             cni_args)
        return prev

    def delete(self, container_id: str, netns: str, ifname: str = "eth0", result: Any = None,
               runtime_config: dict[str, Any] | None = None) -> None:
        errors = []
        for plugin in reversed(self.conf["plugins"]):
            try:
                self._run("DEL", plugin, container_id, netns, ifname, result, runtime_config, "")
            except CniCallError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def check(self, container_id: str, netns: str, ifname: str, result: Any,
              runtime_config: dict[str, Any] | None = None) -> None:
        for plugin in self.conf["plugins"]:
            self._run("CHECK", plugin, container_id, netns, ifname, result, runtime_config, "")
