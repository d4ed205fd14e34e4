"""USERSVC_METRICS_ADDR: a real ``usersvc serve`` (one process, then a
supervisor with workers) scraped over HTTP after known calls; the counters
must move by exactly what the calls did."""

from __future__ import annotations

import asyncio
import signal
import urllib.error
from pathlib import Path

import grpc
import psutil
import pytest

from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    missing_id,
    user_service_pb2,
)
from .served import (
    calls_until_answered_by,
    scrape,
    served,
    server_env,
    value,
)
from .test_process import free_port

POOL_SIZE = 3
WORKERS = 2

USER_SERVICE = "usersvc.v1.UserService"
AUTH_SERVICE = "usersvc.v1.AuthService"


def unary(service: str, method: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}


async def test_one_process_counts_calls_logins_limits_and_revocations(
    database_url: str, world: World, tmp_path: Path
) -> None:
    port = free_port()
    env = server_env(
        database_url,
        tmp_path / "data",
        USERSVC_METRICS_ADDR=f"127.0.0.1:{port}",
        USERSVC_DB_POOL_SIZE=str(POOL_SIZE),
        # Two logins pass, the third is refused by the auth bucket.
        USERSVC_AUTH_RATE_LIMIT_RPS="0.001",
        USERSVC_AUTH_RATE_LIMIT_BURST="2",
    )
    async with served(env, tmp_path / "serve.log") as server:
        await server.wait_serving(1)
        before = await asyncio.to_thread(scrape, port)
        async with grpc.aio.insecure_channel(server.address) as channel:
            anonymous = Caller(channel, None)
            login = await anonymous.auth.Login(
                auth_service_pb2.LoginRequest(
                    email=world.admin.email, password=world.admin.password
                )
            )
            admin = Caller(channel, login.access_token)
            failures = []
            for password in ("not her password", "nor this one"):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await anonymous.auth.Login(
                        auth_service_pb2.LoginRequest(email=world.alice.email, password=password)
                    )
                failures.append(failed.value.code())
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await admin.users.GetUser(user_service_pb2.GetUserRequest(id=missing_id()))
            await admin.auth.Logout(auth_service_pb2.LogoutRequest())
        after = await asyncio.to_thread(scrape, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    get_user = unary(USER_SERVICE, "GetUser")
    login_labels = unary(AUTH_SERVICE, "Login")
    assert failures == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # go-grpc-prometheus names, labels and code spelling.
    assert delta("grpc_server_started_total", **get_user) == 1
    assert delta("grpc_server_handled_total", **get_user, grpc_code="NotFound") == 1
    assert delta("grpc_server_handled_total", **get_user, grpc_code="OK") == 0
    assert delta("grpc_server_handling_seconds_count", **get_user) == 1
    assert delta("grpc_server_handling_seconds_bucket", **get_user, le="+Inf") == 1
    assert value(after, "grpc_server_handling_seconds_sum", **get_user) > 0
    assert delta("grpc_server_started_total", **login_labels) == 3
    assert delta("grpc_server_handled_total", **login_labels, grpc_code="OK") == 1
    assert delta("grpc_server_handled_total", **login_labels, grpc_code="Unauthenticated") == 1
    assert delta("grpc_server_handled_total", **login_labels, grpc_code="ResourceExhausted") == 1
    # The refused login never reached the service: two outcomes, not three.
    assert delta("usersvc_login_attempts_total", outcome="success") == 1
    assert delta("usersvc_login_attempts_total", outcome="bad_password") == 1
    assert delta("usersvc_rate_limited_total", bucket="auth") == 1
    assert delta("usersvc_rate_limited_total", bucket="api") == 0
    assert delta("usersvc_sessions_revoked_total", reason="logout") == 1
    # The pool: the configured size, nothing left checked out, no overflow.
    assert value(after, "usersvc_db_pool_size") == POOL_SIZE
    assert value(after, "usersvc_db_pool_checked_out") == 0
    assert 1 <= value(after, "usersvc_db_pool_checked_in") <= POOL_SIZE
    assert value(after, "usersvc_db_pool_overflow") == 0


async def test_label_values_never_carry_emails_or_tokens(
    database_url: str, world: World, tmp_path: Path
) -> None:
    port = free_port()
    env = server_env(database_url, tmp_path / "data", USERSVC_METRICS_ADDR=f"127.0.0.1:{port}")
    async with served(env, tmp_path / "serve.log") as server:
        await server.wait_serving(1)
        async with grpc.aio.insecure_channel(server.address) as channel:
            login = await Caller(channel, None).auth.Login(
                auth_service_pb2.LoginRequest(email=world.bob.email, password=world.bob.password)
            )
        samples = await asyncio.to_thread(scrape, port)

    label_values = {v for _, labels in samples for _, v in labels}
    assert world.bob.email not in label_values
    assert not any(login.access_token in v or "@" in v for v in label_values)


async def test_without_metrics_addr_nothing_listens(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = server_env(database_url, tmp_path / "data")
    async with served(env, tmp_path / "serve.log") as server:
        await server.wait_serving(1)
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(scrape, port)
        listening = {
            c.laddr.port
            for c in psutil.Process(server.process.pid).net_connections()
            if c.status == psutil.CONN_LISTEN
        }

    # Only the gRPC port: no metrics endpoint or anything else.
    assert listening == {int(server.address.rpartition(":")[2])}


async def test_workers_metrics_add_up_every_worker_and_survive_a_worker_dying(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = server_env(
        database_url,
        tmp_path / "data",
        USERSVC_METRICS_ADDR=f"127.0.0.1:{port}",
        USERSVC_DB_POOL_SIZE=str(POOL_SIZE),
    )
    jwks = unary(AUTH_SERVICE, "GetJwks")
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        answers = await calls_until_answered_by(server, workers)
        both = await asyncio.to_thread(scrape, port)

        victim = answers[0]
        psutil.Process(victim).kill()
        await server.wait_for(
            "a replacement worker serving", lambda: len(server.serving_pids()) > WORKERS
        )
        # The dead worker's pool leaves the sum, the new one's joins it.
        pool_after = await server.wait_for(
            "the pool gauges to count the live workers only",
            lambda: (
                (s := scrape(port))
                and value(s, "usersvc_db_pool_size") == WORKERS * POOL_SIZE
                and s
            ),
        )
        code = await server.stop(signal.SIGTERM)

    assert set(answers) == workers
    assert value(both, "grpc_server_handled_total", **jwks, grpc_code="OK") == len(answers)
    assert value(both, "grpc_server_started_total", **jwks) == len(answers)
    assert value(both, "grpc_server_handling_seconds_count", **jwks) == len(answers)
    # One pool per worker: PostgreSQL sees WORKERS x pool size.
    assert value(both, "usersvc_db_pool_size") == WORKERS * POOL_SIZE
    # The dead worker's calls are still counted.
    assert value(pool_after, "grpc_server_handled_total", **jwks, grpc_code="OK") == len(answers)
    assert code == 0
