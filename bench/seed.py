"""The benchmark's own database: found or created, migrated, seeded once,
tidied before every run.

Which server: ``USERSVC_BENCH_DATABASE_URL`` names the database itself
(created on its server when missing); otherwise a database ``usersvc_bench``
on the server of ``USERSVC_TEST_DATABASE_URL``; otherwise the embedded
PostgreSQL under ``./.usersvc/bench-pgdata``.

Seeding writes ``rows`` users ``user<n>@seed.bench`` (n = 1..rows) with
create_time ``BASE_TIME + n ms``, so the user at any depth of the default
ordering is known without a query, plus the accounts the load runs as. It
takes one INSERT ... SELECT over generate_series per chunk, with one
precomputed bcrypt hash string for every row (nobody logs in as them). A
marker table records what was seeded; a later run that finds the same marker
reuses the rows and only tidies up after the previous run (users created by
the write scenarios, sessions, idempotency keys).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import bcrypt
from sqlalchemy.engine import make_url

from usersvc.domain.models import uuid7

from .baselines.bare import connect_kwargs

BENCH_DATABASE_URL_ENV = "USERSVC_BENCH_DATABASE_URL"
TEST_DATABASE_URL_ENV = "USERSVC_TEST_DATABASE_URL"
BENCH_DATABASE = "usersvc_bench"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_DATA_DIR = PROJECT_ROOT / ".usersvc" / "bench-pgdata"

SEED_DOMAIN = "seed.bench"
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
USER_EMAIL = f"bench-user@{SEED_DOMAIN}"
ADMIN_EMAIL = f"bench-admin@{SEED_DOMAIN}"
FLOOD_ACCOUNTS = 4
# Bumped when the seeded data changes shape, so old seeds are redone.
SEED_VERSION = 1
CHUNK_ROWS = 100_000

_MARKER_TABLE = """
CREATE TABLE IF NOT EXISTS bench_seed (
    key text PRIMARY KEY,
    rows bigint NOT NULL,
    seed_time timestamptz NOT NULL DEFAULT now()
)
"""

# A version 7 UUID from the row's create_time (48-bit Unix milliseconds, then
# random bits), like usersvc.domain.models.uuid7, so the primary key index
# grows the way it does in production.
_INSERT_CHUNK = """
INSERT INTO users (id, email, password_hash, display_name, roles, create_time, update_time)
SELECT encode(
           set_byte(
               overlay(uuid_send(gen_random_uuid())
                       placing substring(int8send((extract(epoch FROM t) * 1000)::bigint)
                                         FROM 3)
                       FROM 1 FOR 6),
               6, (get_byte(uuid_send(gen_random_uuid()), 6) & 15) | 112),
           'hex')::uuid,
       'user' || n || '@seed.bench', $3, 'Seed User ' || n, ARRAY['user'], t, t
FROM (SELECT n, $4::timestamptz + n * interval '1 millisecond' AS t
      FROM generate_series($1::bigint, $2::bigint) AS n) AS numbered
