"""The ``usersvc`` command as operators and scripts run it: real
subprocesses against the test database."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from log_secrets import SWEEP
from sqlalchemy import text
from support.servers import CONSOLE_SCRIPT as CONSOLE_SCRIPT
from support.servers import PROJECT_ROOT as PROJECT_ROOT
from support.servers import STARTUP_DEADLINE_SECONDS as STARTUP_DEADLINE_SECONDS
from support.servers import Completed, free_port, run_usersvc, serve_env, serve_process
from support.servers import usersvc_command as usersvc_command

from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    new_email,
    new_password,
    user_pb2,
    user_service_pb2,
)

COMMAND_TIMEOUT_SECONDS = 60.0


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


class Usersvc:
    """Runs ``usersvc`` subcommands with a given environment (through
    tests/support/servers.py); every output is swept for secrets."""

    def __init__(self, env: Mapping[str, str]):
        self.env = dict(env)

    def with_env(self, **extra: str) -> Usersvc:
        return Usersvc({**self.env, **extra})

    @property
    def listen_addr(self) -> str:
        return self.env["USERSVC_LISTEN_ADDR"]

    async def run(self, *args: str) -> Completed:
        result = await run_usersvc(self.env, *args, limit_seconds=COMMAND_TIMEOUT_SECONDS)
        SWEEP.ledger.add_environment(self.env)
        SWEEP.add_text(f"usersvc {args[0] if args else ''}", f"{result.stdout}\n{result.stderr}")
        return result

    @asynccontextmanager
    async def serving(self, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
        """``usersvc serve`` in the background, SERVING when entered; killed
        on exit if a test left it running. The log is swept for secrets
        after the test (it lies in the test's tmp_path)."""
        SWEEP.ledger.add_environment(self.env)
        async with serve_process(self.env, log) as served:
            yield served.process


@pytest.fixture
def usersvc(database_url: str, tmp_path: Path) -> Usersvc:
    return Usersvc(serve_env(database_url, tmp_path / "data", log_format="text"))


# ----------------------------------------------------------------- migrate


async def test_migrate_exits_zero_on_an_up_to_date_database(usersvc: Usersvc) -> None:
    result = await usersvc.run("migrate")

    assert result.returncode == 0, result.stderr


async def test_migrate_builds_the_schema_of_an_empty_database(
    usersvc: Usersvc, empty_database_url: str
) -> None:
    fresh = usersvc.with_env(USERSVC_DATABASE_URL=empty_database_url)

    migrated = await fresh.run("migrate")
    admin = await fresh.with_env(USERSVC_ADMIN_PASSWORD="Fresh-schema-9!").run(
        "create-admin", "--email", new_email("fresh")
    )

    assert migrated.returncode == 0, migrated.stderr
    assert admin.returncode == 0, admin.stderr


# ----------------------------------------------------------------- create-admin


async def test_create_admin_creates_an_admin_who_can_log_in(usersvc: Usersvc, world: World) -> None:
    email, password = new_email("operator"), new_password(world.recorder)

    result = await usersvc.with_env(USERSVC_ADMIN_PASSWORD=password).run(
        "create-admin", "--email", email
    )
    login = await world.login(email, password)

    assert result.returncode == 0, result.stderr
    assert "admin" in login.user.roles


async def test_create_admin_grants_admin_to_an_existing_user(
    usersvc: Usersvc, world: World
) -> None:
    result = await usersvc.with_env(USERSVC_ADMIN_PASSWORD=new_password(world.recorder)).run(
        "create-admin", "--email", world.bob.email
    )
    login = await world.login(world.bob.email, world.bob.password)

    assert result.returncode == 0, result.stderr
    assert login.user.id == world.bob.id
    assert {"user", "admin"} <= set(login.user.roles)


async def test_create_admin_serves_nothing_so_reads_no_tls_files(
    usersvc: Usersvc, world: World, tmp_path: Path
) -> None:
    email, password = new_email("no-tls"), new_password(world.recorder)

    result = await usersvc.with_env(
        USERSVC_ADMIN_PASSWORD=password,
        USERSVC_TLS_CERT_FILE=str(tmp_path / "absent-cert.pem"),
        USERSVC_TLS_KEY_FILE=str(tmp_path / "absent-key.pem"),
    ).run("create-admin", "--email", email)
    login = await world.login(email, password)

    assert result.returncode == 0, result.stderr
    assert "admin" in login.user.roles


async def test_create_admin_without_a_password_or_terminal_exits_2(usersvc: Usersvc) -> None:
    result = await usersvc.run("create-admin", "--email", new_email("nopass"))

    assert result.returncode == 2
    assert "USERSVC_ADMIN_PASSWORD" in result.stderr


# ----------------------------------------------------------------- settings / healthcheck


async def test_invalid_setting_exits_2_naming_the_variable(usersvc: Usersvc) -> None:
    result = await usersvc.with_env(USERSVC_BCRYPT_ROUNDS="3").run("serve")

    assert result.returncode == 2
    assert "USERSVC_BCRYPT_ROUNDS" in result.stderr


async def test_healthcheck_against_a_closed_port_exits_non_zero(usersvc: Usersvc) -> None:
    result = await usersvc.with_env(USERSVC_LISTEN_ADDR=f"127.0.0.1:{free_port()}").run(
        "healthcheck", "--timeout", "2"
    )

    assert result.returncode != 0


# ----------------------------------------------------------------- serve


async def test_serve_becomes_serving_and_exits_0_on_sigterm(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    async with usersvc.serving(tmp_path / "serve.log") as server:
        healthy = await usersvc.run("healthcheck")
        server.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(server.wait(), COMMAND_TIMEOUT_SECONDS)

    assert healthy.returncode == 0
    assert healthy.stdout.strip() == "SERVING"
    assert code == 0, (tmp_path / "serve.log").read_text()


async def test_a_native_crash_of_serve_leaves_every_threads_python_stack_in_its_log(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    # A segmentation fault stands in for a crash inside grpc's core or a
    # driver: the log must say where the Python threads were.
    log = tmp_path / "serve.log"
    async with usersvc.serving(log) as server:
        server.send_signal(signal.SIGSEGV)
        code = await asyncio.wait_for(server.wait(), COMMAND_TIMEOUT_SECONDS)

    text = log.read_text()
    assert code == -signal.SIGSEGV
    assert "Fatal Python error: Segmentation fault" in text
    assert "most recent call first" in text


async def test_served_process_answers_logins_with_its_own_key(
    usersvc: Usersvc, world: World, tmp_path: Path
) -> None:
    async with (
        usersvc.serving(tmp_path / "serve.log"),
        grpc.aio.insecure_channel(usersvc.listen_addr) as channel,
    ):
        login = await Caller(channel, None).auth.Login(
            auth_service_pb2.LoginRequest(email=world.alice.email, password=world.alice.password)
        )
        me = await Caller(channel, login.access_token).users.GetUser(
            user_service_pb2.GetUserRequest(id="me")
        )

    assert me.user.id == world.alice.id


async def wait_for_lock_waiter(engine: Any) -> None:
    """Poll pg_stat_activity until some backend of this database waits on a
    lock, i.e. the server's UPDATE is blocked behind our row lock."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    for _ in range(1500):
        async with engine.connect() as connection:
            if (await connection.execute(query)).scalar_one() > 0:
                return
        await asyncio.sleep(0.02)  # a poll interval, bounded by the loop above
    pytest.fail("the server's call never reached the database")


async def wait_for_refusal(address: str) -> grpc.StatusCode:
    """New calls during the drain are refused; retried briefly because the
    health flip precedes the listener closing by a moment."""
    code = grpc.StatusCode.OK
    for _ in range(50):
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await Caller(channel, None).auth.GetJwks(
                    auth_service_pb2.GetJwksRequest(), timeout=2
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
    return code


async def test_sigterm_drains_an_in_flight_call_then_exits_0(
    usersvc: Usersvc, world: World, engine: Any, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    server_env = usersvc.with_env(
        USERSVC_SHUTDOWN_GRACE_SECONDS="60", USERSVC_DB_STATEMENT_TIMEOUT_MS="120000"
    )
    async with (
        server_env.serving(log) as server,
        grpc.aio.insecure_channel(server_env.listen_addr) as channel,
    ):
        login = await Caller(channel, None).auth.Login(
            auth_service_pb2.LoginRequest(email=world.admin.email, password=world.admin.password)
        )
        admin = Caller(channel, login.access_token)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=COMMAND_TIMEOUT_SECONDS
        )
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        # A concurrent transaction holds bob's row: the update below is a
        # genuinely slow call, in flight until we let go.
        async with engine.connect() as blocker:
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
                    timeout=COMMAND_TIMEOUT_SECONDS,
                )
            )
            await wait_for_lock_waiter(engine)

            server.send_signal(signal.SIGTERM)
            status = (await watch.read()).status
            refused = await wait_for_refusal(server_env.listen_addr)
            watch.cancel()
            still_running = server.returncode is None
            await transaction.rollback()

        updated = await in_flight
        code = await asyncio.wait_for(server.wait(), COMMAND_TIMEOUT_SECONDS)

    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert still_running
    assert updated.user.display_name == "Drained"
    assert code == 0, log.read_text()
