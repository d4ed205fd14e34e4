"""The service runs as a role that may only read and write its own tables
(deploy/grants.sql), while `usersvc migrate` changes the schema as the owner
through USERSVC_MIGRATION_DATABASE_URL.

One fresh database and two fresh roles for the module: grants.sql runs (with
psql, as an operator would) before the first migration, so every table the
migrations create reaches the app role through the default privileges
alone. Real servers then run the core scenarios as the app role, and the
app role's own connection proves it cannot change the schema."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from sqlalchemy.engine import URL, make_url

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    expect_error,
    unverified_parts,
    user_pb2,
    user_service_pb2,
)

ROOT = Path(__file__).resolve().parents[2]
GRANTS_SQL = ROOT / "deploy" / "grants.sql"
TABLES = {"users", "idempotency_keys", "sessions", "session_revocations", "user_codes"}


@dataclass(frozen=True)
class RestrictedDatabase:
    database: str
    owner: str
    app: str
    admin: URL  # the superuser, on this database
    owner_url: str
    app_url: str
    # Each table's privileges for the app role right after the migrations,
    # before anything could grant them explicitly.
    app_privileges: dict[str, set[str]]

    def dsn(self, url: URL | str) -> str:
        return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("psql is required to apply deploy/grants.sql (postgresql-client)")
        pytest.skip("psql not installed (Debian: postgresql-client)")
    return found


async def _run(*command: str, env: dict[str, str] | None = None) -> None:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"{command[:2]} failed:\n{output.decode(errors='replace')}"


async def apply_grants(restricted: RestrictedDatabase) -> None:
    await _run(
        _psql(),
        restricted.dsn(restricted.admin),
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        f"owner_role={restricted.owner}",
        "-v",
        f"app_role={restricted.app}",
        "-f",
        str(GRANTS_SQL),
    )


async def _table_privileges(admin_dsn: str, role: str) -> dict[str, set[str]]:
    connection = await asyncpg.connect(admin_dsn)
    try:
        rows = await connection.fetch(
            "SELECT c.relname, a.privilege_type FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN LATERAL aclexplode(c.relacl) a "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' "
            "AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = $1)",
            role,
        )
    finally:
        await connection.close()
    privileges: dict[str, set[str]] = {}
    for row in rows:
        privileges.setdefault(row["relname"], set()).add(row["privilege_type"])
    return privileges


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def restricted(pg_server_url: str) -> AsyncIterator[RestrictedDatabase]:
    suffix = secrets.token_hex(4)
    server = make_url(pg_server_url)
    database = f"usersvc_lp_{suffix}"
    owner, app = f"usersvc_owner_{suffix}", f"usersvc_app_{suffix}"
    passwords = {owner: secrets.token_urlsafe(16), app: secrets.token_urlsafe(16)}
    admin = server.set(database=database)
    server_dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()

    def role_url(role: str) -> str:
        url = admin.set(username=role, password=passwords[role])
        return url.render_as_string(hide_password=False)

    restricted = RestrictedDatabase(
        database=database,
        owner=owner,
        app=app,
        admin=admin,
        owner_url=role_url(owner),
        app_url=role_url(app),
        app_privileges={},
    )
    try:
        await apply_grants(restricted)
        connection = await asyncpg.connect(restricted.dsn(admin))
        try:
            for role, password in passwords.items():
                # A password, so the roles log in whatever pg_hba.conf asks.
                await connection.execute(f"ALTER ROLE \"{role}\" PASSWORD '{password}'")
        finally:
            await connection.close()
        await _run(
            sys.executable,
            "-m",
            "usersvc",
            "migrate",
            env={
                **os.environ,
                "USERSVC_DATABASE_URL": restricted.app_url,
                "USERSVC_MIGRATION_DATABASE_URL": restricted.owner_url,
            },
        )
        privileges = await _table_privileges(restricted.dsn(admin), app)
        yield dataclasses.replace(restricted, app_privileges=privileges)
    finally:
        connection = await asyncpg.connect(server_dsn)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await connection.execute(f'DROP ROLE IF EXISTS "{app}"')
            await connection.execute(f'DROP ROLE IF EXISTS "{owner}"')
        finally:
            await connection.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app_server(
    restricted: RestrictedDatabase, e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(
        e2e_settings,
        database_url=restricted.app_url,
        migration_database_url=restricted.owner_url,
    )
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app_replica(
    restricted: RestrictedDatabase, e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    settings = dataclasses.replace(e2e_settings, database_url=restricted.app_url)
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def app_world(app_server: RunningServer, recorder: ResponseRecorder) -> World:
    return await World(
        user_service=app_server.container.user_service,
        channel=app_server.channel,
        recorder=recorder,
    ).populate()


async def _as_app(restricted: RestrictedDatabase) -> Any:
    return await asyncpg.connect(restricted.dsn(restricted.app_url))


# -- roles and ownership --------------------------------------------------------------------


async def test_usersvc_migrate_creates_every_table_as_the_owner_role(
    restricted: RestrictedDatabase,
) -> None:
    connection = await asyncpg.connect(restricted.dsn(restricted.admin))
    try:
        rows = await connection.fetch(
            "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'"
        )
    finally:
        await connection.close()

    owners = {row["tablename"]: row["tableowner"] for row in rows}
    assert set(owners) >= TABLES
    assert set(owners.values()) == {restricted.owner}


async def test_the_default_privileges_alone_give_the_app_role_read_and_write(
    restricted: RestrictedDatabase,
) -> None:
    expected = {"SELECT", "INSERT", "UPDATE", "DELETE"}

    assert {table: restricted.app_privileges.get(table) for table in TABLES} == {
        table: expected for table in TABLES
    }


async def test_the_app_role_holds_no_power_beyond_its_grants(
    restricted: RestrictedDatabase,
) -> None:
    connection = await asyncpg.connect(restricted.dsn(restricted.admin))
    try:
        role = await connection.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = $1",
            restricted.app,
        )
        may_create = await connection.fetchval(
            "SELECT has_schema_privilege($1, 'public', 'CREATE') "
            "OR has_database_privilege($1, current_database(), 'CREATE') "
            "OR has_database_privilege($1, current_database(), 'TEMPORARY')",
            restricted.app,
        )
    finally:
        await connection.close()

    assert not any(role.values())
    assert may_create is False


# -- the service works as the app role --------------------------------------------------------


async def test_a_user_signs_up_logs_in_and_reads_itself_as_the_app_role(
    app_world: World,
) -> None:
    request = create_request(app_world.recorder)
    created = await app_world.anonymous.users.CreateUser(request)
    login = await app_world.anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=request.email, password=request.password)
    )
    me = Caller(app_world.channel, login.access_token, "new user")

    reply = await me.users.GetUser(user_service_pb2.GetUserRequest(id="me"))

    assert reply.user.id == created.user.id


async def test_an_admin_updates_lists_deletes_and_purges_users_as_the_app_role(
    app_world: World,
) -> None:
    users = app_world.admin.users
    updated = await users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user={"id": app_world.bob.id, "display_name": "Robert"},
            update_mask={"paths": ["display_name"]},
        )
    )
    listed = await users.ListUsers(
        user_service_pb2.ListUsersRequest(filter='display_name = "Robert"')
    )
    deleted = await users.DeleteUser(user_service_pb2.DeleteUserRequest(id=app_world.bob.id))
    await users.PurgeUser(user_service_pb2.PurgeUserRequest(id=app_world.bob.id))

    assert updated.user.display_name == "Robert"
    assert [user.id for user in listed.users] == [app_world.bob.id]
    assert deleted.user.state == deleted.user.STATE_DELETED


async def test_an_admin_imports_users_as_the_app_role(app_world: World) -> None:
    # A well-formed bcrypt hash (cost 4): only its form is checked on import.
    password_hash = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"
    taken = user_service_pb2.ImportedUser(email=app_world.bob.email, password_hash=password_hash)
    fresh = user_service_pb2.ImportedUser(
        email=f"imported-{secrets.token_hex(4)}@example.com", password_hash=password_hash
    )

    async def messages() -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
        yield user_service_pb2.ImportUsersRequest(users=[fresh, taken])

    response = await app_world.admin.users.ImportUsers(messages())

    assert (response.imported_count, [e.reason for e in response.errors]) == (
        1,
        ["EMAIL_ALREADY_EXISTS"],
    )


async def test_refresh_and_logout_work_as_the_app_role(app_world: World) -> None:
    refreshed = await app_world.anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=app_world.alice.login.refresh_token)
    )
    session = Caller(app_world.channel, refreshed.access_token, "alice again")

    await session.auth.Logout(auth_service_pb2.LogoutRequest())

    await expect_error(
        session.users.GetUser(user_service_pb2.GetUserRequest(id="me")),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )


async def test_codes_and_batch_writes_work_as_the_app_role(app_world: World) -> None:
    users = app_world.admin.users
    verification = await users.CreateEmailVerificationCode(
        user_service_pb2.CreateEmailVerificationCodeRequest(id=app_world.alice.id)
    )
    verified = await app_world.alice.users.VerifyEmail(
        user_service_pb2.VerifyEmailRequest(id="me", code=verification.code)
    )
    reset = await users.CreatePasswordResetCode(
        user_service_pb2.CreatePasswordResetCodeRequest(email=app_world.bob.email)
    )
    await app_world.anonymous.users.ResetPassword(
        user_service_pb2.ResetPasswordRequest(
            email=app_world.bob.email, code=reset.code, new_password="Reset-as-app-role-1"
        )
    )
    renamed = await users.BatchUpdateUsers(
        user_service_pb2.BatchUpdateUsersRequest(
            requests=[
                user_service_pb2.UpdateUserRequest(
                    user={"id": app_world.alice.id, "display_name": "Batched"}
                )
            ]
        )
    )
    deleted = await users.BatchDeleteUsers(
        user_service_pb2.BatchDeleteUsersRequest(
            requests=[user_service_pb2.DeleteUserRequest(id=app_world.bob.id)]
        )
    )

    assert verified.user.email_verified
    assert renamed.users[0].display_name == "Batched"
    assert deleted.users[0].state == user_pb2.User.STATE_DELETED


async def test_a_logout_reaches_a_replica_through_listen_as_the_app_role(
    app_world: World, app_replica: RunningServer
) -> None:
    session_id = unverified_parts(app_world.alice.token)[1]["sid"]
    replica_cache = app_replica.container.revocation_cache

    await app_world.alice.auth.Logout(auth_service_pb2.LogoutRequest())

    # Polled with a deadline: the notification has no event a test can await.
    async with asyncio.timeout(5):
        while True:
            if replica_cache.is_revoked(session_id):
                break
            await asyncio.sleep(0.02)

    assert replica_cache.is_revoked(session_id)


async def test_the_revocation_listener_connects_as_the_app_role(
    restricted: RestrictedDatabase, app_server: RunningServer
) -> None:
    pid = app_server.container.revocation_listener.server_pid
    connection = await asyncpg.connect(restricted.dsn(restricted.admin))
    try:
        role = await connection.fetchval("SELECT usename FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await connection.close()

    assert role == restricted.app


# -- the app role cannot change the schema ----------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE users",
        "ALTER TABLE users ADD COLUMN intruder integer",
        "CREATE TABLE intruder (id integer)",
        "TRUNCATE users",
        "CREATE TEMPORARY TABLE intruder (id integer)",
        "CREATE SCHEMA intruder",
        "CREATE INDEX intruder ON users (display_name)",
        "CREATE FUNCTION intruder() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "DROP SCHEMA public CASCADE",
    ],
)
async def test_the_app_role_may_not(restricted: RestrictedDatabase, statement: str) -> None:
    connection = await _as_app(restricted)
    try:
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await connection.execute(statement)
    finally:
        await connection.close()


async def test_rerunning_the_grants_after_a_migration_makes_alembic_version_read_only(
    restricted: RestrictedDatabase,
) -> None:
    await apply_grants(restricted)
    connection = await _as_app(restricted)
    try:
        version = await connection.fetchval("SELECT version_num FROM alembic_version")
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await connection.execute("UPDATE alembic_version SET version_num = version_num")
    finally:
        await connection.close()

    assert version
