"""The service behind a real PgBouncer in transaction pooling mode.

The fixtures start PgBouncer (the Debian package) on a free port of
127.0.0.1 in front of the test database, with fewer server connections than
the service's pool has clients, so consecutive transactions of one client
land on different server connections. With USERSVC_DB_TRANSACTION_POOLING
the core scenarios run concurrently without a failure; without it the same
scenario meets asyncpg's prepared-statement trap ("prepared statement ...
does not exist" / "already exists"). The revocation listener keeps its own
direct connection (USERSVC_REVOCATION_DATABASE_URL): LISTEN does not work
through a transaction pool.

Skipped only when no pgbouncer binary exists and CI is not set; CI installs
it (.ci/run) and fails here if it is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from support.servers import free_port as _free_port

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    unverified_parts,
    user_service_pb2,
)

# Fewer server connections than the service's pool has clients: a client's
# next transaction goes to whichever server connection is free.
SERVER_CONNECTIONS = 3
SERVICE_POOL_SIZE = 8
CONCURRENT_SCENARIOS = 24
START_TIMEOUT_SECONDS = 10.0
# From 1.21 PgBouncer can track protocol-level prepared statements itself;
# turned off, so the test shows what the service does, not what PgBouncer
# makes up for.
PREPARED_STATEMENT_SUPPORT = (1, 21)
PREPARED_STATEMENT_ERROR = re.compile(r"prepared statement .* (does not exist|already exists)")


@dataclass(frozen=True)
class PgBouncer:
    url: str  # SQLAlchemy asyncpg URL of the pooled database
    log: Path

    def dsn(self) -> str:
        return make_url(self.url).set(drivername="postgresql").render_as_string(False)


def pgbouncer_binary() -> str:
    """The pgbouncer executable; skips (fails in CI) when there is none."""
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed; .ci/run installs it (apt-get install)")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer); CI runs this")
    return found


def _version(binary: str) -> tuple[int, ...]:
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", output)
    assert match is not None, output
    return int(match.group(1)), int(match.group(2))


def _run_as() -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root: then it runs as postgres (or nobody)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    pytest.fail("running as root, and neither a postgres nor a nobody user exists")


def _config(database_url: str, port: int, directory: Path, binary: str) -> str:
    upstream = make_url(database_url)
    target = (
        f"host={upstream.host or '127.0.0.1'} port={upstream.port or 5432} "
        f"dbname={upstream.database} user={upstream.username or 'postgres'}"
    )
    if upstream.password:
        target += f" password={upstream.password}"
    lines = [
        "[databases]",
        f"usersvc = {target}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        "pool_mode = transaction",
        f"default_pool_size = {SERVER_CONNECTIONS}",
        "max_client_conn = 500",
        f"logfile = {directory / 'pgbouncer.log'}",
        f"pidfile = {directory / 'pgbouncer.pid'}",
    ]
    if _version(binary) >= PREPARED_STATEMENT_SUPPORT:
        lines.append("max_prepared_statements = 0")
    return "\n".join(lines) + "\n"


def _wait_until_listening(
    process: subprocess.Popen[bytes], port: int, log: Path, output: Path
) -> None:
    # Polled with a deadline: a starting process offers nothing to wait on.
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    process.kill()
    details = "\n".join(
        f"{path.name}:\n{path.read_text(errors='replace')}"
        for path in (output, log)
        if path.exists()
    )
    pytest.fail(f"pgbouncer did not start listening on {port}:\n{details or '(no output)'}")


@contextlib.contextmanager
def running_pgbouncer(database_url: str) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode in front of ``database_url``, in a
    directory of its own, stopped and deleted on exit."""
    binary = pgbouncer_binary()
    directory = Path(tempfile.mkdtemp(prefix="usersvc-pgbouncer-"))
    port = _free_port()
    upstream = make_url(database_url)
    user = upstream.username or "postgres"
    try:
        (directory / "pgbouncer.ini").write_text(_config(database_url, port, directory, binary))
        (directory / "userlist.txt").write_text(f'"{user}" ""\n')
        command = [binary, str(directory / "pgbouncer.ini")]
        account = _run_as()
        if account is not None:
            os.chmod(directory, 0o755)  # noqa: S103 (pgbouncer's user must reach it)
            for path in (directory, *directory.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
            command[1:1] = ["-u", account.pw_name]
        log = directory / "pgbouncer.log"
        # What it says before its log file is open (a config it cannot read).
        output = directory / "pgbouncer.out"
        with output.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_until_listening(process, port, log, output)
            pooled = upstream.set(host="127.0.0.1", port=port, database="usersvc", password=None)
            yield PgBouncer(url=pooled.render_as_string(hide_password=False), log=log)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def pooled_settings(e2e_settings: Any, pgbouncer: PgBouncer, *, safe: bool) -> Any:
    settings = dataclasses.replace(
        e2e_settings,
        database_url=pgbouncer.url,
        revocation_database_url=e2e_settings.database_url,
        db_transaction_pooling=safe,
        db_pool_size=SERVICE_POOL_SIZE,
        db_max_overflow=0,
    )
    if not safe:
        # Otherwise PgBouncer refuses the connection itself ("unsupported
        # startup parameter: statement_timeout") before any statement runs.
        settings = dataclasses.replace(settings, db_statement_timeout_ms=0)
    return settings


@pytest.fixture(scope="module")
def pgbouncer(database_url: str) -> Iterator[PgBouncer]:
    with running_pgbouncer(database_url) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pooled(
    pgbouncer: PgBouncer, e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    async with running_server(pooled_settings(e2e_settings, pgbouncer, safe=True), recorder) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pooled_replica(
    pgbouncer: PgBouncer, e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    async with running_server(pooled_settings(e2e_settings, pgbouncer, safe=True), recorder) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="session")
async def pooled_world(pooled: RunningServer, recorder: ResponseRecorder) -> World:
    return await World(
        user_service=pooled.container.user_service, channel=pooled.channel, recorder=recorder
    ).populate()


async def core_scenario(channel: grpc.aio.Channel, admin_token: str, world: World) -> None:
    """Sign up, log in, read, update, list, refresh, log out, delete: each
    step a call (and a transaction) of its own."""
    anonymous = Caller(channel, None)
    admin = Caller(channel, admin_token, "admin")
    request = create_request(world.recorder)
    created = await anonymous.users.CreateUser(request)
    login = await anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=request.email, password=request.password)
    )
    me = Caller(channel, login.access_token, "me")
    await me.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
    await me.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user={"id": created.user.id, "display_name": "Renamed"},
            update_mask={"paths": ["display_name"]},
        )
    )
    listed = await admin.users.ListUsers(
        user_service_pb2.ListUsersRequest(filter=f'email = "{request.email}"')
    )
    assert [user.display_name for user in listed.users] == ["Renamed"]
    refreshed = await anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=login.refresh_token)
    )
    await Caller(channel, refreshed.access_token).auth.Logout(auth_service_pb2.LogoutRequest())
    await admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=created.user.id))


