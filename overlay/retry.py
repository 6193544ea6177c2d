"""Idioms of the shells' loops, written once.

`Once` says a thing only when it changed: a loop that fails every second for
an hour logs its reason once (and again only when the reason changes), not
3,600 times. `Backoff` spaces the attempts: from `first`, doubling up to
`maximum`, optionally spread by a random factor so that nodes restarted
together do not retry in step. `wait` sleeps until an event or a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class Once:
    """`changed(msg)` is True the first time and whenever `msg` differs from the last."""

    def __init__(self) -> None:
        self.last = ""

    def changed(self, msg: str) -> bool:
        if msg == self.last:
            return False
        self.last = msg
        return True

    def reset(self) -> None:
        """Forget the last message: the next one is said even if it is the same."""
        self.last = ""


class Backoff:
    def __init__(self, first: float, maximum: float, rng: random.Random | None = None) -> None:
        self.first = first
        self.maximum = maximum
        self.rng = rng  # with one, each wait is 0.5 to 1.5 times the nominal delay
        self.delay = first

    def next(self) -> float:
        """The wait before the next attempt; the one after it is twice as long (capped)."""
        wait = self.delay * (0.5 + self.rng.random()) if self.rng is not None else self.delay
        self.delay = min(self.delay * 2, self.maximum)
        return wait

    def reset(self) -> None:
        """After a success: the next failure waits `first` again."""
        self.delay = self.first


async def wait(event: asyncio.Event, timeout: float) -> bool:
    """Until `event` is set, at most `timeout` seconds; True if it is set.

    Not asyncio.wait_for: on Python 3.11 it returns normally when a cancellation
    arrives just as the event fires, and a loop around it then never stops.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