"""


@dataclass(frozen=True)
class BenchDatabase:
    """Where the benchmark's data lives. ``url`` is a postgresql+asyncpg
    URL; ``keeper`` holds the embedded server alive while the harness runs."""

    url: str
    description: str


@dataclass(frozen=True)
class Account:
    id: uuid.UUID
    email: str
    password: str


@dataclass(frozen=True)
class Seeded:
    rows: int
    reused: bool
    seconds: float
    user: Account
    admin: Account
    # Login flood accounts: one per h2load process, so that no account sees
    # enough concurrent attempts to lock itself (attempts count before the
    # password is checked).
    flood: list[Account]

    @property
    def accounts(self) -> int:
        """Users besides the seeded rows."""
        return 2 + len(self.flood)

    @staticmethod
    def email_at(depth: int) -> str:
        """The seeded user at 1-based position ``depth`` of the default
        (create_time, id) ordering."""
        return f"user{depth}@{SEED_DOMAIN}"

    @staticmethod
    def create_time_at(depth: int) -> datetime:
        return BASE_TIME + timedelta(milliseconds=depth)


def locate_database() -> BenchDatabase:
    """The benchmark database's URL (the database may not exist yet).
    Starts the embedded PostgreSQL when no server is configured. Raises
    subprocess.CalledProcessError when the embedded server cannot start."""
    url = os.environ.get(BENCH_DATABASE_URL_ENV, "").strip()
    if url:
        return BenchDatabase(url, f"{BENCH_DATABASE_URL_ENV} ({_safe(url)})")
    server = os.environ.get(TEST_DATABASE_URL_ENV, "").strip()
    if server:
        url = make_url(server).set(database=BENCH_DATABASE).render_as_string(hide_password=False)
        return BenchDatabase(url, f"{BENCH_DATABASE} on the {TEST_DATABASE_URL_ENV} server")
    from usersvc.adapters.embedded import start_embedded_postgres

    EMBEDDED_DATA_DIR.mkdir(parents=True, exist_ok=True)
    url = start_embedded_postgres(EMBEDDED_DATA_DIR, database=BENCH_DATABASE)
    return BenchDatabase(url, f"embedded PostgreSQL in {EMBEDDED_DATA_DIR}")


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


async def ensure_database_exists(url: str) -> None:
    """CREATE DATABASE when the one ``url`` names is missing, through the
    server's ``postgres`` database. Raises asyncpg errors (and OSError) when
    the server cannot be reached or refuses."""
    kwargs = connect_kwargs(url)
    name = kwargs["database"]
    try:
        connection = await asyncpg.connect(**kwargs)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(**{**kwargs, "database": "postgres"})
        try:
            # A name cannot be a bind parameter; quote it as an identifier.
            quoted = '"' + name.replace('"', '""') + '"'
            await admin.execute(f"CREATE DATABASE {quoted}")
        finally:
            await admin.close()
    else:
        await connection.close()


# Two harness runs on one database would reset each other's accounts (and
# distort each other's numbers): a run holds this advisory lock throughout.
RUN_LOCK_KEY = 0x62656E6368  # "bench"


async def hold_run_lock(url: str) -> asyncpg.Connection:
    """A connection holding the bench database's run lock, waiting for a run
    already holding it to end; close the connection to release it. Raises
    asyncpg errors and OSError."""
    await ensure_database_exists(url)
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", RUN_LOCK_KEY):
            _log("another benchmark run is using this database: waiting for it to finish")
            await connection.execute("SELECT pg_advisory_lock($1)", RUN_LOCK_KEY)
    except BaseException:
        await connection.close()
        raise
    return connection


def _log(message: str) -> None:
    print(f"[seed] {message}", file=sys.stderr, flush=True)


async def seed(url: str, rows: int) -> Seeded:
    """Migrate, seed ``rows`` users unless already there, tidy up after the
    previous run, and give the two bench accounts fresh passwords (bcrypt 12,
    what the service runs with). Raises asyncpg errors, OSError and
    alembic/SQLAlchemy errors from the migration."""
    from usersvc.adapters.migrations import upgrade_async

    started = time.perf_counter()
    await ensure_database_exists(url)
    await upgrade_async(url)
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        await connection.execute(_MARKER_TABLE)
        key = f"v{SEED_VERSION}:users={rows}"
        reused = await connection.fetchval("SELECT true FROM bench_seed WHERE key = $1", key)
        if reused:
            _log(f"reusing {rows:,} seeded users (marker {key!r})")
        else:
            await _seed_rows(connection, rows, key)
        await tidy(connection)
        user, admin, flood = await _reset_accounts(connection, rows)
    finally:
        await connection.close()
    return Seeded(rows, bool(reused), time.perf_counter() - started, user, admin, flood)


async def _seed_rows(connection: asyncpg.Connection, rows: int, key: str) -> None:
    _log(f"seeding {rows:,} users (once; later runs reuse them)")
    # Nobody logs in as the seeded users: one cheap hash for all of them.
    filler_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(4)).decode()
    await connection.execute("TRUNCATE users, idempotency_keys, session_revocations CASCADE")
    await connection.execute("DELETE FROM bench_seed")
    await connection.execute("SET synchronous_commit TO off")
    for first in range(1, rows + 1, CHUNK_ROWS):
        last = min(first + CHUNK_ROWS - 1, rows)
        began = time.perf_counter()
        await connection.execute(_INSERT_CHUNK, first, last, filler_hash, BASE_TIME)
        _log(f"  rows {first:,}..{last:,} in {time.perf_counter() - began:.1f} s")
    await connection.execute("INSERT INTO bench_seed (key, rows) VALUES ($1, $2)", key, rows)
    await connection.execute("RESET synchronous_commit")
    _log("VACUUM ANALYZE users")
    await connection.execute("VACUUM ANALYZE users")


async def tidy(connection: asyncpg.Connection) -> None:
    """Remove what earlier runs' write scenarios left: users outside the
    seed, sessions (refresh tokens go with them), revocations, idempotency
    keys, events. Raises asyncpg errors."""
    deleted = await connection.execute(
        "DELETE FROM users WHERE email NOT LIKE $1", f"%@{SEED_DOMAIN}"
    )
    await connection.execute("DELETE FROM sessions")
    await connection.execute("DELETE FROM session_revocations")
    await connection.execute("DELETE FROM idempotency_keys")
    # The events of earlier runs (every write scenario writes some), with
    # the relay's mark: no mark row means nothing published, so numbering
    # starting again from 1 stays consistent. The sequencer's floor stays:
    # transaction ids only grow.
    await connection.execute("TRUNCATE events")
    await connection.execute("DELETE FROM event_relay_mark")
    count = int(deleted.split()[-1])
    if count:
        _log(f"removed {count:,} users left by an earlier run")


async def _reset_accounts(
    connection: asyncpg.Connection, rows: int
) -> tuple[Account, Account, list[Account]]:
    wanted = [(USER_EMAIL, ["user"]), (ADMIN_EMAIL, ["user", "admin"])]
    wanted += [(flood_email(index), ["user"]) for index in range(FLOOD_ACCOUNTS)]
    passwords = ["bench " + secrets.token_urlsafe(18) for _ in wanted]
    hashes = await asyncio.gather(
        *(
            asyncio.to_thread(bcrypt.hashpw, password.encode(), bcrypt.gensalt(12))
            for password in passwords
        )
    )
    accounts = []
    for offset, ((email, roles), password, hashed) in enumerate(
        zip(wanted, passwords, hashes, strict=True), start=1
    ):
        row_id = await connection.fetchval(
            """
            INSERT INTO users (id, email, password_hash, display_name, roles,
                               create_time, update_time)
            VALUES ($1, $2, $3, $4, $5, $6, $6)
            ON CONFLICT ((lower(email))) DO UPDATE
            SET password_hash = excluded.password_hash, roles = excluded.roles,
                display_name = excluded.display_name, disable_time = NULL,
                delete_time = NULL, failed_login_count = 0, lock_count = 0,
                locked_until = NULL
            RETURNING id
            """,
            uuid7(),
            email,
            hashed.decode(),
            email.split("@")[0],
            roles,
            Seeded.create_time_at(rows + offset),
        )
        accounts.append(Account(row_id, email, password))
    return accounts[0], accounts[1], accounts[2:]


def flood_email(index: int) -> str:
    return f"bench-flood-{index}@{SEED_DOMAIN}"


async def user_at(url: str, depth: int) -> tuple[uuid.UUID, datetime]:
    """Id and create_time of the seeded user at ``depth``. Raises LookupError
    when it is missing (a seed of fewer rows), asyncpg errors."""
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        row = await connection.fetchrow(
            "SELECT id, create_time FROM users WHERE lower(email) = $1", Seeded.email_at(depth)
        )
    finally:
        await connection.close()
    if row is None:
        raise LookupError(f"no seeded user at depth {depth}")
    return row["id"], row["create_time"]


async def delete_users(url: str, domain: str) -> None:
    """Delete the users a write scenario created (emails ``...@domain``).
    Raises asyncpg errors."""
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        await connection.execute("DELETE FROM users WHERE email LIKE $1", f"%@{domain}")
    finally:
        await connection.close()


async def reset_lockouts(url: str) -> None:
    """Clear the bench accounts' failed-login counts and locks, so that each
    round starts from accounts in the same state whatever earlier rounds or
    runs left behind. Raises asyncpg errors."""
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        await connection.execute(
            "UPDATE users SET failed_login_count = 0, lock_count = 0, locked_until = NULL "
            "WHERE email LIKE $1",
            f"bench-%@{SEED_DOMAIN}",
        )
    finally:
        await connection.close()


# The tables the write scenarios change.
WRITTEN_TABLES = ("users", "events")


async def vacuum_written(url: str) -> float:
    """VACUUM (ANALYZE) the tables the write scenarios change; its seconds.
    Run before each scenario on the bench database, so that none measures
    the dead row versions an earlier one left: the bench database outlives
    runs, and a server without autovacuum (as CI's is configured) would
    keep them all. Raises asyncpg errors."""
    connection = await asyncpg.connect(**connect_kwargs(url))
    began = time.perf_counter()
    try:
        for table in WRITTEN_TABLES:
            await connection.execute(f"VACUUM (ANALYZE) {table}")
    finally:
        await connection.close()
    return time.perf_counter() - began
