"""get_link: the first reply, and what waits in the catch-all queue dropped."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from overlay.linkget import drop_strays, get_link


class FakeIPR:
    """pyroute2's shape: `local.msg_queue.queues[0]` and `link("get")` giving a list (a
    single request) or an async generator; every call parks an ACK like pyroute2 does."""

    def __init__(self, replies: list[Any], as_generator: bool = False) -> None:
        self.local = SimpleNamespace(msg_queue=SimpleNamespace(queues={0: asyncio.Queue()}))
        self.replies, self.as_generator = replies, as_generator

    @property
    def root(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = self.local.msg_queue.queues[0]
        return q

    async def link(self, command: str, **match: Any) -> Any:
        assert command == "get"
        self.root.put_nowait(b"ack")
        if not self.as_generator:
            return list(self.replies)

        async def gen() -> Any:
            for r in self.replies:
                yield r
        return gen()


def test_get_link_returns_the_first_reply_and_keeps_at_most_one_ack_parked():
    async def run() -> None:
        ipr = FakeIPR([{"index": 3}, {"index": 4}])
        for _ in range(50):
            assert await get_link(ipr, ifname="br0") == {"index": 3}
        assert ipr.root.qsize() == 1  # this call's ACK: the next call drops it
        assert drop_strays(ipr) == 1 and ipr.root.empty()
        assert await get_link(FakeIPR([]), index=9) is None
        gen = FakeIPR([{"index": 5}], as_generator=True)
        assert await get_link(gen, ifname="x") == {"index": 5}
        assert await get_link(FakeIPR([], as_generator=True), ifname="x") is None

    asyncio.run(run())


def test_drop_strays_leaves_sockets_without_a_queue_alone():
    assert drop_strays(SimpleNamespace()) == 0       # no request made yet: no queue
    assert drop_strays(SimpleNamespace(local=SimpleNamespace())) == 0


def test_no_such_link_is_none_and_other_errors_pass_through():
    class NetlinkError(Exception):
        def __init__(self, code: int) -> None:
            super().__init__(code)
            self.code = code

    class Failing(FakeIPR):
        def __init__(self, code: int) -> None:
            super().__init__([])
            self.code = code

        async def link(self, command: str, **match: Any) -> Any:
            raise NetlinkError(self.code)

    async def run() -> None:
        assert await get_link(Failing(19), ifname="gone0") is None  # ENODEV
        try:
            await get_link(Failing(1), ifname="x")                   # EPERM
        except NetlinkError as exc:
            assert exc.code == 1
        else:
            raise AssertionError("EPERM swallowed")

    asyncio.run(run())
