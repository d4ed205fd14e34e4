"""Metrics (usersvc.observability.metrics) and the hooks that feed them:
the access log interceptor, AuthService's login outcomes, the session
revoker's counts. The settings that turn metrics and workers on are in
test_settings.py."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import bcrypt
import grpc
import pytest
from fakes import FakeClock, auth_service
from prometheus_client import CollectorRegistry

from usersvc.api.interceptors import AccessLogInterceptor
from usersvc.domain.errors import InvalidCredentials
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import RevokeReason
from usersvc.observability.metrics import (
    GRPC_CODE_LABELS,
    LOGIN_OUTCOMES,
    CallMetrics,
    Metrics,
    PoolCollector,
    grpc_type,
)
from usersvc.services.auth import AuthService
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import SessionLifetimes, SessionRevoker

PASSWORD = "correct horse battery staple"

# ----------------------------------------------------------- call metrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_every_grpc_status_code_has_go_grpc_prometheus_spelling() -> None:
    assert set(GRPC_CODE_LABELS) == {code.name for code in grpc.StatusCode}
    assert GRPC_CODE_LABELS["NOT_FOUND"] == "NotFound"
    assert GRPC_CODE_LABELS["CANCELLED"] == "Canceled"  # Go's spelling


@pytest.mark.parametrize(
    ("request_streaming", "response_streaming", "expected"),
    [
        (False, False, "unary"),
        (True, False, "client_stream"),
        (False, True, "server_stream"),
        (True, True, "bidi_stream"),
    ],
)
def test_grpc_type_follows_the_streaming_sides(
    request_streaming: bool, response_streaming: bool, expected: str
) -> None:
    assert (
        grpc_type(request_streaming=request_streaming, response_streaming=response_streaming)
        == expected
    )


def test_a_method_observer_counts_start_code_and_duration() -> None:
    registry = CollectorRegistry()
    observer = CallMetrics(registry).for_method(
        "/usersvc.v1.UserService/ImportUsers", request_streaming=True, response_streaming=False
    )
    labels = {
        "grpc_type": "client_stream",
        "grpc_service": "usersvc.v1.UserService",
        "grpc_method": "ImportUsers",
    }
    observer.started()
    observer.handled("INVALID_ARGUMENT", 0.02)
    observer.handled("INVALID_ARGUMENT", 0.03)

    assert sample(registry, "grpc_server_started_total", **labels) == 1
    assert sample(registry, "grpc_server_handled_total", **labels, grpc_code="InvalidArgument") == 2
    assert sample(registry, "grpc_server_handling_seconds_count", **labels) == 2
    assert sample(registry, "grpc_server_handling_seconds_bucket", **labels, le="0.025") == 1


class FakeContext:
    def __init__(self, code: grpc.StatusCode | None) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class Details:
    method = "/usersvc.v1.UserService/GetUser"


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def for_method(
        self, method: str, *, request_streaming: bool, response_streaming: bool
    ) -> RecordingObserver:
        self.events.append(("for_method", method))
        return self

    def started(self) -> None:
        self.events.append(("started",))

    def handled(self, code: str, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("handled", code))


async def wrapped(observer: RecordingObserver, behaviour: Any) -> Any:
    quiet = logging.getLogger("tests.quiet-access")
    quiet.setLevel(logging.WARNING)
    interceptor = AccessLogInterceptor(logger=quiet, metrics=observer)
    handler = grpc.unary_unary_rpc_method_handler(behaviour)

    async def continuation(_: Any) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        return handler

    return await interceptor.intercept_service(continuation, Details())  # type: ignore[arg-type]


async def test_the_access_log_reports_calls_even_with_its_log_switched_off() -> None:
    observer = RecordingObserver()

    async def ok(request: Any, context: Any) -> Any:
        return request

    handler = await wrapped(observer, ok)
    await handler.unary_unary("ping", FakeContext(None))
    await handler.unary_unary("ping", FakeContext(None))

    assert observer.events == [
        ("for_method", Details.method),
        ("started",),
        ("handled", "OK"),
        ("started",),
        ("handled", "OK"),
    ]


async def test_the_access_log_reports_the_code_of_an_aborted_call() -> None:
    observer = RecordingObserver()

    async def aborted(request: Any, context: Any) -> Any:
        raise grpc.aio.AbortError()

    handler = await wrapped(observer, aborted)
    with pytest.raises(grpc.aio.AbortError):
        await handler.unary_unary("ping", FakeContext(grpc.StatusCode.NOT_FOUND))

    assert observer.events[-1] == ("handled", "NOT_FOUND")


# ------------------------------------------------------------ pool gauges


class FakePool:
    def __init__(self, *, size: int, checked_in: int, overflow: int) -> None:
        self._size, self._in, self._overflow = size, checked_in, overflow

    def size(self) -> int:
        return self._size

    def checkedin(self) -> int:
        return self._in

    def overflow(self) -> int:
        return self._overflow

    def checkedout(self) -> int:
        return self._size - self._in + self._overflow


def test_pool_gauges_are_read_from_the_pool_at_scrape_time() -> None:
    pool = FakePool(size=10, checked_in=2, overflow=-5)  # 5 open, 3 in use
    registry = CollectorRegistry()
    registry.register(PoolCollector(pool))

    first = sample(registry, "usersvc_db_pool_checked_out")
    pool._overflow = 3  # a burst: all 10 and 3 more open, none idle
    pool._in = 0

    assert first == 3
    assert sample(registry, "usersvc_db_pool_size") == 10
    assert sample(registry, "usersvc_db_pool_checked_out") == 13
    assert sample(registry, "usersvc_db_pool_overflow") == 3
    assert sample(registry, "usersvc_db_pool_checked_in") == 0


def test_a_pool_without_sizes_is_not_reported() -> None:
    metrics = Metrics(CollectorRegistry(), multiprocess=False)
    metrics.watch_pool(object())  # type: ignore[arg-type]

    assert sample(metrics.registry, "usersvc_db_pool_size") is None


def test_known_outcomes_and_buckets_start_at_zero() -> None:
    metrics = Metrics(CollectorRegistry(), multiprocess=False)

    assert all(
        sample(metrics.registry, "usersvc_login_attempts_total", outcome=o) == 0
        for o in LOGIN_OUTCOMES
    )
    assert sample(metrics.registry, "usersvc_rate_limited_total", bucket="auth") == 0


# --------------------------------------------------------- login outcomes


@pytest.fixture
async def hasher() -> AsyncIterator[BcryptPasswordHasher]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    yield hasher
    hasher.close()


def login_harness(
    hasher: BcryptPasswordHasher, outcomes: list[str], lockout: LockoutPolicy | None = None
) -> tuple[Any, AuthService]:
    built = auth_service(hasher, lockout=lockout)
    service = AuthService(
        uow_factory=built.db.uow,
        hasher=hasher,
        tokens=built.tokens,
        revocations=built.revocations,
        sessions=built.revoker,
        lockout=lockout,
        clock=built.clock,
        on_login=outcomes.append,
    )
    return built, service


def add_user(built: Any, email: str, **fields: Any) -> None:
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    built.db.insert(email, password_hash=password_hash, **fields)


@pytest.mark.parametrize(
    ("email", "password", "fields", "outcome"),
    [
        ("ann@example.com", PASSWORD, {}, "success"),
        ("ann@example.com", "wrong password", {}, "bad_password"),
        ("nobody@example.com", PASSWORD, {}, "unknown_or_locked"),
        ("not an email", PASSWORD, {}, "malformed"),
        ("ann@example.com", PASSWORD, {"disabled": True}, "inactive"),
    ],
)
async def test_each_login_reports_one_outcome(
    hasher: BcryptPasswordHasher, email: str, password: str, fields: dict[str, Any], outcome: str
) -> None:
    outcomes: list[str] = []
    built, service = login_harness(hasher, outcomes)
    add_user(built, "ann@example.com", **fields)

    with contextlib.suppress(InvalidCredentials):
        await service.login(email=email, password=password)

    assert outcomes == [outcome]


async def test_the_failure_that_locks_the_account_reports_locked_out(
    hasher: BcryptPasswordHasher,
) -> None:
    outcomes: list[str] = []
    policy = LockoutPolicy(max_failures=2, lockout_seconds=60, max_lockout_seconds=60)
    built, service = login_harness(hasher, outcomes, policy)
    add_user(built, "ann@example.com")

    for _ in range(3):
        with pytest.raises(InvalidCredentials):
            await service.login(email="ann@example.com", password="wrong password")

    assert outcomes == ["bad_password", "locked_out", "unknown_or_locked"]


# ----------------------------------------------------------- revocations


async def test_committed_revocations_are_counted_by_reason(hasher: BcryptPasswordHasher) -> None:
    counted: list[tuple[str, int]] = []
    built = auth_service(hasher)
    revoker = SessionRevoker(
        lifetimes=SessionLifetimes(
            access_ttl_seconds=60, refresh_ttl_seconds=600, clock=FakeClock()
        ),
        on_revoked=None,
        on_counted=lambda reason, count: counted.append((reason, count)),
    )
    user = built.db.insert("ann@example.com")
    async with built.db.uow() as uow:
        for _ in range(2):
            await uow.sessions.create(
                user.id, revoker.lifetimes.session_expire_time(revoker.lifetimes.now())
            )
        await uow.commit()
    async with built.db.uow() as uow:
        revocation = await revoker.revoke_user(uow, user.id, RevokeReason.DISABLED)
        await uow.commit()
    revoker.committed(revocation)
    async with built.db.uow() as uow:
        nothing = await revoker.revoke_user(uow, user.id, RevokeReason.DISABLED)
        await uow.commit()
    revoker.committed(nothing)

    assert counted == [("disabled", 2)]
