"""The loop idioms: say once, back off, wait without losing a cancellation."""

from __future__ import annotations

import asyncio
import random

from overlay.retry import Backoff, Once, wait


def test_once_says_a_message_again_only_after_a_change_or_reset():
    said = Once()
    assert [said.changed(m) for m in ("a", "a", "b", "b", "a")] == [True, False, True, False,
                                                                    True]
    said.reset()
    assert said.changed("a")


def test_backoff_doubles_up_to_the_maximum_and_resets():
    b = Backoff(0.2, 1.0)
    assert [b.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    b.reset()
    assert b.next() == 0.2


def test_backoff_with_jitter_stays_within_half_to_one_and_a_half():
    b = Backoff(1.0, 1.0, random.Random(7))
    waits = [b.next() for _ in range(200)]
    assert all(0.5 <= w <= 1.5 for w in waits) and max(waits) - min(waits) > 0.5


def test_wait_returns_on_the_event_or_the_timeout():
    async def go() -> tuple[bool, bool]:
        ev = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, ev.set)
        return await wait(ev, 5), await wait(asyncio.Event(), 0.01)

    assert asyncio.run(go()) == (True, False)


def test_a_cancellation_that_comes_as_the_event_fires_stops_the_loop():
    async def go() -> None:
        ev = asyncio.Event()

        async def loop_forever() -> None:
            while True:
                await wait(ev, 60)
                ev.clear()

        task = asyncio.create_task(loop_forever())
        await asyncio.sleep(0.01)
        ev.set()
        task.cancel()  # in the same step as the event: asyncio.wait_for would lose it
        await asyncio.wait_for(task, 5)

    try:
        asyncio.run(go())
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the loop did not stop")
