"""Compile the gRPC API in proto/ into overlay/v1, and the static CNI plugin in
native/ into overlay/cni/overlay-plugin, as part of every build.

The generated files are never committed or edited by hand; `pip install .`
(and `pip install -e .`) regenerate them: the modules from
proto/overlay/v1/*.proto, the plugin with `make -C native` (musl-gcc, or the
system compiler linking statically). The plugin ships as package data, from
where `overlayctl install-cni` copies it to the host's CNI bin dir.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on " + " ".join(protos))


def build_plugin() -> None:
    make = shutil.which("make")
    if make is None:
        raise SystemExit("building the CNI plugin needs make and a C compiler "
                         "(Debian: apt-get install make gcc musl-tools)")
    if subprocess.run([make, "-s", "-C", str(ROOT / "native")], check=False).returncode != 0:
        raise SystemExit("building the CNI plugin (make -C native) failed")
    dest = ROOT / "overlay" / "cni" / "overlay-plugin"
    tmp = dest.with_suffix(".tmp")
    shutil.copy2(ROOT / "native" / "build" / "overlay", tmp)
    tmp.replace(dest)


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        build_plugin()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