async def run_scenarios(channel: grpc.aio.Channel, world: World) -> list[BaseException | None]:
    admin_token = world.admin.token or ""
    return await asyncio.gather(
        *(core_scenario(channel, admin_token, world) for _ in range(CONCURRENT_SCENARIOS)),
        return_exceptions=True,
    )


# -- with USERSVC_DB_TRANSACTION_POOLING ----------------------------------------------------------


async def test_the_core_scenarios_run_concurrently_through_pgbouncer(
    pooled: RunningServer, pooled_world: World
) -> None:
    outcomes = await run_scenarios(pooled.channel, pooled_world)

    assert [outcome for outcome in outcomes if outcome is not None] == []


async def test_concurrent_imports_of_several_batches_run_through_pgbouncer(
    pooled: RunningServer, pooled_world: World
) -> None:
    from usersvc.services.bulk_import import DEFAULT_BATCH_SIZE

    # A well-formed bcrypt hash (cost 4): only its form is checked on import.
    password_hash = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"
    count = 2 * DEFAULT_BATCH_SIZE + 1

    async def one_import(tag: int) -> user_service_pb2.ImportUsersResponse:
        async def messages() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
            for start in range(0, count, 1000):
                yield user_service_pb2.ImportUsersRequest(
                    users=[
                        user_service_pb2.ImportedUser(
                            email=f"bounced-{tag}-{n}@example.com", password_hash=password_hash
                        )
                        for n in range(start, min(start + 1000, count))
                    ]
                )

        response: user_service_pb2.ImportUsersResponse = await pooled_world.admin.users.ImportUsers(
            messages()
        )
        return response

    responses = await asyncio.gather(*(one_import(tag) for tag in range(3)))

    assert [(r.imported_count, r.failed_count) for r in responses] == [(count, 0)] * 3


