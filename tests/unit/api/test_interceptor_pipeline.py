"""The shared wrapper shapes and the Pipeline (usersvc.api.interceptors):
folding the interceptors once per method behaves like grpc's chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from usersvc.api.interceptors import Pipeline, WrappingInterceptor
from usersvc.api.interceptors.wrapping import Handler, wrap_handler, wrap_with_prelude


class Refused(Exception):
    pass


async def echo(request: Any, context: Any) -> Any:
    return ("handled", request)


async def echo_stream(request: Any, context: Any) -> AsyncIterator[Any]:
    yield ("first", request)
    yield ("second", request)


async def test_an_async_prelude_runs_before_the_handler() -> None:
    seen: list[str] = []

    async def prelude(context: Any) -> None:
        seen.append("prelude")

    wrapped = wrap_with_prelude(grpc.unary_unary_rpc_method_handler(echo), prelude)
    assert await wrapped.unary_unary("req", None) == ("handled", "req")
    assert seen == ["prelude"]


async def test_a_sync_prelude_that_raises_ends_the_call_before_the_handler() -> None:
    called: list[str] = []

    async def handler(request: Any, context: Any) -> Any:
        called.append("handler")

    def prelude(context: Any) -> None:
        raise Refused

    wrapped = wrap_with_prelude(grpc.unary_unary_rpc_method_handler(handler), prelude)
    with pytest.raises(Refused):
        await wrapped.unary_unary("req", None)
    assert called == []


async def test_a_prelude_runs_once_before_a_response_stream() -> None:
    seen: list[str] = []

    async def prelude(context: Any) -> None:
        seen.append("prelude")

    wrapped = wrap_with_prelude(grpc.unary_stream_rpc_method_handler(echo_stream), prelude)
    responses = [response async for response in wrapped.unary_stream("req", None)]
    assert responses == [("first", "req"), ("second", "req")]
    assert seen == ["prelude"]


class Tagging(WrappingInterceptor):
    """Records the order in which its wrapper runs and which methods it was
    told are unknown."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name = name
        self.log = log
        self.wraps = 0

    def wrap(self, handler: Handler, method: str) -> Handler:
        self.wraps += 1

        def unary(inner: Any) -> Any:
            async def behaviour(request: Any, context: Any) -> Any:
                self.log.append(f"{self.name} in")
                response = await inner(request, context)
                self.log.append(f"{self.name} out")
                return response

            return behaviour

        return wrap_handler(handler, unary=unary, stream=lambda inner: inner)

    def unknown_method(self, method: str) -> None:
        self.log.append(f"{self.name} unknown {method}")


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_the_pipeline_runs_the_interceptors_outermost_first() -> None:
    log: list[str] = []
    pipeline = Pipeline([Tagging("outer", log), Tagging("inner", log)])
    handler = grpc.unary_unary_rpc_method_handler(echo)

    async def continuation(details: Any) -> Handler:
        return handler

    wrapped = await pipeline.intercept_service(continuation, Details("/s/M"))
    assert wrapped is not None
    assert await wrapped.unary_unary("req", None) == ("handled", "req")
    assert log == ["outer in", "inner in", "inner out", "outer out"]


async def test_the_pipeline_folds_each_method_once_while_its_handler_stays_the_same() -> None:
    log: list[str] = []
    outer, inner = Tagging("outer", log), Tagging("inner", log)
    pipeline = Pipeline([outer, inner])
    handler = grpc.unary_unary_rpc_method_handler(echo)

    async def continuation(details: Any) -> Handler:
        return handler

    first = await pipeline.intercept_service(continuation, Details("/s/M"))
    second = await pipeline.intercept_service(continuation, Details("/s/M"))
    assert first is second
    assert (outer.wraps, inner.wraps) == (1, 1)

    handler = grpc.unary_unary_rpc_method_handler(echo)
    third = await pipeline.intercept_service(continuation, Details("/s/M"))
    assert third is not first
    assert (outer.wraps, inner.wraps) == (2, 2)


async def test_an_unknown_method_passes_none_through_and_is_reported_to_every_interceptor() -> None:
    log: list[str] = []
    pipeline = Pipeline([Tagging("outer", log), Tagging("inner", log)])

    async def continuation(details: Any) -> None:
        return None

    assert await pipeline.intercept_service(continuation, Details("/s/Nope")) is None
    assert log == ["inner unknown /s/Nope", "outer unknown /s/Nope"]
