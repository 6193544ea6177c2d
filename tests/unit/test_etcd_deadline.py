"""overlay.etcdstore._deadline_only: etcd3aio's request path with the gRPC deadline as
its only bound (no asyncio cancellation, see tests/integration/
test_etcd_native_memory.py); retries and error mapping stay etcd3aio's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from etcd3aio import EtcdConnectionError
from etcd3aio.base import BaseService

from overlay.etcdstore import _deadline_only


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")


class Call:
    """A stub method: answers from `script` in turn (an exception is raised), recording
    the deadline each attempt was given."""

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.deadlines: list[float | None] = []

    async def __call__(self, request: Any, *, metadata: Any, timeout: float | None) -> Any:
        self.deadlines.append(timeout)
        got = self.script.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got


def service(attempts: int = 3) -> Any:
    svc = BaseService(max_attempts=attempts)
    _deadline_only(svc)
    return svc


def run(svc: Any, call: Call, timeout: float | None = 5.0) -> Any:
    return asyncio.run(svc._rpc(call, "req", operation="KV.Range", timeout=timeout))


def test_an_answer_is_returned_with_the_whole_timeout_as_deadline() -> None:
    call = Call("answer")
    assert run(service(), call) == "answer"
    assert call.deadlines[0] is not None and 4.9 < call.deadlines[0] <= 5.0


def test_a_transient_error_is_retried_within_what_is_left() -> None:
    call = Call(rpc_error(grpc.StatusCode.UNAVAILABLE), "answer")
    assert run(service(), call) == "answer"
    first, second = call.deadlines
    assert first is not None and second is not None and second < first


def test_no_timeout_means_no_deadline() -> None:
    call = Call("answer")
    assert run(service(), call, timeout=None) == "answer"
    assert call.deadlines == [None]


def test_the_last_deadline_exceeded_is_a_timeout_error() -> None:
    call = Call(*[rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)] * 3)
    with pytest.raises(TimeoutError):
        run(service(), call)
    assert len(call.deadlines) == 3


def test_no_retry_when_the_time_left_is_shorter_than_the_backoff() -> None:
    call = Call(rpc_error(grpc.StatusCode.UNAVAILABLE), "never asked")
    t0 = time.monotonic()
    with pytest.raises(EtcdConnectionError):
        run(service(), call, timeout=0.01)  # the first backoff is 0.05 s
    assert len(call.deadlines) == 1 and time.monotonic() - t0 < 1


def test_a_permanent_error_is_not_retried() -> None:
    err = rpc_error(grpc.StatusCode.INVALID_ARGUMENT)
    call = Call(err, "never asked")
    with pytest.raises(grpc.aio.AioRpcError):
        run(service(), call)
    assert len(call.deadlines) == 1
