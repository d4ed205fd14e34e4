"""``usersvc serve --workers N``: real supervisor and worker processes on one
port, against the test database."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text

from .helpers import Caller, World, auth_service_pb2, new_email, user_pb2, user_service_pb2
from .served import (
    DEADLINE_SECONDS,
    MAX_CONNECTIONS,
    Served,
    answered_by,
    answering_pids,
    served,
    server_env,
)
from .test_process import free_port, wait_for_lock_waiter

WORKERS = 2


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_children(server: Served) -> set[int]:
    return {p.pid for p in psutil.Process(server.process.pid).children()}


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return server_env(database_url, tmp_path / "data")


async def test_two_workers_share_one_port_and_both_answer_calls(
    env: dict[str, str], tmp_path: Path
) -> None:
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        answered = await answering_pids(server, workers)
        children = worker_children(server)

    assert len(workers) == WORKERS
    assert server.process.pid not in workers  # the supervisor serves nothing itself
    assert children == workers
    assert answered == workers


async def test_usersvc_workers_variable_is_the_default_of_the_flag(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "USERSVC_WORKERS": str(WORKERS)}
    async with served(env, tmp_path / "serve.log") as server:
        workers = await server.wait_serving(WORKERS)

    assert len(workers) == WORKERS


async def test_sighup_reloads_keys_in_every_worker(env: dict[str, str], tmp_path: Path) -> None:
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        server.process.send_signal(signal.SIGHUP)
        reloaded = await server.wait_for(
            "every worker reloading its keys",
            lambda: (
                (pids := {int(r["pid"]) for r in server.matching("token keys reloaded")}) >= workers
                and pids
            ),
        )
        still_running = server.process.returncode is None

    assert reloaded == workers
    assert still_running


async def test_a_killed_worker_is_replaced_and_calls_keep_working(
    env: dict[str, str], tmp_path: Path
) -> None:
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        victim = min(workers)
        psutil.Process(victim).kill()
        everyone = await server.wait_for(
            "a replacement worker serving",
            lambda: len(pids := server.serving_pids()) > WORKERS and pids,
        )
        replacement = everyone - workers
        live = await server.wait_for(
            "the dead worker gone from the children",
            lambda: (
                (children := worker_children(server))
                and victim not in children
                and len(children) == WORKERS
                and children
            ),
        )
        answered = await answering_pids(server, live)
        died = server.matching("worker died; restarting it", pid=victim)

    assert len(replacement) == 1
    assert live == (workers - {victim}) | replacement
    assert answered == live
    assert died
    assert died[0]["returncode"] == -signal.SIGKILL


async def test_sigterm_drains_in_flight_calls_in_every_worker_and_exits_0(
    env: dict[str, str], world: World, engine: Any, tmp_path: Path
) -> None:
    env = {
        **env,
        "USERSVC_SHUTDOWN_GRACE_SECONDS": "60",
        "USERSVC_DB_STATEMENT_TIMEOUT_MS": "120000",
    }
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        async with grpc.aio.insecure_channel(server.address) as channel:
            login = await Caller(channel, None).auth.Login(
                auth_service_pb2.LoginRequest(
                    email=world.admin.email, password=world.admin.password
                )
            )
            admin = Caller(channel, login.access_token)
            async with engine.connect() as blocker:
                # bob's row is locked: the update below stays in flight in
                # whichever worker took this connection until we let go.
                transaction = await blocker.begin()
                await blocker.execute(
                    text("SELECT id FROM users WHERE id = :id FOR UPDATE"),
                    {"id": uuid.UUID(world.bob.id)},
                )
                in_flight = asyncio.ensure_future(
                    admin.users.UpdateUser(
                        user_service_pb2.UpdateUserRequest(
                            user=user_pb2.User(id=world.bob.id, display_name="Drained"),
                            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
                        ),
                        timeout=DEADLINE_SECONDS,
                    )
                )
                await wait_for_lock_waiter(engine)
                server.process.send_signal(signal.SIGTERM)
                await server.wait_for(
                    "every worker stopping",
                    lambda: {int(r["pid"]) for r in server.matching("stopping")} >= workers,
                )
                still_running = server.process.returncode is None
                await transaction.rollback()
            updated = await in_flight
        code = await asyncio.wait_for(server.process.wait(), DEADLINE_SECONDS)
        stopped = {int(r["pid"]) for r in server.matching("stopped") if "pid" in r}

    assert still_running
    assert updated.user.display_name == "Drained"
    assert code == 0, server.log.read_text()
    assert stopped == workers


async def test_sigterm_with_a_drain_leaves_every_worker_serving_not_serving_until_it_ends(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "USERSVC_SHUTDOWN_DRAIN_SECONDS": "300"}
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        server.process.send_signal(signal.SIGTERM)
        await server.wait_for(
            "every worker draining",
            lambda: {int(r["pid"]) for r in server.matching("draining")} >= workers,
        )
        # New connections, spread by the kernel: every worker still answers,
        # and every one says NOT_SERVING.
        answered = await answering_pids(server, workers)
        statuses = set()
        for _ in range(8):
            async with grpc.aio.insecure_channel(server.address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
            statuses.add(reply.status)
        # A second signal ends the drain (the supervisor forwards it too).
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.process.wait(), DEADLINE_SECONDS)
        stopped = {int(r["pid"]) for r in server.matching("stopped") if "pid" in r}

    assert answered == workers
    assert statuses == {health_pb2.HealthCheckResponse.NOT_SERVING}
    assert code == 0, server.log.read_text()
    assert stopped == workers


async def test_workers_refuse_a_port_someone_else_listens_on(
    env: dict[str, str], tmp_path: Path
) -> None:
    host, _, port = env["USERSVC_LISTEN_ADDR"].rpartition(":")
    with socket.socket() as squatter:
        squatter.bind((host, int(port)))
        squatter.listen()
        async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
            code = await asyncio.wait_for(server.process.wait(), DEADLINE_SECONDS)

    assert code == 1
    assert "cannot listen on" in server.log.read_text()
    assert not server.matching("worker started")


async def test_workers_need_a_fixed_port(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "USERSVC_LISTEN_ADDR": "127.0.0.1:0"}
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        code = await asyncio.wait_for(server.process.wait(), DEADLINE_SECONDS)

    assert code == 2
    assert "USERSVC_LISTEN_ADDR needs a fixed port" in server.log.read_text()


async def test_workers_serve_the_mtls_port_too(env: dict[str, str], tmp_path: Path) -> None:
    from .pki import Authority

    ca = Authority.create(tmp_path / "pki", "corp")
    server_cert = ca.server()
    orders = ca.client("orders", dns=("orders.internal",))
    mtls_port = free_port()
    env = {
        **env,
        "USERSVC_TLS_CERT_FILE": str(server_cert.cert_file),
        "USERSVC_TLS_KEY_FILE": str(server_cert.key_file),
        "USERSVC_TLS_CLIENT_CA_FILE": str(ca.cert_file),
        "USERSVC_MTLS_LISTEN_ADDR": f"127.0.0.1:{mtls_port}",
        "USERSVC_SERVICE_IDENTITIES": "orders.internal=service",
    }
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, orders.key_pem, orders.cert_pem)
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        mtls_ports = {r["mtls_port"] for r in server.matching("serving")}
        answered: set[int] = set()
        codes: set[grpc.StatusCode] = set()
        for _ in range(MAX_CONNECTIONS):
            request_id = f"mtls-{uuid.uuid4().hex}"
            async with grpc.aio.secure_channel(f"127.0.0.1:{mtls_port}", credentials) as channel:
                # As the "orders" service: allowed to look up, and nobody
                # has this address, so NOT_FOUND (not PERMISSION_DENIED).
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await Caller(channel, None).users.LookupUser(
                        user_service_pb2.LookupUserRequest(email=new_email("nobody")),
                        metadata=(("x-request-id", request_id),),
                        timeout=10,
                    )
            codes.add(failed.value.code())
            answered.add(
                await server.wait_for(
                    "the call's access line", lambda rid=request_id: answered_by(server, rid)
                )
            )
            if answered >= workers:
                break

    assert mtls_ports == {mtls_port}
    assert codes == {grpc.StatusCode.NOT_FOUND}
    assert answered == workers


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    env: dict[str, str], tmp_path: Path
) -> None:
    async with served(env, tmp_path / "serve.log", "--workers", str(WORKERS)) as server:
        workers = await server.wait_serving(WORKERS)
        server.process.kill()  # no signal to forward: the pipe tells them
        await server.process.wait()
        await server.wait_for(
            "every orphaned worker gone",
            lambda: not any(running(pid) for pid in workers),
            alive=False,
        )
        noticed = {int(r["pid"]) for r in server.matching("supervisor gone; stopping")}

    assert noticed == workers
