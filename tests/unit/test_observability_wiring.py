"""What ``serve`` builds for metrics and tracing (usersvc.bootstrap.build_observability):
a single process serves its own /metrics, a worker leaves that to its
supervisor, and a taken metrics port is an OSError before anything starts."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest

from usersvc.bootstrap import build_observability
from usersvc.config import Settings

NO_TRACING: dict[str, str] = {}


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_single_process_serves_its_own_metrics_until_closed() -> None:
    observed = build_observability(Settings(metrics_addr="127.0.0.1:0"), environ=NO_TRACING)
    assert observed.metrics is not None
    assert observed.endpoint is not None
    port = observed.endpoint.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
    observed.close()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_a_taken_metrics_port_is_an_oserror(taken_port: int) -> None:
    with pytest.raises(OSError, match="Address already in use"):
        build_observability(Settings(metrics_addr=f"127.0.0.1:{taken_port}"), environ=NO_TRACING)


def test_a_worker_opens_no_metrics_port_of_its_own() -> None:
    observed = build_observability(
        Settings(metrics_addr="127.0.0.1:0"), worker=True, environ=NO_TRACING
    )
    # Without the supervisor's multiprocess directory there is nowhere to write.
    assert observed.metrics is None
    assert observed.endpoint is None


def test_without_metrics_addr_or_otel_variables_nothing_is_built() -> None:
    observed = build_observability(Settings(), environ=NO_TRACING)
    assert (observed.metrics, observed.tracing, observed.endpoint) == (None, None, None)
