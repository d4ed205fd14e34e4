"""Tracing with the otel extra, and that it costs nothing when it is off:
no interceptor, no OpenTelemetry import. Which OTEL_* variables turn it on
and which are refused: test_settings.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from usersvc.api.interceptors import (
    AccessLogInterceptor,
    RequestIdInterceptor,
    build_interceptors,
)
from usersvc.api.public import PublicMethods
from usersvc.observability.tracing import configure_tracing, otel_installed


def test_without_otel_variables_there_is_no_tracing() -> None:
    assert configure_tracing({}) is None


def test_the_console_exporter_builds_a_provider_named_usersvc() -> None:
    pytest.importorskip("opentelemetry.sdk")
    tracing = configure_tracing({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "usersvc"
    finally:
        tracing.shutdown()


def test_without_the_extra_tracing_stays_off_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None in sys.modules: what an import of a package that is not there finds.
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    assert otel_installed() is False
    with caplog.at_level("WARNING", logger="usersvc.observability.tracing"):
        assert configure_tracing({"OTEL_TRACES_EXPORTER": "otlp"}) is None
    assert "pip install 'usersvc[otel]'" in caplog.text


class _NoAuthentication:
    def authenticate(self, token: str) -> object:
        raise AssertionError("not called while building the chain")


def _chain(**options: object) -> list[type]:
    interceptors = build_interceptors(
        auth_service=_NoAuthentication(),  # type: ignore[arg-type]
        public_methods=PublicMethods(allow_signup=True),
        **options,  # type: ignore[arg-type]
    )
    [pipeline] = interceptors
    return [type(interceptor) for interceptor in pipeline.interceptors]  # type: ignore[attr-defined]


def test_without_tracing_no_tracing_interceptor_is_installed() -> None:
    names = [kind.__name__ for kind in _chain()]
    assert "TracingInterceptor" not in names
    assert names[:2] == ["RequestIdInterceptor", "AccessLogInterceptor"]


def test_with_tracing_its_interceptor_sits_right_inside_the_request_id() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    from usersvc.api.interceptors.tracing import TracingInterceptor
    from usersvc.observability.tracing import Tracing

    chain = _chain(tracing=TracingInterceptor(Tracing(TracerProvider()).tracer))
    assert chain[:3] == [RequestIdInterceptor, TracingInterceptor, AccessLogInterceptor]


def test_serving_without_tracing_imports_nothing_of_opentelemetry() -> None:
    # A fresh interpreter: this one may have imported it for other tests.
    probe = (
        "import sys, os\n"
        "from usersvc import bootstrap, cli, server\n"
        "from usersvc.observability.tracing import configure_tracing\n"
        "assert configure_tracing(os.environ) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "OTEL_SERVICE_NAME": "usersvc"}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