async def test_no_prepared_statement_is_left_on_pgbouncer_server_connections(
    pooled: RunningServer, pooled_world: World, pgbouncer: PgBouncer
) -> None:
    await run_scenarios(pooled.channel, pooled_world)
    # One open transaction per server connection pins every one of them, so
    # together these see all the server connections the scenarios used.
    connections = [
        await asyncpg.connect(pgbouncer.dsn(), statement_cache_size=0)
        for _ in range(SERVER_CONNECTIONS)
    ]
    try:
        transactions = [connection.transaction() for connection in connections]
        for transaction in transactions:
            await transaction.start()
        backends = [await c.fetchval("SELECT pg_backend_pid()") for c in connections]
        leftovers = [
            await c.fetchval("SELECT count(*) FROM pg_prepared_statements") for c in connections
        ]
        for transaction in transactions:
            await transaction.rollback()
    finally:
        for connection in connections:
            await connection.close()

    assert len(set(backends)) == SERVER_CONNECTIONS
    assert leftovers == [0] * SERVER_CONNECTIONS


async def test_a_logout_through_pgbouncer_reaches_a_replica_through_the_revocation_url(
    pooled_world: World, pooled_replica: RunningServer
) -> None:
    session_id = unverified_parts(pooled_world.alice.token)[1]["sid"]
    replica_cache = pooled_replica.container.revocation_cache

    await pooled_world.alice.auth.Logout(auth_service_pb2.LogoutRequest())

    # Polled with a deadline: the notification has no event a test can await.
    async with asyncio.timeout(5):
        while True:
            if replica_cache.is_revoked(session_id):
                break
            await asyncio.sleep(0.02)
    assert replica_cache.is_revoked(session_id)


# -- without it ----------------------------------------------------------------------------------


def _prepared_statement_errors(records: list[logging.LogRecord]) -> list[str]:
    found = []
    for record in records:
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            match = PREPARED_STATEMENT_ERROR.search(text)
            if match:
                found.append(match.group(0))
    return found


async def test_without_the_mode_the_same_scenario_fails_on_prepared_statements(
    database_url: str,
    e2e_settings: Any,
    recorder: ResponseRecorder,
    pooled_world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    # A PgBouncer of its own: the named statements this leaves behind on
    # server connections must not reach the other tests' PgBouncer.
    with running_pgbouncer(database_url) as bouncer:
        settings = pooled_settings(e2e_settings, bouncer, safe=False)
        async with running_server(settings, recorder) as unsafe:
            outcomes = await run_scenarios(unsafe.channel, pooled_world)

    failures = [outcome for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)]
    assert failures, "every scenario succeeded without USERSVC_DB_TRANSACTION_POOLING"
    assert {failure.code() for failure in failures} == {grpc.StatusCode.INTERNAL}
    assert _prepared_statement_errors(caplog.records)
