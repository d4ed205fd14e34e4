"""An embedded PostgreSQL for development: ``usersvc serve`` without
``USERSVC_DATABASE_URL`` runs a real PostgreSQL 16 (the ``pgserver`` package's
binaries) from a data directory, reachable only through a Unix socket.

pgserver stops the server when the last process using the data directory
exits. When run as root it runs PostgreSQL as a ``pgserver`` system user,
creating that user if needed.
"""

from __future__ import annotations

import logging
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "usersvc"
SUPERUSER = "postgres"

_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def prepare_embedded_postgres(data_dir: Path) -> str:
    """The embedded PostgreSQL of ``data_dir``, started and migrated to the
    newest revision: what ``serve`` runs on in development. Returns its URL.
    Raises what start_embedded_postgres and migrations.upgrade raise."""
    from usersvc.adapters.migrations import upgrade

    url = start_embedded_postgres(data_dir)
    upgrade(url)
    return url


def start_embedded_postgres(data_dir: Path, *, database: str = DEFAULT_DATABASE) -> str:
    """Start (or reuse) the PostgreSQL whose data lives in ``data_dir/pgdata``,
    create ``database`` there if missing, and return its SQLAlchemy URL,
    ``postgresql+asyncpg://postgres@/<database>?host=<socket dir>&port=<port>``.
    The superuser ``postgres`` may create further databases.

    Blocks for a few seconds on first start (initdb); call it through
    ``asyncio.to_thread`` from inside an event loop. Raises ValueError for a
    database name that is not a plain lower-case identifier;
    subprocess.CalledProcessError / subprocess.TimeoutExpired when PostgreSQL
    cannot be initialised or started (its log is in ``data_dir/pgdata/log``);
    OSError when ``data_dir`` cannot be created.
    """
    if not _DATABASE_NAME.fullmatch(database):
        raise ValueError(f"not a plain database name: {database!r}")
    pgserver = _import_pgserver()

    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "using the embedded PostgreSQL in %s: for development only; "
        "set USERSVC_DATABASE_URL to use a real database server",
        data_dir,
    )
    server = pgserver.get_server(data_dir / "pgdata", cleanup_mode="stop")
    info = server.get_postmaster_info()
    socket_dir = str(info.socket_dir)
    port = int(info.port or 5432)
    if not _database_exists(socket_dir, port, database):
        try:
            pgserver.createdb([*_connection_args(socket_dir, port), database])
        except subprocess.CalledProcessError:
            # Another process may have created it in the meantime.
            if not _database_exists(socket_dir, port, database):
                raise
    return URL.create(
        "postgresql+asyncpg",
        username=SUPERUSER,
        database=database,
        query={"host": socket_dir, "port": str(port)},
    ).render_as_string(hide_password=False)


def stop_embedded_postgres(data_dir: Path) -> None:
    """Let go of the embedded PostgreSQL in ``data_dir/pgdata`` now instead
    of at exit: it stops unless another process still uses it. Does nothing
    when this process never started it. Raises subprocess.CalledProcessError
    when pg_ctl fails."""
    pgserver = _import_pgserver()
    pgdata = (data_dir.expanduser().resolve() / "pgdata").resolve()
    server = pgserver.PostgresServer._instances.get(pgdata)
    if server is not None:
        server.cleanup()


def _connection_args(socket_dir: str, port: int) -> list[str]:
    return ["-h", socket_dir, "-p", str(port), "-U", SUPERUSER]


def _import_pgserver() -> Any:
    # Imported on demand: pgserver pulls in psutil, platformdirs and
    # fasteners, which a service with a database URL never needs. Its import
    # warns when XDG_RUNTIME_DIR is unset (containers, CI) and then falls back
    # to a directory under /tmp, which is fine for its lock file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import pgserver
    return pgserver


def _database_exists(socket_dir: str, port: int, database: str) -> bool:
    pgserver = _import_pgserver()

    # ``database`` matched _DATABASE_NAME, so it is safe inside the literal.
    sql = f"SELECT 1 FROM pg_database WHERE datname = '{database}'"  # noqa: S608
    output: str = pgserver.psql(
        [*_connection_args(socket_dir, port), "-d", "postgres", "-X", "-tA", "-c", sql],
        timeout=30,
    )
    return output.strip() == "1"
