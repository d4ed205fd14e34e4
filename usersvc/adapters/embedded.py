"""An embedded PostgreSQL for development: ``usersvc serve`` without
``USERSVC_DATABASE_URL`` runs a real PostgreSQL 16 (the ``pgserver`` package's
binaries) from a data directory, reachable only through a Unix socket.

pgserver stops the server when the last process using the data directory
exits. When run as root it runs PostgreSQL as a ``pgserver`` system user,
creating that user if needed. That user must be able to enter the data
directory: pgserver would make every parent directory up to ``/`` readable
and enterable by everyone to get there; we change no permission outside the
data directory and refuse with a message naming the directory in the way
instead. When the bundled binaries are out of that
user's reach (a virtualenv inside a private home), they are linked (or
copied) into ``<data_dir>/pginstall`` and run from there. Its commands run
as that user through ``runuser`` (``RunAsUser``), not subprocess's
``user=``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import warnings
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

logger = logging.getLogger(__name__)

DEFAULT_DATABASE = "usersvc"
SUPERUSER = "postgres"
# The system user pgserver runs PostgreSQL as when we are root.
SERVER_USER = "pgserver"

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
    if os.geteuid() == 0:
        _prepare_for_server_user(pgserver, data_dir)
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


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL cannot run from this data directory."""


def blocking_directory(path: Path, user: str) -> Path | None:
    """The first directory from ``/`` down to ``path`` (included) that the
    system user ``user`` may not enter; None when it can reach ``path``."""
    import grp
    import pwd

    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    for directory in (*reversed(path.parents), path):
        info = directory.stat()
        if info.st_uid == entry.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def _prepare_for_server_user(pgserver: Any, data_dir: Path) -> None:
    """As root: make sure the server user can reach the data directory
    (refuse otherwise), and can run the binaries (a copy under the data
    directory when it cannot run pgserver's own). pgserver's own permission
    fixes are turned off: they chmod every parent directory up to ``/``."""
    from pgserver import _commands, postgres_server, utils

    utils.ensure_user_exists(SERVER_USER)
    blocked = blocking_directory(data_dir, SERVER_USER)
    if blocked is not None:
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL runs as the system user {SERVER_USER!r} (PostgreSQL "
            f"refuses to run as root), which cannot enter {blocked} (mode "
            f"{stat.S_IMODE(blocked.stat().st_mode):o}) on the way to {data_dir}: run usersvc "
            "as a non-root user, set USERSVC_DATA_DIR to a directory that user can reach, "
            "or set USERSVC_DATABASE_URL"
        )
    bin_dir = Path(_commands.POSTGRES_BIN_PATH)
    if blocking_directory(bin_dir, SERVER_USER) is not None:
        bin_dir = mirror_pgserver(data_dir / "pginstall")
    # pgserver reads these module globals when it runs a binary.
    if shutil.which(RUNUSER) is not None:
        _commands.subprocess = RunAsUser()
    _commands.POSTGRES_BIN_PATH = bin_dir
    postgres_server.POSTGRES_BIN_PATH = bin_dir
    postgres_server.ensure_prefix_permissions = _within(data_dir)
    postgres_server.ensure_folder_permissions = lambda path, flag: None


RUNUSER = "runuser"


class RunAsUser:
    """The ``subprocess`` module as pgserver's command runner uses it, except
    that a command to run as another user (``user=``, which pgserver passes
    as root) runs through ``runuser -u <user> --``. With ``user=``, Python
    fork()s instead of vfork()ing, and a fork() of a process whose grpc
    threads are busy can crash the child before it reaches exec (seen in the
    test suite: initdb "died with SIGSEGV", the child's stderr a grpc
    poller's error); runuser switches users after the exec."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run, with ``user`` turned into runuser's. Raises what
        subprocess.run raises."""
        user = kwargs.pop("user", None)
        if user is not None:
            args = [RUNUSER, "-u", str(user), "--", *args]
        return subprocess.run(args, **kwargs)  # noqa: S603 (pgserver's own argv)


def _within(data_dir: Path) -> Any:
    def ensure_prefix_permissions(path: Path) -> None:
        # Instead of pgserver's chmod of every parent: the check above made
        # sure the data directory is reachable; its socket directory must be.
        blocked = blocking_directory(path, SERVER_USER)
        if blocked is not None:
            raise EmbeddedDatabaseError(
                f"{SERVER_USER!r} cannot enter {blocked} on the way to {path}"
            )

    return ensure_prefix_permissions


def mirror_pgserver(target: Path) -> Path:
    """pgserver's binaries, runnable from ``target``; returns their bin
    directory. Its binaries find their libraries at
    ``$ORIGIN/../../../pgserver.libs``, so the layout under site-packages is
    kept: ``target/pgserver/pginstall`` and ``target/pgserver.libs``. Hard
    links where the file system allows, copies otherwise; directories 0755
    (our own, under ``target``). Kept between runs; redone when incomplete."""
    from pgserver import _commands

    install = Path(_commands.POSTGRES_BIN_PATH).parent
    site = install.parents[1]
    marker = target / ".complete"
    if not marker.exists():
        for source in (install, site / "pgserver.libs"):
            if source.is_dir():
                _mirror_tree(source, target / source.relative_to(site))
        # Every directory of the mirror (made here, whatever the umask).
        for root, _, _ in os.walk(target):
            Path(root).chmod(0o755)
        marker.touch()
    return target / install.relative_to(site) / "bin"


def _mirror_tree(source: Path, target: Path) -> None:
    for root, _, files in os.walk(source):
        directory = target / Path(root).relative_to(source)
        directory.mkdir(parents=True, exist_ok=True)
        for name in files:
            destination = directory / name
            destination.unlink(missing_ok=True)
            try:
                os.link(Path(root) / name, destination, follow_symlinks=False)
            except OSError:
                shutil.copy2(Path(root) / name, destination, follow_symlinks=False)


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
