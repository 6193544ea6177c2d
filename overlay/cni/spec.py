"""The CNI protocol, as pure functions: environment and config validation,
results shaped for the requested version, error documents.

Everything is validated here before any side effect; the agent's handler
only runs once `parse_request` has returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_address,
    ip_interface,
)
from typing import Any

from overlay.cni import wire
from overlay.cni.wire import DEFAULT_VERSION, SUPPORTED_VERSIONS

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")

# Well-known error codes (CNI spec, "Error" section).
E_INCOMPATIBLE_VERSION = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_PLUGIN_NOT_AVAILABLE = 50
E_LIMITED_CONNECTIVITY = 51
# Our own, from 100 on.
E_INTERNAL = wire.E_INTERNAL
E_IFNAME_EXISTS = 101
E_NO_ADDRESS = 102
E_NETLINK = 103
E_CHECK_FAILED = 110

NETWORK_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
IFNAMSIZ = 15
MAX_CONFIG_BYTES = 1 << 20


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def error_doc(version: str, err: CniError) -> bytes:
    doc: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        doc["details"] = err.details
    return (json.dumps(doc) + "\n").encode()


def version_of(stdin: bytes) -> str:
    """The cniVersion to answer errors in: the requested one if readable."""
    try:
        doc = json.loads(stdin)
        v = doc.get("cniVersion") if isinstance(doc, dict) else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        v = None
    return v if isinstance(v, str) and v in SUPPORTED_VERSIONS else DEFAULT_VERSION


def version_doc(requested: str) -> bytes:
    return (json.dumps({"cniVersion": requested, "supportedVersions": list(SUPPORTED_VERSIONS)})
            + "\n").encode()


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def check_ifname(name: str, var: str = "CNI_IFNAME") -> str:
    if not name:
        raise CniError(E_INVALID_ENV, f"{var} is empty")
    if len(name) > IFNAMSIZ:
        raise CniError(E_INVALID_ENV, f"{var} {name!r} is longer than {IFNAMSIZ} characters")
    if name in (".", ".."):
        raise CniError(E_INVALID_ENV, f"{var} {name!r} is not a valid interface name")
    if any(c in name for c in "/:") or any(c.isspace() for c in name) or not name.isprintable():
        raise CniError(E_INVALID_ENV, f"{var} {name!r} contains '/', ':', whitespace or "
                       "control characters")
    return name


@dataclass(frozen=True)
class Env:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: tuple[tuple[str, str], ...] = ()
    path: str = ""


def parse_env(raw: Mapping[str, str]) -> Env:
    command = raw.get("CNI_COMMAND", "")
    if not command:
        raise CniError(E_INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise CniError(E_INVALID_ENV, f"CNI_COMMAND {command!r} is not one of "
                       + ", ".join(COMMANDS))
    need = {
        "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
        "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
        "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    }.get(command, ())
    for var in need:
        if not raw.get(var):
            raise CniError(E_INVALID_ENV, f"{var} is required for {command} but not set")
    cid = raw.get("CNI_CONTAINERID", "")
    if cid and (len(cid) > 1024 or not cid.isprintable() or any(c.isspace() for c in cid)
                or "/" in cid):
        raise CniError(E_INVALID_ENV, "CNI_CONTAINERID must be printable, without whitespace "
                       "or '/', at most 1024 characters")
    ifname = raw.get("CNI_IFNAME", "")
    if ifname:
        check_ifname(ifname)
    args = []
    for item in raw.get("CNI_ARGS", "").split(";"):
        if not item:
            continue
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CniError(E_INVALID_ENV, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        args.append((k, v))
    return Env(command, cid, raw.get("CNI_NETNS", ""), ifname, tuple(args),
               raw.get("CNI_PATH", ""))


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.nameservers:
            out["nameservers"] = list(self.nameservers)
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out


@dataclass(frozen=True)
class NetConf:
    cni_version: str
    name: str
    type: str
    agent_socket: str = ""
    hairpin: bool = False
    ip_masq: bool = False
    mtu: int | None = None
    dns: Dns = Dns()
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # Set when a DEL goes ahead despite an invalid optional field: what was wrong.
    lenient: str = ""


def _bool(doc: Mapping[str, Any], key: str) -> bool:
    v = doc.get(key, False)
    if not isinstance(v, bool):
        raise CniError(E_INVALID_CONFIG, f"{key}: expected true or false, got {v!r}")
    return v


def _strlist(v: Any, key: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CniError(E_INVALID_CONFIG, f"{key}: expected a list of strings")
    return tuple(v)


def parse_conf(stdin: bytes, command: str) -> NetConf:
    if len(stdin) > MAX_CONFIG_BYTES:
        raise CniError(E_DECODE, f"network config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CniError(E_DECODE, "failed to decode the network config on stdin",
                       str(exc)[:200]) from None
    if not isinstance(doc, dict):
        raise CniError(E_DECODE, "the network config must be a JSON object")
    version = doc.get("cniVersion")
    if version is None:
        raise CniError(E_INVALID_CONFIG, "cniVersion: missing")
    if not isinstance(version, str):
        raise CniError(E_INVALID_CONFIG, f"cniVersion: expected a string, got {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(E_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports "
                       f"{', '.join(SUPPORTED_VERSIONS)}")
    if command == "CHECK" and _ver(version) < (0, 4, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later",
                       f"config is {version!r}")
    if command in ("GC", "STATUS") and _ver(version) < (1, 1, 0):
        raise CniError(E_INCOMPATIBLE_VERSION, f"{command} needs cniVersion 1.1.0",
                       f"config is {version!r}")
    try:
        return _parse_fields(doc, version, command)
    except CniError as err:
        if command != "DEL" or err.code != E_INVALID_CONFIG:
            raise
        # A conflist edited with a mistake after pods started must not make their DEL fail
        # for ever: DEL needs only the attachment and the agent, so it goes on without the
        # broken optional field (the handler logs `lenient`).
        sock = doc.get("agentSocket")
        return NetConf(cni_version=version, name=str(doc.get("name") or ""),
                       type=str(doc.get("type") or ""),
                       agent_socket=sock if isinstance(sock, str) else "", raw=doc,
                       lenient=f"{err.msg} {err.details}".strip())


def _parse_fields(doc: dict[str, Any], version: str, command: str) -> NetConf:
    name = doc.get("name")
    if not isinstance(name, str) or not NETWORK_NAME_RE.match(name):
        raise CniError(E_INVALID_CONFIG, f"name: {name!r} is not a valid network name "
                       "(letters, digits, '_', '.', '-'; starting with a letter or digit)")
    ptype = doc.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise CniError(E_INVALID_CONFIG, "type: missing")
    sock = doc.get("agentSocket", "")
    if not isinstance(sock, str):
        raise CniError(E_INVALID_CONFIG, f"agentSocket: expected a path, got {sock!r}")
    mtu = doc.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int)
                            or not 576 <= mtu <= 65535):
        raise CniError(E_INVALID_CONFIG, f"mtu: expected an integer in 576..65535, got {mtu!r}")
    ipam = doc.get("ipam")
    if ipam not in (None, {}):
        raise CniError(E_INVALID_CONFIG, "ipam: overlay allocates addresses from the node's "
                       "leased subnet itself; remove the ipam section")
    dns_doc = doc.get("dns")
    if dns_doc is None:
        dns_doc = {}
    if not isinstance(dns_doc, dict):
        raise CniError(E_INVALID_CONFIG, "dns: expected an object")
    domain = dns_doc.get("domain", "")
    if not isinstance(domain, str):
        raise CniError(E_INVALID_CONFIG, "dns.domain: expected a string")
    dns = Dns(_strlist(dns_doc.get("nameservers"), "dns.nameservers"), domain,
              _strlist(dns_doc.get("search"), "dns.search"),
              _strlist(dns_doc.get("options"), "dns.options"))
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(E_INVALID_CONFIG, "prevResult: expected an object")
    rc = doc.get("runtimeConfig") or {}
    if not isinstance(rc, dict):
        raise CniError(E_INVALID_CONFIG, "runtimeConfig: expected an object")
    valid = None
    if command == "GC":
        raw_valid = doc.get("cni.dev/valid-attachments", [])
        if not isinstance(raw_valid, list):
            raise CniError(E_INVALID_CONFIG, "cni.dev/valid-attachments: expected a list")
        pairs = []
        for item in raw_valid:
            if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                    or not isinstance(item.get("ifname"), str):
                raise CniError(E_INVALID_CONFIG, "cni.dev/valid-attachments: each item needs "
                               "string containerID and ifname")
            pairs.append((item["containerID"], item["ifname"]))
        valid = tuple(pairs)
    return NetConf(
        cni_version=version, name=name, type=ptype, agent_socket=sock,
        hairpin=_bool(doc, "hairpinMode"), ip_masq=_bool(doc, "ipMasq"), mtu=mtu, dns=dns,
        prev_result=prev, runtime_config=rc, valid_attachments=valid, raw=doc,
    )


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPv4Interface | IPv6Interface
    gateway: IPv4Address | IPv6Address | None = None
    interface: int | None = None


@dataclass(frozen=True)
class RouteR:
    dst: str
    gw: str | None = None


@dataclass(frozen=True)
class Result:
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[RouteR, ...] = ()
    dns: Dns = Dns()


def render(result: Result | dict[str, Any], version: str) -> bytes:
    doc = result if isinstance(result, dict) else result_doc(result, version)
    return (json.dumps(doc) + "\n").encode()


def result_doc(result: Result, version: str) -> dict[str, Any]:
    """The result in the shape of `version`: ips[].version only before 1.0.0."""
    legacy = _ver(version) < (1, 0, 0)
    doc: dict[str, Any] = {"cniVersion": version}
    doc["interfaces"] = [
        {k: v for k, v in (("name", i.name), ("mac", i.mac), ("sandbox", i.sandbox)) if v}
        for i in result.interfaces
    ]
    ips = []
    for ip in result.ips:
        d: dict[str, Any] = {}
        if legacy:
            d["version"] = str(ip.address.version)
        d["address"] = str(ip.address)
        if ip.gateway is not None:
            d["gateway"] = str(ip.gateway)
        if ip.interface is not None:
            d["interface"] = ip.interface
        ips.append(d)
    doc["ips"] = ips
    doc["routes"] = [{"dst": r.dst, **({"gw": r.gw} if r.gw else {})} for r in result.routes]
    doc["dns"] = result.dns.to_json()
    return doc


def _address(v: Any) -> IPv4Interface | IPv6Interface:
    if not isinstance(v, str):  # ip_interface(5) would be 0.0.0.5/32
        raise ValueError(f"{v!r} is not an address with a prefix length")
    return ip_interface(v)


def chain_result(prev: Mapping[str, Any], ours: Result, version: str) -> dict[str, Any]:
    """We are not first in the chain: the previous result, untouched, with ours appended.

    Fields we do not know (IPv6 addresses, 1.1.0 route attributes, a previous
    plugin's own keys) pass through; only `ips[].version` follows `version`.
    """
    for key in ("interfaces", "ips", "routes"):
        items = prev.get(key)
        if items is not None and (not isinstance(items, list)
                                  or not all(isinstance(i, dict) for i in items)):
            raise CniError(E_INVALID_CONFIG, f"prevResult.{key}: expected a list of objects")
    doc: dict[str, Any] = json.loads(json.dumps(dict(prev)))  # a deep copy of plain JSON
    mine = result_doc(ours, version)
    doc["cniVersion"] = version
    interfaces = doc.get("interfaces") or []
    off = len(interfaces)
    doc["interfaces"] = interfaces + mine["interfaces"]
    ips = []
    for ip in doc.get("ips") or []:
        ip.pop("version", None)
        if _ver(version) < (1, 0, 0):
            try:
                ip = {"version": str(_address(ip.get("address")).version), **ip}
            except (ValueError, TypeError):
                raise CniError(E_INVALID_CONFIG, f"prevResult.ips: {ip.get('address')!r} is not "
                               "an address with a prefix length") from None
        ips.append(ip)
    for ip in mine["ips"]:
        if "interface" in ip:
            ip["interface"] += off
        ips.append(ip)
    doc["ips"] = ips
    doc["routes"] = (doc.get("routes") or []) + mine["routes"]
    if mine["dns"]:
        doc["dns"] = mine["dns"]
    return doc


def parse_result(doc: Mapping[str, Any]) -> Result:
    """Read a prevResult of any supported version."""
    try:
        interfaces = tuple(
            Interface(str(i.get("name", "")), str(i.get("mac", "")), str(i.get("sandbox", "")))
            for i in doc.get("interfaces") or []
        )
        ips = []
        for ip in doc.get("ips") or []:
            addr = _address(ip["address"])
            gw = ip.get("gateway")
            idx = ip.get("interface")
            gateway = ip_address(gw) if gw else None
            if gateway is not None and gateway.version != addr.version:
                raise ValueError(f"gateway {gw} is not of the family of {addr}")
            ips.append(IPConfig(addr, gateway, idx if isinstance(idx, int) else None))
        routes = tuple(RouteR(str(r["dst"]), str(r["gw"]) if r.get("gw") else None)
                       for r in doc.get("routes") or [])
        d = doc.get("dns") or {}
        dns = Dns(tuple(d.get("nameservers") or ()), str(d.get("domain") or ""),
                  tuple(d.get("search") or ()), tuple(d.get("options") or ()))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CniError(E_INVALID_CONFIG, f"prevResult: not a valid CNI result ({exc})") from None
    return Result(interfaces, tuple(ips), routes, dns)
