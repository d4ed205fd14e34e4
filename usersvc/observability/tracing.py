"""OpenTelemetry traces, when the ``otel`` extra is installed and asked for.

``pip install 'usersvc[otel]'`` brings the OpenTelemetry SDK and its OTLP/gRPC
exporter. Tracing is then on when the standard variables ask for it:

- off when ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``;
- on when ``OTEL_TRACES_EXPORTER`` names exporters (``otlp``, ``console``) or
  an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``);
- off otherwise. The SDK alone would export to localhost:4317 and log a
  warning per failed batch; installing the extra must not do that to a
  laptop or a test run that did not ask for traces.

Everything else is the SDK's own reading of the standard variables: the
sampler (``OTEL_TRACES_SAMPLER``, ``..._ARG``; parent-based always-on by
default, so a caller's sampled flag is followed), the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; the service name is
``usersvc`` unless they say otherwise), the exporter's endpoint, headers,
TLS, compression and timeout (``OTEL_EXPORTER_OTLP_*``), the batch processor
(``OTEL_BSP_*``) and the propagators (``OTEL_PROPAGATORS``, W3C trace context
and baggage by default).

What is traced: a server span per RPC (``usersvc/api/interceptors/tracing.py``)
and, inside it, a client span per SQL statement run through the service's
SQLAlchemy engine, carrying the statement text with its placeholders and
never the parameter values.

When tracing is off, or the extra is missing, nothing of OpenTelemetry is
imported and no interceptor or engine hook is added: the hot path is the
same as without this module. Importing this module imports nothing of it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

SERVICE_NAME = "usersvc"
TRACER_NAME = "usersvc"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
EXPORTERS = ("otlp", "console")
# Long enough for every statement the service writes; a multi-row INSERT
# of a large batch is cut rather than shipped whole with every span.
MAX_STATEMENT_CHARS = 2048
_SPAN_KEY = "_usersvc_sql_span"


class TracingConfigError(ValueError):
    """The OTEL_* variables ask for something usersvc cannot do."""


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables in ``environ`` ask for traces (see the
    module docstring). Imports nothing; raises nothing."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = _exporters(environ)
    if exporters == ["none"]:
        return False
    if exporters:
        return True
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def otel_installed() -> bool:
    """Whether the OpenTelemetry SDK and OTLP exporter (the extra) can be
    imported, without importing them."""
    try:
        return all(
            importlib.util.find_spec(name) is not None
            for name in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc")
        )
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _exporters(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    return [name.strip().lower() for name in raw.split(",") if name.strip()]


class Tracing:
    """A TracerProvider and the hooks usersvc puts on it: the engine's SQL
    spans here, and the tracer of the RPC interceptor
    (usersvc/api/interceptors/tracing.py, built by usersvc/bootstrap.py).
    Tests build one around a provider with an in-memory exporter."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(TRACER_NAME)

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """Give every statement ``engine`` runs a client span, a child of the
        span current where the statement was issued (SQLAlchemy runs the
        driver in a greenlet that shares the caller's contextvars).
        Never raises."""
        from opentelemetry.trace import Status, StatusCode
        from sqlalchemy import event

        start = self._statement_starter(engine)

        def before(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            # `parameters` is deliberately never read.
            if context is not None:
                setattr(context, _SPAN_KEY, start(statement))

        def after(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            span = getattr(context, _SPAN_KEY, None)
            if span is not None:
                span.end()
                setattr(context, _SPAN_KEY, None)

        def failed(exception_context: Any) -> None:
            span = getattr(exception_context.execution_context, _SPAN_KEY, None)
            if span is not None:
                # The class only: driver messages may quote row values.
                error = exception_context.original_exception
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.set_attribute("error.type", type(error).__name__)
                span.end()
                setattr(exception_context.execution_context, _SPAN_KEY, None)

        event.listen(engine.sync_engine, "before_cursor_execute", before)
        event.listen(engine.sync_engine, "after_cursor_execute", after)
        event.listen(engine.sync_engine, "handle_error", failed)

    def _statement_starter(self, engine: AsyncEngine) -> Callable[[str], Span]:
        from opentelemetry.trace import SpanKind

        tracer = self.tracer
        database = engine.url.database or ""

        def start(statement: str) -> Span:
            # The statement as the driver gets it: placeholders ($1, ...)
            # where values go; values are never looked at.
            operation = statement.lstrip().split(None, 1)[0].upper() if statement else "SQL"
            return tracer.start_span(
                f"{operation} {database}" if database else operation,
                kind=SpanKind.CLIENT,
                attributes={
                    "db.system.name": "postgresql",
                    "db.namespace": database,
                    "db.operation.name": operation,
                    "db.query.text": statement[:MAX_STATEMENT_CHARS],
                },
            )

        return start

    def statement_span(self, engine: AsyncEngine) -> Callable[[str], AbstractContextManager[Span]]:
        """For statements run on the driver connection, past the engine's
        events (the read lane): a context manager making one client span
        like the engine's, ended with the error class on failure."""
        from opentelemetry.trace import Status, StatusCode

        start = self._statement_starter(engine)

        @contextmanager
        def span(statement: str) -> Iterator[Span]:
            current = start(statement)
            try:
                yield current
            except BaseException as error:
                current.set_status(Status(StatusCode.ERROR, type(error).__name__))
                current.set_attribute("error.type", type(error).__name__)
                raise
            finally:
                current.end()

        return span

    def shutdown(self) -> None:
        """Export what is buffered and stop. Never raises."""
        try:
            self.provider.shutdown()
        except Exception:  # a dead collector must not fail a clean stop
            logger.warning("tracing shutdown failed", exc_info=True)


def check_tracing_environment(environ: Mapping[str, str]) -> list[str]:
    """The exporters the OTEL_* variables in ``environ`` name (``otlp``
    when only an endpoint is set; none when tracing is not asked for).
    Imports nothing, so a process that must not load
    grpc (the workers' supervisor) can check before it starts anything.

    Raises TracingConfigError for an exporter or OTLP protocol usersvc
    does not ship.
    """
    if not tracing_requested(environ):
        return []
    exporters = _exporters(environ) or ["otlp"]
    unknown = [name for name in exporters if name not in EXPORTERS]
    if unknown:
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} not supported "
            f"(usersvc ships {', '.join(EXPORTERS)}, or none)"
        )
    for variable in PROTOCOL_VARIABLES:
        protocol = environ.get(variable, "").strip().lower()
        if protocol and protocol != "grpc":
            raise TracingConfigError(
                f"{variable}={protocol}: usersvc ships the OTLP/gRPC exporter only (grpc)"
            )
    return exporters


def configure_tracing(environ: Mapping[str, str]) -> Tracing | None:
    """Tracing as the OTEL_* variables in ``environ`` ask for it, or None
    when they do not, or when the ``otel`` extra is not installed (then a
    warning says so).

    Raises TracingConfigError for an exporter or OTLP protocol usersvc
    does not ship.
    """
    if not tracing_requested(environ):
        return None
    exporters = check_tracing_environment(environ)
    if not otel_installed():
        logger.warning(
            "OTEL_* variables ask for traces but the otel extra is not installed "
            "(pip install 'usersvc[otel]'); tracing is off"
        )
        return None
    return Tracing(_provider_from_environment(exporters))


def _provider_from_environment(exporters: list[str]) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    # Sampler and span limits come from the environment inside the SDK.
    provider = TracerProvider(resource=resource)
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, TLS: OTEL_EXPORTER_OTLP_*
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
