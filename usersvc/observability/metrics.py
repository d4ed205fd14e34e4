"""Prometheus metrics: gRPC server calls, the connection pool, logins, rate
limits, revocations, events and the event loop's lag, served on
USERSVC_METRICS_ADDR.

The call metrics carry go-grpc-prometheus's names and labels
(``grpc_server_started_total``, ``grpc_server_handled_total``,
``grpc_server_handling_seconds``; ``grpc_type``, ``grpc_service``,
``grpc_method``, ``grpc_code`` with Go's code names such as ``NotFound``), so
the dashboards and alerts written for Go services work unchanged.

One process (``usersvc serve``): the metrics live in a registry of their own
and a prometheus_client HTTP thread serves it; the pool gauges are read when
scraped. Several workers (``--workers N``): prometheus_client's multiprocess
mode. Each worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR,
which the supervisor creates, aggregates on each scrape (MultiProcessCollector)
and deletes at exit. A collector cannot run in a worker there, so each worker
samples its pool into ``livesum`` gauges once a second instead.

Nothing here imports grpc: the supervisor uses this module and must stay free
of grpc's threads (see usersvc.supervisor). Label values are bounded: method
names come from registered handlers only, outcomes and reasons from fixed
lists; never an email, a token or a caller's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from usersvc.config import split_host_port
from usersvc.observability.loop_lag import LoopLagMonitor, WindowedMax

logger = logging.getLogger("usersvc.metrics")

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
POOL_SAMPLE_SECONDS = 1.0
# From "as meant" (a few milliseconds: docs/performance.md) to a stall that
# health checks and the database monitor would notice.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# grpc.StatusCode names to the names Go's codes.Code.String() gives, which
# go-grpc-prometheus puts in grpc_code (note Go's spelling "Canceled").
GRPC_CODE_LABELS: dict[str, str] = {
    "OK": "OK",
    "CANCELLED": "Canceled",
    "UNKNOWN": "Unknown",
    "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded",
    "NOT_FOUND": "NotFound",
    "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied",
    "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition",
    "ABORTED": "Aborted",
    "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented",
    "INTERNAL": "Internal",
    "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss",
    "UNAUTHENTICATED": "Unauthenticated",
}

# Login outcomes (usersvc.services.auth): success; malformed (an email that
# is no address or a password of impossible length: nothing looked up);
# unknown_or_locked (no such account, or one locked right now: the service
# deliberately cannot tell these apart without a second query); bad_password;
# locked_out (a bad password that started a lock); inactive (the right
# password for a disabled or deleted account).
LOGIN_OUTCOMES = (
    "success",
    "malformed",
    "unknown_or_locked",
    "bad_password",
    "locked_out",
    "inactive",
)
RATE_LIMIT_BUCKETS = ("auth", "api")
# Why a call was refused before any work (usersvc/api/interceptors/admission.py,
# which cannot be imported here: it imports grpc).
REFUSAL_REASONS = ("calls", "health", "streams", "reflection", "request_timeout")


class PoolLike(Protocol):
    """What the gauges read from SQLAlchemy's QueuePool."""

    def size(self) -> int: ...
    def checkedin(self) -> int: ...
    def checkedout(self) -> int: ...
    def overflow(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    checked_out: int
    checked_in: int
    overflow: int

    @classmethod
    def of(cls, pool: PoolLike) -> PoolStats:
        # QueuePool.overflow() counts from -size upwards; above zero it is
        # the number of connections open beyond the pool size.
        return cls(
            size=pool.size(),
            checked_out=pool.checkedout(),
            checked_in=pool.checkedin(),
            overflow=max(0, pool.overflow()),
        )


_POOL_GAUGES = (
    ("usersvc_db_pool_size", "Connections the pool keeps (USERSVC_DB_POOL_SIZE)", "size"),
    (
        "usersvc_db_pool_checked_out",
        "Connections in use by calls right now",
        "checked_out",
    ),
    ("usersvc_db_pool_checked_in", "Open connections idle in the pool", "checked_in"),
    (
        "usersvc_db_pool_overflow",
        "Connections open beyond the pool size (at most USERSVC_DB_MAX_OVERFLOW)",
        "overflow",
    ),
)


class PoolCollector(Collector):
    """The pool gauges, read from the pool when scraped (one process)."""

    def __init__(self, pool: PoolLike) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        stats = PoolStats.of(self._pool)
        for name, documentation, attribute in _POOL_GAUGES:
            yield GaugeMetricFamily(name, documentation, value=getattr(stats, attribute))

    def describe(self) -> Iterable[Metric]:
        # Described without reading the pool, so registering costs nothing.
        for name, documentation, _ in _POOL_GAUGES:
            yield GaugeMetricFamily(name, documentation)


class _MethodMetrics:
    """One method's children, bound once so a call does two dict-free
    increments and one observation."""

    __slots__ = ("_handled", "_handled_by_code", "_histogram", "_labels", "_started")

    def __init__(self, calls: CallMetrics, labels: tuple[str, str, str]) -> None:
        self._labels = labels
        self._started = calls.started.labels(*labels)
        self._histogram = calls.handling_seconds.labels(*labels)
        self._handled = calls.handled
        self._handled_by_code: dict[str, Counter] = {}

    def started(self) -> None:
        self._started.inc()

    def handled(self, code: str, seconds: float) -> None:
        child = self._handled_by_code.get(code)
        if child is None:
            label = GRPC_CODE_LABELS.get(code, "Unknown")
            child = self._handled.labels(*self._labels, label)
            self._handled_by_code[code] = child
        child.inc()
        self._histogram.observe(seconds)


def grpc_type(*, request_streaming: bool, response_streaming: bool) -> str:
    """go-grpc-prometheus's grpc_type label. Raises nothing."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class CallMetrics:
    """The gRPC server metrics; a CallObserver for the access log
    interceptor (usersvc.api.interceptors.access_log)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            labels,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*labels, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been "
            "application-level handled by the server.",
            labels,
            registry=registry,
        )

    def for_method(
        self, method: str, *, request_streaming: bool, response_streaming: bool
    ) -> _MethodMetrics:
        service, _, name = method.lstrip("/").rpartition("/")
        kind = grpc_type(request_streaming=request_streaming, response_streaming=response_streaming)
        return _MethodMetrics(self, (kind, service, name))


