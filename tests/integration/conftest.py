"""Fixtures for the integration tier: real etcd, real overlayd, real kernel.

Every sandbox gets a name unique to this test run (so namespaces are
`ovs-t<run><n>-...`) and is removed in a finalizer even when the test fails.
Without root or a needed tool the tests fail loudly, naming what is missing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from overlay.sandbox.sandbox import Sandbox, SandboxError

RUN_ID = secrets.token_hex(3)
_counter = itertools.count(1)


def require_environment() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root: they create network namespaces, veths, "
                    "VXLAN devices and run etcd (run `make test` as root)", pytrace=False)
    missing = [t for t in ("ip", "bridge", "etcd", "etcdctl", "ping", "nft")
               if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (run `make deps`)", pytrace=False)


def new_name() -> str:
    return f"t{RUN_ID}{next(_counter)}"


@contextlib.contextmanager
def sandbox_up(nodes: int = 3, pods_per_node: int = 2, **up: object) -> Iterator[Sandbox]:
    """A running sandbox, removed on the way out even when `up` fails. A SandboxError in
    `up`, or in more setup inside the block, fails the test with the step and its log.
    For a module-scoped fixture: `with sandbox_up(2, 1) as sb: yield sb`."""
    require_environment()
    sb = Sandbox(new_name())
    try:
        sb.up(nodes, pods_per_node, **up)  # type: ignore[arg-type]
        yield sb
    except SandboxError as exc:
        pytest.fail(f"sandbox up failed at {exc.step}: {exc.message}\n{exc.log}", pytrace=False)
    finally:
        sb.down()


@pytest.fixture
def make_sandbox(request: pytest.FixtureRequest) -> Iterator[Callable[..., Sandbox]]:
    """make_sandbox(nodes, pods_per_node, **up_kwargs) -> a running sandbox."""
    made: list[Sandbox] = []
    with contextlib.ExitStack() as stack:

        def make(nodes: int = 3, pods_per_node: int = 2, **kw: object) -> Sandbox:
            made.append(stack.enter_context(sandbox_up(nodes, pods_per_node, **kw)))
            return made[-1]

        yield make
        if getattr(request.node, "rep_call_failed", False):
            for sb in made:
                dump_logs(sb)


@pytest.fixture(scope="module")
def cluster3() -> Iterator[Sandbox]:
    """One 3-node x 2-pod sandbox shared by the tests of a module (they restore it)."""
    with sandbox_up(3, 2) as sb:
        yield sb


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        item.rep_call_failed = True  # type: ignore[attr-defined]


def dump_logs(sb: Sandbox, lines: int = 30) -> None:
    if sb.state is None:
        return
    for h in sb.st.nodes:
        try:
            text = Path(h.log).read_text().splitlines()[-lines:]
        except OSError:
            continue
        print(f"---- {h.name} log (last {lines} lines) ----")
        print("\n".join(text))


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `cond()` held; raises AssertionError after `timeout`."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
