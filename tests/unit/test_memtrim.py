"""The agent hands memory freed in gRPC's thread arenas back to the kernel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

from overlay.agent.memtrim import glibc_trim, trim_forever

# 64 MiB freed in a thread's arena, one block in 16 kept: glibc keeps it all in RSS
# (no free memory at the arena's top to give back by itself) until it is trimmed.
SCRIPT = textwrap.dedent("""
    import threading, time
    from overlay.agent.memtrim import glibc_trim
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    keep = []
    def work():
        blocks = [bytearray(16384) for _ in range(4096)]
        keep.extend(blocks[::16])
    t = threading.Thread(target=work)
    t.start()
    t.join()
    before = rss()
    glibc_trim()()
    print(before, rss())
""")


def test_freed_memory_leaves_the_rss_when_trimmed() -> None:
    assert glibc_trim() is not None, "no malloc_trim: these tests need glibc (Debian)"
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    before, after = (int(x) for x in out.split())
    assert before - after > 32 << 20, f"RSS {before >> 20} MiB before the trim, {after >> 20} after"


def test_trims_periodically_and_without_glibc_does_nothing() -> None:
    calls: list[float] = []

    async def run() -> None:
        task = asyncio.create_task(trim_forever(lambda: calls.append(0.0), every=0.01))
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        await asyncio.wait_for(trim_forever(None), 1)  # returns at once

    asyncio.run(run())
    assert len(calls) >= 3