class Metrics:
    """Every metric of one server process. Build with ``create``."""

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool) -> None:
        self.registry = registry
        self.multiprocess = multiprocess
        self.calls = CallMetrics(registry)
        self._logins = Counter(
            "usersvc_login_attempts_total",
            "Login attempts by outcome.",
            ("outcome",),
            registry=registry,
        )
        self._rate_limited = Counter(
            "usersvc_rate_limited_total",
            "Calls refused by a rate limit, by bucket (auth: Login and sign-up; api: the rest).",
            ("bucket",),
            registry=registry,
        )
        self._refused = Counter(
            "usersvc_calls_refused_total",
            "Calls refused before any work: a lane at its cap (calls, health, streams, "
            "reflection) or a request message that did not arrive in time (request_timeout).",
            ("reason",),
            registry=registry,
        )
        self._revoked = Counter(
            "usersvc_sessions_revoked_total",
            "Sessions revoked, by reason.",
            ("reason",),
            registry=registry,
        )
        self._events_published = Counter(
            "usersvc_events_published_total",
            "Events published to NATS JetStream (PubAck received).",
            registry=registry,
        )
        self._event_publish_errors = Counter(
            "usersvc_event_publish_errors_total",
            "Failed attempts to publish an event (NATS down or slow); the event is retried.",
            registry=registry,
        )
        self._event_lag = Histogram(
            "usersvc_event_publish_lag_seconds",
            "From an event's transaction to its PubAck.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self._events_unpublished = Gauge(
            "usersvc_events_unpublished",
            "Numbered events not yet published, as the publishing replica last counted them.",
            registry=registry,
            multiprocess_mode="max",
        )
        self._loop_lag = Histogram(
            "usersvc_event_loop_lag_seconds",
            "How late the event loop woke a task sleeping 10 ms: how long something "
            "held the loop (every call of the process waits that long).",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self._loop_hold = Histogram(
            "usersvc_event_loop_hold_seconds",
            "The part of each event loop lag the loop's thread was computing (CPU "
            "time): a step that did not yield, without the time the process waited "
            "for a CPU.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self._loop_lag_max = Gauge(
            "usersvc_event_loop_lag_max_seconds",
            "The longest event loop lag of the last minute (50-60 s); with workers, "
            "the largest of the live workers'.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self._lag_window = WindowedMax()
        self._lag_monitor = LoopLagMonitor(self.loop_lag)
        # Known label values start at 0, so rate() sees the first event.
        for outcome in LOGIN_OUTCOMES:
            self._logins.labels(outcome)
        for bucket in RATE_LIMIT_BUCKETS:
            self._rate_limited.labels(bucket)
        for reason in REFUSAL_REASONS:
            self._refused.labels(reason)
        self._pool_gauges: dict[str, Gauge] = {}
        self._sampler: asyncio.Task[None] | None = None

    @classmethod
    def create(cls) -> Metrics:
        """Metrics of this process; in multiprocess mode when
        PROMETHEUS_MULTIPROC_DIR is set (a worker). Raises nothing."""
        return cls(CollectorRegistry(), multiprocess=MULTIPROC_DIR_VARIABLE in os.environ)

    def login_outcome(self, outcome: str) -> None:
        self._logins.labels(outcome).inc()

    def rate_limited(self, bucket: str) -> None:
        self._rate_limited.labels(bucket).inc()

    def call_refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def sessions_revoked(self, reason: str, count: int) -> None:
        self._revoked.labels(reason).inc(count)

    def event_published(self, lag_seconds: float) -> None:
        self._events_published.inc()
        self._event_lag.observe(max(0.0, lag_seconds))

    def event_publish_failed(self) -> None:
        self._event_publish_errors.inc()

    def events_unpublished(self, count: int) -> None:
        self._events_unpublished.set(count)

    def loop_lag(self, lag: float, hold: float, now: float | None = None) -> None:
        """Record one measurement of the event loop's lag and hold
        (usersvc.observability.loop_lag; ``now``: the monotonic time of it,
        by default the current). Raises nothing."""
        self._loop_lag.observe(lag)
        self._loop_hold.observe(hold)
        self._loop_lag_max.set(self._lag_window.add(lag, time.monotonic() if now is None else now))

    def watch_pool(self, pool: PoolLike) -> None:
        """Report ``pool`` in the pool gauges: read at scrape time in one
        process; in multiprocess mode sampled by ``start`` instead. A pool
        without a size (NullPool) is not reported. Raises nothing."""
        if not all(hasattr(pool, name) for name in ("size", "checkedout", "overflow")):
            return
        if not self.multiprocess:
            self.registry.register(PoolCollector(pool))
            return
        for name, documentation, attribute in _POOL_GAUGES:
            # livesum: the workers' pools added up; a dead worker's share
            # disappears with it (the supervisor marks it dead).
            self._pool_gauges[attribute] = Gauge(
                name, documentation, registry=self.registry, multiprocess_mode="livesum"
            )
        self._pool = pool
        self._sample_pool()

    def _sample_pool(self) -> None:
        stats = PoolStats.of(self._pool)
        for attribute, gauge in self._pool_gauges.items():
            gauge.set(getattr(stats, attribute))

    def start(self) -> None:
        """Start measuring the event loop's lag, and sampling the pool
        (multiprocess mode only). Call from the event loop. Raises nothing."""
        self._lag_monitor.start()
        if self._pool_gauges and self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(POOL_SAMPLE_SECONDS)
            self._sample_pool()

    async def stop(self) -> None:
        await self._lag_monitor.stop()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None


class MetricsEndpoint:
    """A started /metrics HTTP server (prometheus_client's, on a thread)."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        """Bind ``addr`` (host:port; port 0 picks one) and serve ``registry``.
        Raises ValueError for a malformed address, OSError when it cannot
        be bound."""
        parsed = split_host_port(addr)
        if parsed is None:
            raise ValueError(f"not host:port: {addr!r}")
        host, port = parsed
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._server.server_address[1]
        logger.info("metrics served", extra={"metrics_addr": addr, "metrics_port": self.port})

    def close(self) -> None:
        """Stop serving and release the port. Raises nothing."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_process_metrics(addr: str, metrics: Metrics) -> MetricsEndpoint:
    """Serve one process's metrics. Raises like MetricsEndpoint."""
    return MetricsEndpoint(addr, metrics.registry)


def serve_multiprocess_metrics(addr: str, directory: str) -> MetricsEndpoint:
    """Serve the sum of the workers' metrics written under ``directory``
    (the supervisor). Raises like MetricsEndpoint."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return MetricsEndpoint(addr, registry)


def mark_worker_dead(pid: int, directory: str) -> None:
    """Drop a finished worker's live gauges (its counters stay counted).
    Raises nothing."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
