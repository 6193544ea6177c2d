"""Hand memory that glibc's malloc keeps after it was freed back to the kernel.

gRPC core allocates from its own threads, and glibc gives each such thread an arena
of its own; memory freed there stays in the arena, counted in the agent's RSS, until
something asks for it back. Under churn (peers and etcd members coming and going)
that retained free memory was most of the agent's RSS growth in the soak: about
1 MiB per 18 minutes of chaos in the thread arenas, while the bytes in use grew far
less. `malloc_trim(0)` returns every whole free page of every arena; called once a
minute it costs well under a millisecond. Other C libraries (musl) have no such
call and keep nothing comparable: there the task does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

EVERY = 60.0


def glibc_trim() -> Callable[[], object] | None:
    """A function returning glibc's free memory to the kernel, or None without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_forever(trim: Callable[[], object] | None, every: float = EVERY) -> None:
    """Call `trim` every `every` seconds, for good; return at once if there is none."""
    if trim is None:
        log.debug("no malloc_trim in this C library: freed memory is not trimmed")
        return
    while True:
        await asyncio.sleep(every)
        trim()
