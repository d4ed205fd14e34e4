"""OpenTelemetry traces of a real server (the otel extra): a server span per
RPC continuing the caller's trace, SQL spans inside it, gRPC codes on the
spans, and no parameter value anywhere in them."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from .conftest import RunningServer, running_server
from .helpers import (
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    expect_not_found,
    fails,
    missing_id,
    new_password,
    user_service_pb2,
)
from .test_process import COMMAND_TIMEOUT_SECONDS, Usersvc

# The fixture of test_process, reused (the explicit re-export keeps it in scope).
from .test_process import usersvc as usersvc

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

GET_USER = "usersvc.v1.UserService/GetUser"


@dataclass
class Traced:
    server: RunningServer
    world: World
    exporter: InMemorySpanExporter

    async def spans_of(self, name: str, count: int = 1) -> list[ReadableSpan]:
        """The finished spans once ``count`` server spans called ``name`` are
        among them. A failed call's status goes out before its span ends;
        the server runs on this event loop, so yielding is enough (bounded)."""
        for _ in range(10_000):
            spans = list(self.exporter.get_finished_spans())
            if len([s for s in spans if s.name == name]) >= count:
                return spans
            await asyncio.sleep(0)
        pytest.fail(f"no span {name}")


@pytest_asyncio.fixture(loop_scope="session")
async def traced(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[Traced]:
    """A server whose spans go to an in-memory exporter, with users on it."""
    from usersvc.observability.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with running_server(e2e_settings, recorder, tracing=Tracing(provider)) as server:
        world = await World(
            user_service=server.container.user_service, channel=server.channel, recorder=recorder
        ).populate()
        exporter.clear()
        yield Traced(server, world, exporter)


def traceparent() -> tuple[int, int, tuple[tuple[str, str], ...]]:
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    header = f"00-{trace_id:032x}-{span_id:016x}-01"
    return trace_id, span_id, (("traceparent", header),)


def server_span(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name and s.kind is SpanKind.SERVER]
    return span


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


async def test_a_call_with_a_traceparent_continues_the_callers_trace(traced: Traced) -> None:
    trace_id, parent_id, metadata = traceparent()
    await traced.world.alice.users.GetUser(
        user_service_pb2.GetUserRequest(id="me"),
        metadata=(*metadata, ("x-request-id", "trace-me-1")),
    )

    span = server_span(await traced.spans_of(GET_USER), GET_USER)
    assert span.context.trace_id == trace_id
    assert span.parent is not None
    assert (span.parent.span_id, span.parent.is_remote) == (parent_id, True)
    assert dict(span.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "usersvc.v1.UserService",
        "rpc.method": "GetUser",
        "rpc.grpc.status_code": 0,
        "usersvc.request_id": "trace-me-1",
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_the_sql_of_a_call_is_traced_inside_its_span(traced: Traced) -> None:
    trace_id, _, metadata = traceparent()
    await traced.world.admin.users.GetUser(
        user_service_pb2.GetUserRequest(id=traced.world.bob.id), metadata=metadata
    )

    spans = await traced.spans_of(GET_USER)
    sql = children(spans, server_span(spans, GET_USER))
    assert sql, "no SQL span under the server span"
    assert {s.kind for s in sql} == {SpanKind.CLIENT}
    assert {s.context.trace_id for s in sql} == {trace_id}
    statements = [str((s.attributes or {})["db.query.text"]) for s in sql]
    assert any(text.lstrip().upper().startswith("SELECT") for text in statements), statements
    assert all((s.attributes or {})["db.system.name"] == "postgresql" for s in sql)


async def test_a_call_without_trace_context_starts_a_new_trace(traced: Traced) -> None:
    await traced.world.alice.users.GetUser(user_service_pb2.GetUserRequest(id="me"))

    span = server_span(await traced.spans_of(GET_USER), GET_USER)
    assert span.parent is None


async def test_a_failed_call_is_an_error_span_with_its_grpc_code(traced: Traced) -> None:
    await expect_not_found(
        traced.world.admin.users.GetUser(user_service_pb2.GetUserRequest(id=missing_id()))
    )

    span = server_span(await traced.spans_of(GET_USER), GET_USER)
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, "NOT_FOUND")


async def test_an_unauthenticated_call_is_an_error_span(traced: Traced) -> None:
    failure = await fails(
        traced.world.anonymous.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
    )

    span = server_span(await traced.spans_of(GET_USER), GET_USER)
    assert failure.code is grpc.StatusCode.UNAUTHENTICATED
    assert (span.attributes or {})["rpc.grpc.status_code"] == failure.code.value[0]
    assert span.status.status_code is StatusCode.ERROR


async def test_no_span_carries_a_parameter_value(traced: Traced) -> None:
    world, recorder = traced.world, traced.world.recorder
    email = f"traced-{secrets.token_hex(4)}@example.com"
    password = new_password(recorder)
    created = await world.anonymous.users.CreateUser(
        create_request(recorder, email=email, password=password)
    )
    login = await world.anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )
    await world.anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=login.refresh_token)
    )
    # A refused duplicate: the error status names the code, not the email.
    await fails(world.anonymous.users.CreateUser(create_request(recorder, email=email.upper())))

    spans = await traced.spans_of("usersvc.v1.UserService/CreateUser", count=2)
    assert len([s for s in spans if s.kind is SpanKind.CLIENT]) >= 6
    values = " ".join(
        str(value) for span in spans for value in (span.attributes or {}).values()
    ) + " ".join(str(span.status.description) for span in spans)
    sent = {
        "email": email,
        "user id": created.user.id,
        "password": password,
        "access token": login.access_token,
        "refresh token": login.refresh_token,
        "hash prefix": "$2b$",
    }
    assert [name for name, value in sent.items() if value in values] == []


# -- configured by OTEL_* variables, in a real process ----------------------------------------


async def test_serve_exports_spans_as_the_otel_variables_say(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    trace_id, _, metadata = traceparent()
    log = tmp_path / "serve.log"
    served = usersvc.with_env(OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="usersvc-e2e")
    async with served.serving(log) as server:
        async with grpc.aio.insecure_channel(served.listen_addr) as channel:
            from .helpers import Caller

            await Caller(channel, None).auth.GetJwks(
                auth_service_pb2.GetJwksRequest(), metadata=metadata
            )
        # The batch processor exports at shutdown at the latest.
        server.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.wait(), COMMAND_TIMEOUT_SECONDS)

    output = log.read_text()
    assert code == 0, output
    assert '"name": "usersvc.v1.AuthService/GetJwks"' in output
    assert f"0x{trace_id:032x}" in output
    assert '"service.name": "usersvc-e2e"' in output


@pytest.mark.parametrize("args", [("serve",), ("serve", "--workers", "2")])
async def test_serve_refuses_an_exporter_it_does_not_ship(
    usersvc: Usersvc, args: tuple[str, ...]
) -> None:
    result = await usersvc.with_env(OTEL_TRACES_EXPORTER="zipkin").run(*args)

    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER" in result.stderr
    assert "Traceback" not in result.stderr
