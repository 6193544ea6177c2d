"""A stop that hangs does not die unseen: after SIGTERM the agent arms a watchdog that,
past Agent.STOP_WATCHDOG, writes every thread's stack to stderr and exits (status 1)
before a supervisor's SIGKILL (podman's 10 s) would take the evidence with it."""

from __future__ import annotations

import subprocess
import sys
import time

from overlay.agent.agent import Agent

# The agent's signal handler on a stand-in whose stop() does nothing; then the main
# thread hangs, as a stop blocked in a closer or in interpreter teardown would.
HANG = """
import signal, time, types
from overlay.agent.agent import Agent
me = types.SimpleNamespace(STOP_WATCHDOG=1.0, stop=lambda why: None)
Agent._on_signal(me, signal.SIGTERM)
def stuck_in_a_closer():
    time.sleep(60)
stuck_in_a_closer()
"""


def test_a_hung_stop_exits_with_every_threads_stack() -> None:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HANG], capture_output=True, text=True,
                       timeout=50)
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert took < 30, took  # 1 s armed; the hang itself lasts 60 s
    assert "Timeout (0:00:01)!" in p.stderr
    assert "stuck_in_a_closer" in p.stderr, p.stderr
    assert Agent.STOP_WATCHDOG < 10  # podman's stop timeout; the kubelet gives 30 s

