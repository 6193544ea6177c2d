"""What the e2e scripts share: podman with this checkout's storage, run inside a
sandbox node's network namespace, and a list of checks printed as they pass.

Environment (the Makefile sets it): PODMAN (the podman command with its
storage flags), IMAGE (what `make image` built), CONTAINERS_CONF.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("IMAGE", "localhost/overlay:0.1.0")
PODMAN = shlex.split(os.environ.get("PODMAN", "podman"))
BASE_CONF = Path(os.environ.get("CONTAINERS_CONF", ROOT / "deploy/image/containers.conf"))
RUN_ID = secrets.token_hex(2)


class CheckFailed(Exception):
    pass


class Checks:
    """Prints each check as it passes; the first failure ends the script (exit 1)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.t0 = time.monotonic()
        self.passed: list[str] = []
        print(f"== {title} (run {RUN_ID})", flush=True)

    def ok(self, what: str) -> None:
        self.passed.append(what)
        print(f"  ok   {time.monotonic() - self.t0:6.1f}s  {what}", flush=True)

    def check(self, cond: bool, what: str, detail: object = "") -> None:
        if not cond:
            raise CheckFailed(f"{what}: {detail}" if detail != "" else what)
        self.ok(what)

    def wait(self, cond: Callable[[], object], what: str, timeout: float,
             interval: float = 0.5) -> float:
        t0 = time.monotonic()
        last: object = None
        while time.monotonic() - t0 < timeout:
            last = cond()
            if last is True or (last and not isinstance(last, str)):
                took = time.monotonic() - t0
                self.ok(f"{what} (after {took:.1f}s)")
                return took
            time.sleep(interval)
        raise CheckFailed(f"{what}: not within {timeout:.0f}s (last: {last})")

    def summary(self, failure: BaseException | None) -> int:
        took = time.monotonic() - self.t0
        if failure is None:
            print(f"== {self.title}: {len(self.passed)} checks passed in {took:.0f}s", flush=True)
            return 0
        print(f"  FAIL {took:6.1f}s  {failure}", flush=True)
        print(f"== {self.title}: FAILED after {len(self.passed)} checks, {took:.0f}s",
              flush=True)
        return 1


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 300,
        env: dict[str, str] | None = None, input: bytes | None = None
        ) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(cmd), capture_output=True, timeout=timeout, input=input,
                       env={**os.environ, **(env or {})})
    out = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(errors="replace"),
                                      p.stderr.decode(errors="replace"))
    if check and p.returncode != 0:
        raise CheckFailed(f"`{shlex.join(map(str, cmd))}` exited {p.returncode}: "
                          f"{(out.stderr or out.stdout).strip()[-1500:]}")
    return out


def node_conf(path: Path, plugin_dirs: Sequence[Path | str], config_dir: Path) -> Path:
    """containers.conf for one node: the project's settings, with this node's CNI
    plugin and config directories (the hostPath volumes of the DaemonSet)."""
    text = BASE_CONF.read_text()
    dirs = ", ".join(f'"{d}"' for d in plugin_dirs)
    text = text.replace("[network]\n", f"[network]\ncni_plugin_dirs = [{dirs}]\n"
                        f'network_config_dir = "{config_dir}"\n', 1)
    path.write_text(text)
    return path


class Podman:
    """podman for one sandbox node: in its network namespace, with its CNI dirs."""

    def __init__(self, netns: str | None, conf: Path = BASE_CONF) -> None:
        self.netns = netns
        self.conf = conf

    def cmd(self, *args: str) -> list[str]:
        pre = ["nsenter", f"--net=/run/netns/{self.netns}"] if self.netns else []
        return [*pre, *PODMAN, *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300
                 ) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(*args), check=check, timeout=timeout,
                   env={"CONTAINERS_CONF": str(self.conf)})

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.cmd(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "CONTAINERS_CONF": str(self.conf)})


def main(body: Callable[[Checks], None], title: str, cleanup: Callable[[], None]) -> None:
    if os.geteuid() != 0:
        print(f"{title}: needs root (network namespaces, podman)", file=sys.stderr)
        sys.exit(2)
    checks = Checks(title)
    failure: BaseException | None = None
    try:
        body(checks)
    except (CheckFailed, Exception, KeyboardInterrupt) as exc:
        failure = exc
    finally:
        try:
            cleanup()
        except Exception as exc:  # a cleanup that fails is a failure of the run
            print(f"  cleanup failed: {exc}", flush=True)
            failure = failure or exc
    sys.exit(checks.summary(failure))
