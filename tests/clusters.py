"""Private PostgreSQL clusters for tests that must stop, restart or
reconfigure a database server: never the machine's shared one, which other
tests (and other test runs) are using.

A cluster lives in a fresh directory under /tmp, listens on a free port of
127.0.0.1 (and on a Unix socket in its own directory, which pg_ctl uses to
see that it is ready), trusts every local connection, and is deleted when
its context manager exits:

    with private_cluster() as cluster:
        engine = create_engine(settings, cluster.url)
        cluster.stop()
        ...
        cluster.start()

Binaries: pgserver's bundle (a dependency of the service) or the machine's
/usr/lib/postgresql/*/bin; ``require_tls`` picks one built with OpenSSL.
PostgreSQL refuses to run as root: as root, the cluster runs as the
``postgres`` or ``pgserver`` system user, through ``runuser`` rather than
subprocess's ``user=``: that makes Python fork() instead of vfork(), and a
fork() of a process whose grpc threads are busy can crash the child before
it reaches exec (seen here: pg_ctl "died with SIGSEGV"). Only binaries that
user can reach are picked: a clone inside a private directory (``mktemp
-d``, /root) keeps its .venv out of reach, and then the machine's binaries
serve, or else a linked copy of pgserver's in the cluster's own directory.
No permission outside that directory is changed.

Every failing command raises CommandFailed (a CalledProcessError) whose
message carries the command's stderr and the server's log.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.servers import free_port as free_port

from usersvc.adapters.embedded import blocking_directory, mirror_pgserver

SUPERUSER = "postgres"
MAINTENANCE_DATABASE = "postgres"
START_TIMEOUT_SECONDS = 30
DEFAULT_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


def _pgserver_bin_dir() -> Path | None:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _candidate_bin_dirs() -> list[Path]:
    bundled = _pgserver_bin_dir()
    machine = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return [bundled, *machine] if bundled is not None else machine


def _has_tls(bin_dir: Path) -> bool:
    configure = subprocess.run(
        [str(bin_dir / "pg_config"), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def postgres_binaries(*, require_tls: bool = False, user: str | None = None) -> Path | None:
    """A PostgreSQL bin directory with initdb and pg_ctl (built with OpenSSL
    when ``require_tls``) that the system user ``user`` (None: ourselves)
    can reach: pgserver's bundle first, then the machine's newest. None when
    there is none."""
    for bin_dir in _usable_bin_dirs(require_tls=require_tls):
        if user is None or blocking_directory(bin_dir, user) is None:
            return bin_dir
    return None


def _usable_bin_dirs(*, require_tls: bool) -> list[Path]:
    return [
        bin_dir
        for bin_dir in _candidate_bin_dirs()
        if all((bin_dir / name).exists() for name in ("initdb", "pg_ctl", "pg_config"))
        and not (require_tls and not _has_tls(bin_dir))
    ]


def _binaries_for(user: str | None, base: Path, *, require_tls: bool) -> Path | None:
    """Binaries ``user`` can run: reachable ones, else pgserver's linked
    into ``base/pginstall`` (which the user owns); None when neither."""
    reachable = postgres_binaries(require_tls=require_tls, user=user)
    if reachable is not None:
        return reachable
    if _pgserver_bin_dir() not in _usable_bin_dirs(require_tls=require_tls):
        return None
    return mirror_pgserver(base / "pginstall")


def server_user() -> str | None:
    """The system user to run PostgreSQL as: None when not root. Skips the
    test when running as root without a 'postgres' or 'pgserver' user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("running as root and no 'postgres' or 'pgserver' user to run PostgreSQL as")


class CommandFailed(subprocess.CalledProcessError):
    """A cluster command that failed, with what it and the server said."""

    def __init__(self, failed: subprocess.CalledProcessError, server_log: str = "") -> None:
        super().__init__(failed.returncode, failed.cmd, failed.output, failed.stderr)
        self.server_log = server_log

    def __str__(self) -> str:
        def text(value: bytes | str | None) -> str:
            if isinstance(value, bytes):
                return value.decode(errors="replace")
            return value or ""

        parts = [super().__str__()]
        for name, value in (("stderr", self.stderr), ("stdout", self.output)):
            if text(value).strip():
                parts.append(f"{name}:\n{text(value).strip()[-4000:]}")
        if self.server_log.strip():
            parts.append(f"server log:\n{self.server_log.strip()[-4000:]}")
        return "\n".join(parts)


