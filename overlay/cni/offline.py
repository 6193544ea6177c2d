"""CNI answers that do not need the agent (or must work without it).

VERSION never asks the agent. When the agent is unreachable: DEL still
releases the address and removes the host veth (runtimes rely on DEL always
succeeding), GC still releases stale allocations, STATUS says 50, and ADD
and CHECK say 11, "try again later", with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from overlay.cni import spec
from overlay.cni.ipam import Ipam
from overlay.cni.wire import DEFAULT_SOCKET, DEFAULT_VERSION
from overlay.devnames import host_veth_name


def ipam_dir_for(socket_path: str) -> Path:
    return Path(socket_path).parent / "ipam"


def _delete_link(name: str) -> None:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if os.path.exists(ip):
        subprocess.run([ip, "link", "del", name], capture_output=True, check=False, timeout=10)


def _forget_masq(socket_path: str, ip: str) -> None:
    # The agent rebuilds its masquerade set from these markers when it starts
    # (overlay.agent.masq): a released address must not stay masqueraded.
    with contextlib.suppress(OSError):
        (Path(socket_path).parent / "masq" / ip).unlink()


def run(env: dict[str, str], stdin: bytes, out: BinaryIO, reason: str) -> int:
    try:
        code, body = answer(env, stdin, reason)
    except Exception as exc:  # never a traceback on stdout
        code, body = spec.E_INTERNAL, spec.error_doc(
            spec.version_of(stdin), spec.CniError(spec.E_INTERNAL, f"internal error: {exc}"))
    out.write(body)
    out.flush()
    if code:
        print(body.decode(errors="replace").strip(), file=sys.stderr)
    return code


def answer(env: dict[str, str], stdin: bytes, reason: str) -> tuple[int, bytes]:
    version = spec.version_of(stdin)
    try:
        e = spec.parse_env(env)
        if e.command == "VERSION":
            try:
                conf_version = _requested_version(stdin)
            except spec.CniError:
                conf_version = DEFAULT_VERSION
            return 0, spec.version_doc(conf_version)
        conf = spec.parse_conf(stdin, e.command)
        sock = conf.agent_socket or DEFAULT_SOCKET
        if e.command == "DEL":
            # The veth first: the address must not be handed out while a pod still has it.
            _delete_link(host_veth_name(e.container_id, e.ifname))
            ipam = Ipam(ipam_dir_for(sock))
            a = ipam.release(e.container_id, e.ifname)
            if a is not None:
                _forget_masq(sock, str(a.ip))
            return 0, b""
        if e.command == "GC":
            ipam = Ipam(ipam_dir_for(sock))
            for a in ipam.gc(conf.valid_attachments or ()):
                _delete_link(host_veth_name(a.container_id, a.ifname))
                _forget_masq(sock, str(a.ip))
            return 0, b""
        if e.command == "STATUS":
            raise spec.CniError(spec.E_PLUGIN_NOT_AVAILABLE,
                                "the overlay node agent is not available", reason)
        raise spec.CniError(spec.E_TRY_AGAIN,
                            "the overlay node agent is not running yet; try again later",
                            reason)
    except spec.CniError as err:
        return err.code, spec.error_doc(version, err)


def _requested_version(stdin: bytes) -> str:
    try:
        doc = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise spec.CniError(spec.E_DECODE, "failed to decode the network config") from None
    v = doc.get("cniVersion", DEFAULT_VERSION) if isinstance(doc, dict) else DEFAULT_VERSION
    return v if isinstance(v, str) else DEFAULT_VERSION
