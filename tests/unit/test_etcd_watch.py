"""overlay.etcdstore's watch streams, against a scripted stub: a stream that breaks
after etcd accepted it resumes from the revision after the last event, without the
caller seeing anything; one etcd never accepted fails at once; resuming gives up
after --etcd-timeout; a lost history is WatchLost; no stream is ever left open.
(The same against a real 3-member etcd: tests/integration/test_etcd_watch_restart.py.)
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from etcd3aio import _protobuf

from overlay.errors import TemporaryError
from overlay.etcdstore import EtcdOptions, EtcdStore, WatchLost

rpc_pb2: Any = _protobuf.rpc_pb2  # etcd3aio's generated modules: its own import path
kv_pb2: Any = _protobuf.kv_pb2

BROKEN = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                              grpc.aio.Metadata(), "Socket closed")


def created() -> Any:
    return rpc_pb2.WatchResponse(created=True)


def events(*revisions: int) -> Any:
    return rpc_pb2.WatchResponse(events=[
        kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"/overlay/network/config", mod_revision=r))
        for r in revisions])


class Stream:
    def __init__(self, script: list[object]) -> None:
        self.script = script
        self.start: int | None = None
        self.cancelled = False

    async def write(self, req: Any) -> None:
        self.start = req.create_request.start_revision

    async def read(self) -> object:
        await asyncio.sleep(0)
        if not self.script:
            await asyncio.Event().wait()  # an idle stream
        got = self.script.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    """Watch() opens the next scripted stream; without one left, every stream is refused."""

    def __init__(self, *scripts: list[object]) -> None:
        self.scripts = list(scripts)
        self.streams: list[Stream] = []

    def Watch(self, metadata: Any = None) -> Stream:  # the gRPC method's name
        self.streams.append(Stream(self.scripts.pop(0) if self.scripts else [BROKEN]))
        return self.streams[-1]


def store(stub: Stub, timeout: float = 0.3) -> EtcdStore:
    st = EtcdStore(EtcdOptions(timeout=timeout))
    st._connected = True
    st._client = SimpleNamespace(watch=SimpleNamespace(_stub=stub, _metadata=()))
    st.WATCH_BACKOFF = st.WATCH_BACKOFF_MAX = 0.01
    return st


async def collect(st: EtcdStore, n: int) -> list[int]:
    """Revisions of the first `n` config changes the watch yields."""
    got: list[int] = []
    async for rev in st.watch_config(5):
        got.append(rev)
        if len(got) == n:
            break
    return got


def test_a_broken_stream_resumes_after_the_last_event_unseen_by_the_caller(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", "overlay.etcdstore")
    stub = Stub([created(), events(6), events(7, 8), BROKEN],
                [BROKEN],  # the first try to resume lands on a member going down
                [created(), events(9)])
    assert asyncio.run(collect(store(stub), 3)) == [6, 8, 9]
    assert [s.start for s in stub.streams] == [5, 9, 9]
    assert all(s.cancelled for s in stub.streams)
    assert [r.getMessage() for r in caplog.records] == [
        "etcd watch of /overlay/network/config broke (UNAVAILABLE: Socket closed); "
        "resuming from revision 9"]


def test_a_watch_etcd_never_accepted_fails_at_once() -> None:
    stub = Stub([BROKEN], [created(), events(6)])
    with pytest.raises(TemporaryError, match="etcd watch failed") as exc:
        asyncio.run(collect(store(stub), 1))
    assert not isinstance(exc.value, WatchLost)
    assert len(stub.streams) == 1 and stub.streams[0].cancelled


def test_resuming_gives_up_after_the_etcd_timeout() -> None:
    stub = Stub([created(), events(6), BROKEN])  # then every stream is refused

    async def run() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TemporaryError, match="etcd watch failed"):
            await collect(store(stub, timeout=0.3), 2)
        return loop.time() - t0

    took = asyncio.run(run())
    assert 0.3 <= took < 3, took
    assert len(stub.streams) > 3 and all(s.cancelled for s in stub.streams)
    assert {s.start for s in stub.streams[1:]} == {7}


@pytest.mark.parametrize("resp, says", [
    (rpc_pb2.WatchResponse(compact_revision=40), "history compacted up to 40"),
    (rpc_pb2.WatchResponse(canceled=True, cancel_reason="bad"), "watch cancelled: bad"),
])
def test_a_lost_history_or_a_cancel_is_watch_lost(resp: object, says: str) -> None:
    stub = Stub([created(), events(6), resp])
    with pytest.raises(WatchLost, match=says):
        asyncio.run(collect(store(stub), 2))
    assert len(stub.streams) == 1 and stub.streams[0].cancelled


def test_a_stream_the_server_ends_is_resumed_too() -> None:
    stub = Stub([created(), events(6), grpc.aio.EOF], [created(), events(7)])
    assert asyncio.run(collect(store(stub), 2)) == [6, 7]
    assert [s.start for s in stub.streams] == [5, 7]


def test_closing_the_watch_cancels_its_stream() -> None:
    stub = Stub([created(), events(6)])

    async def run() -> None:
        task = asyncio.create_task(collect(store(stub), 2))
        while not stub.streams or stub.streams[0].script:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert stub.streams[0].cancelled
