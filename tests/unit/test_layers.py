"""Layer contracts of the `overlay` package, checked on its source (every import counts:
top-level, function-local and TYPE_CHECKING ones alike).

Layers, bottom to top; a module may import its own layer and those below, never above:

  base      overlay, errors, devnames, retry, log, metrics, cli, cni.wire
            (standard library and prometheus-client only)
  core      model, subnets, dataplane.desired/devices/rtnl,
            membership.swim/effective/admission, cni.spec: records and decisions
  adapters  etcdstore, netns, linkget, dataplane.kernel/fake/reconciler,
            membership.wire/tls/service,
            cni.ipam/wiring/podlink/install, v1 (generated): one outside thing each
  agent     overlay.agent.*   the node agent (overlayd) and the client of its local API
  sandbox   overlay.sandbox.* a cluster of namespaces on one machine
  ctl       overlay.ctl.*     overlayctl

Besides: the pure core does no I/O (no asyncio, sockets, processes, files, nor any
third-party package, however indirectly); the CNI executable is no Python at all (the
static native/overlay-cni.c, shipped as overlay/cni/overlay-plugin: no console script,
no launcher), and cni.wire, the format it and the agent share, imports only the
standard library and nothing of ours; and there is no import cycle.
"""

from __future__ import annotations

import ast
import functools
import sys
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import overlay
from overlay.cni.install import plugin_binary

PKG = Path(overlay.__file__).resolve().parent

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("overlay", "overlay.errors", "overlay.devnames", "overlay.retry", "overlay.log",
              "overlay.metrics", "overlay.cli", "overlay.cni", "overlay.cni.wire")),
    ("core", ("overlay.model", "overlay.subnets", "overlay.dataplane",
              "overlay.dataplane.desired", "overlay.dataplane.devices", "overlay.dataplane.rtnl",
              "overlay.membership", "overlay.membership.swim", "overlay.membership.effective",
              "overlay.membership.admission", "overlay.cni.spec")),
    ("adapters", ("overlay.etcdstore", "overlay.netns", "overlay.linkget", "overlay.dataplane.*",
                  "overlay.membership.*", "overlay.cni.*", "overlay.v1", "overlay.v1.*")),
    ("agent", ("overlay.agent", "overlay.agent.*")),
    ("sandbox", ("overlay.sandbox", "overlay.sandbox.*")),
    ("ctl", ("overlay.ctl", "overlay.ctl.*")),
]

PURE = ("overlay.model", "overlay.subnets", "overlay.dataplane.desired",
        "overlay.dataplane.devices", "overlay.membership.swim", "overlay.membership.effective",
        "overlay.membership.admission", "overlay.cni.spec", "overlay.devnames", "overlay.errors",
        "overlay.sandbox.faults", "overlay.sandbox.chaos", "overlay.sandbox.invariants")
# Standard-library modules that do I/O (or wait for it): none of them in the pure core.
IO_MODULES = {"asyncio", "socket", "ssl", "select", "selectors", "subprocess", "os", "io",
              "threading", "concurrent", "multiprocessing", "signal", "shutil", "tempfile",
              "fcntl", "pathlib", "urllib", "http", "ctypes", "posix", "_socket"}
# What the C executable and the agent share, read by other clients of the agent too.
WIRE = "overlay.cni.wire"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(path: Path, known: Iterable[str]) -> set[str]:
    """Every module `path` imports, anywhere in it (`from a import b` is a.b if a.b is a
    module of ours)."""
    known = set(known)
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


@functools.cache
def graph() -> dict[str, set[str]]:
    src = sources()
    return {m: imports_of(p, src) for m, p in src.items()}


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """The first layer that names `module` exactly, else the first whose pattern matches."""
    for i, (_, names) in enumerate(layers):
        if module in names:
            return i
    for i, (_, names) in enumerate(layers):
        if any(n.endswith(".*") and module.startswith(n[:-1]) for n in names):
            return i
    return None


def upward(g: Mapping[str, set[str]], layers: list[tuple[str, tuple[str, ...]]] = LAYERS
           ) -> list[str]:
    bad = []
    for m, deps in sorted(g.items()):
        lm = layer_of(m, layers)
        for d in sorted(deps):
            ld = layer_of(d, layers) if d.split(".")[0] == "overlay" else None
            if lm is not None and ld is not None and ld > lm:
                bad.append(f"{m} ({layers[lm][0]}) imports {d} ({layers[ld][0]})")
    return bad


def cycles(g: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def closure(g: Mapping[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(g.get(m, ()))
    return seen


def top(name: str) -> str:
    return name.split(".")[0]


# --- the contracts ---------------------------------------------------------------------


def test_every_module_has_a_layer():
    missing = [m for m in sources() if layer_of(m) is None]
    assert not missing, f"add these to LAYERS in {__file__}: {missing}"


def test_nothing_imports_upward():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_does_no_io(module):
    g = graph()
    reach = closure(g, module)
    ours = sorted(m for m in reach if top(m) == "overlay" and m not in PURE
                  and m not in ("overlay", "overlay.cni", "overlay.cni.wire", "overlay.dataplane",
                                "overlay.membership", "overlay.sandbox"))
    foreign = sorted({top(m) for m in reach if top(m) != "overlay"} - {"__future__"})
    io = [m for m in foreign if m in IO_MODULES or m not in sys.stdlib_module_names]
    assert not ours, f"{module} reaches modules outside the pure core: {ours}"
    assert not io, f"{module} reaches I/O or third-party modules: {io}"


def test_the_wire_module_imports_only_the_standard_library():
    src = sources()
    deps = imports_of(src[WIRE], src)
    assert {m for m in deps if top(m) == "overlay"} == set(), deps
    assert {top(m) for m in deps} <= set(sys.stdlib_module_names), deps


def test_the_cni_executable_is_not_python():
    # The runtime runs the file install-cni copies: an ELF built from native/, never a
    # `#!python` launcher; and no `overlay` console script brings one back.
    assert plugin_binary().read_bytes()[:4] == b"\x7fELF"
    doc = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "overlay" not in doc["project"]["scripts"]


# --- the checker itself finds violations --------------------------------------------------


def test_the_checks_catch_an_upward_import_and_a_cycle():
    layers = [("low", ("overlay.a",)), ("high", ("overlay.b", "overlay.c"))]
    g = {"overlay.a": {"overlay.b"}, "overlay.b": {"overlay.c"}, "overlay.c": {"overlay.b"}}
    assert upward(g, layers) == ["overlay.a (low) imports overlay.b (high)"]
    assert cycles(g) == [["overlay.b", "overlay.c"]]
    assert cycles({"overlay.a": {"overlay.a"}}) == []  # a module importing itself is no cycle


def test_function_local_and_type_checking_imports_count(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import overlay.ctl\n"
                 "def f():\n    from overlay import agent\n")
    assert {"overlay.ctl", "overlay.agent"} <= imports_of(f, {"overlay.agent"})
