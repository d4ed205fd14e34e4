"""SQL spans on the service's engine (the otel extra): one client span per
statement, its text with placeholders, and for a failing statement the
error class, never the driver's message or a parameter value."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import create_engine
from usersvc.config import Settings

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from usersvc.observability.tracing import Tracing

SECRET = "$2b$04$" + "q" * 53


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_engine(
    test_settings: Settings, database_url: str, exporter: InMemorySpanExporter
) -> AsyncIterator[AsyncEngine]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = create_engine(test_settings, database_url)
    Tracing(provider).instrument_engine(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_each_statement_is_a_client_span_with_its_text(
    traced_engine: AsyncEngine, exporter: InMemorySpanExporter
) -> None:
    async with traced_engine.connect() as connection:
        await connection.execute(
            text("SELECT count(*) FROM users WHERE password_hash = :hash"), {"hash": SECRET}
        )

    [span] = [s for s in exporter.get_finished_spans() if "users" in str(s.attributes)]
    attributes = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert attributes["db.query.text"] == "SELECT count(*) FROM users WHERE password_hash = $1"
    assert attributes["db.operation.name"] == "SELECT"
    assert SECRET not in str(attributes)


async def test_a_failing_statement_is_an_error_span_naming_only_the_error_class(
    traced_engine: AsyncEngine, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(DBAPIError):
        async with traced_engine.connect() as connection:
            await connection.execute(
                text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, :hash)"),
                {"id": "not-a-uuid", "email": "traced@example.com", "hash": SECRET},
            )

    [span] = [s for s in exporter.get_finished_spans() if "INSERT" in s.name]
    assert span.status.status_code is StatusCode.ERROR
    shown = f"{span.attributes} {span.status.description} {span.events}"
    assert (SECRET in shown, "traced@example.com" in shown, "not-a-uuid" in shown) == (
        False,
        False,
        False,
    )
    assert span.status.description is not None
    assert "Error" in span.status.description