def run(argv: list[str], server_log: Callable[[], str] = str) -> None:
    """Run a cluster command; CommandFailed (with its stderr) when it fails."""
    try:
        subprocess.run(argv, check=True, capture_output=True)
    except subprocess.CalledProcessError as failed:
        raise CommandFailed(failed, server_log()) from None


@dataclass
class PostgresCluster:
    """A PostgreSQL server of our own; ``start``/``stop``/``restart`` it at
    will. Its superuser is ``postgres`` (trusted, no password)."""

    bin_dir: Path
    base: Path  # holds data/, the socket and the log
    port: int
    user: str | None  # the system user it runs as (None: ourselves)

    def command(self, program: str, *args: str) -> list[str]:
        """The argv that runs one of the cluster's binaries as its user."""
        run_as = [] if self.user is None else ["runuser", "-u", self.user, "--"]
        return [*run_as, str(self.bin_dir / program), *args]

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database over TCP."""
        return self.url_for(MAINTENANCE_DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        run(self.command("pg_ctl", "-D", str(self.data_dir), *args), self.log)

    def start(self) -> None:
        """Start and wait until it accepts connections. Raises
        CommandFailed (with pg_ctl's stderr and the server's log)."""
        self._pg_ctl("-l", str(self.log_file), "-w", "-t", str(START_TIMEOUT_SECONDS), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop and wait until it is gone: ``fast`` rolls back open
        transactions and checkpoints; ``immediate`` is a crash (recovery
        replays the WAL at the next start). Raises CommandFailed."""
        self._pg_ctl("-m", mode, "-w", "-t", str(START_TIMEOUT_SECONDS), "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop, then start again on the same port."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        status = subprocess.run(
            self.command("pg_ctl", "-D", str(self.data_dir), "status"),
            check=False,
            capture_output=True,
        )
        return status.returncode == 0

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


@contextmanager
def private_cluster(
    *,
    require_tls: bool = False,
    settings: Mapping[str, str] | None = None,
    hba: str = DEFAULT_HBA,
    owned_files: tuple[Path, ...] = (),
    base: Path | None = None,
) -> Iterator[PostgresCluster]:
    """A started private cluster, stopped and deleted on exit.

    ``settings`` go to postgresql.conf (values written as given, so quote
    strings: ``{"ssl_cert_file": "'/x/server.crt'"}``); ``hba`` replaces
    pg_hba.conf; ``owned_files`` (certificates and keys, say) are handed to
    the server's user when it runs as another one. ``base`` is an empty
    directory to use (made under /tmp otherwise: pytest's tmp_path is not
    enterable by the server's user). Skips the test when no suitable
    binaries exist. Raises CommandFailed (a CalledProcessError carrying the
    command's stderr and the server's log) when initdb or the start fails.
    """
    if not _usable_bin_dirs(require_tls=require_tls):
        what = "built with OpenSSL " if require_tls else ""
        pytest.skip(f"no PostgreSQL binaries {what}on this machine")
    user = server_user()
    base = base if base is not None else Path(tempfile.mkdtemp(prefix="usersvc-pg-"))
    try:
        if user is not None:
            # base itself is handed to the user below.
            blocked = blocking_directory(base.parent, user)
            if blocked is not None:
                raise RuntimeError(
                    f"{user!r} cannot enter {blocked} on the way to the cluster's directory {base}"
                )
        bin_dir = _binaries_for(user, base, require_tls=require_tls)
        if bin_dir is None:
            pytest.skip(f"no PostgreSQL binaries the user {user!r} can run")
        cluster = PostgresCluster(bin_dir=bin_dir, base=base, port=free_port(), user=user)
        if user is not None:
            for path in (base, *owned_files):
                shutil.chown(path, user=user)
        run(cluster.command("initdb", "-D", str(cluster.data_dir), "-U", SUPERUSER,
                            "--auth=trust", "--encoding=UTF8", "--no-sync"))  # fmt: skip
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(cluster.port),
            "unix_socket_directories": f"'{base}'",
            # Test data need not survive a power cut; a crash of the server
            # alone (stop -m immediate) still loses nothing committed.
            "fsync": "off",
            **(settings or {}),
        }
        with (cluster.data_dir / "postgresql.conf").open("a") as file:
            file.writelines(f"{name} = {value}\n" for name, value in conf.items())
        (cluster.data_dir / "pg_hba.conf").write_text(hba)
        cluster.start()
        try:
            yield cluster
        finally:
            if cluster.is_running():
                cluster.stop("immediate")
    finally:
        shutil.rmtree(base, ignore_errors=True)
