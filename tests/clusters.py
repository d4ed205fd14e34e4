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
it reaches exec (seen here: pg_ctl "died with SIGSEGV").
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "postgres"
MAINTENANCE_DATABASE = "postgres"
START_TIMEOUT_SECONDS = 30
DEFAULT_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _candidate_bin_dirs() -> list[Path]:
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return candidates


def _has_tls(bin_dir: Path) -> bool:
    configure = subprocess.run(
        [str(bin_dir / "pg_config"), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def postgres_binaries(*, require_tls: bool = False) -> Path | None:
    """A PostgreSQL bin directory with initdb and pg_ctl (built with OpenSSL
    when ``require_tls``): pgserver's bundle first, then the machine's
    newest. None when there is none."""
    for bin_dir in _candidate_bin_dirs():
        if not all((bin_dir / name).exists() for name in ("initdb", "pg_ctl", "pg_config")):
            continue
        if require_tls and not _has_tls(bin_dir):
            continue
        return bin_dir
    return None


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

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.command("pg_ctl", "-D", str(self.data_dir), *args),
            check=check,
            capture_output=True,
        )

    def start(self) -> None:
        """Start and wait until it accepts connections. Raises
        subprocess.CalledProcessError (its log says why)."""
        self._pg_ctl("-l", str(self.log_file), "-w", "-t", str(START_TIMEOUT_SECONDS), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop and wait until it is gone: ``fast`` rolls back open
        transactions and checkpoints; ``immediate`` is a crash (recovery
        replays the WAL at the next start). Raises CalledProcessError."""
        self._pg_ctl("-m", mode, "-w", "-t", str(START_TIMEOUT_SECONDS), "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop, then start again on the same port."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        return self._pg_ctl("status", check=False).returncode == 0

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
    binaries exist. Raises subprocess.CalledProcessError when initdb or the
    start fails.
    """
    bin_dir = postgres_binaries(require_tls=require_tls)
    if bin_dir is None:
        what = "built with OpenSSL " if require_tls else ""
        pytest.skip(f"no PostgreSQL binaries {what}on this machine")
    user = server_user()
    base = base if base is not None else Path(tempfile.mkdtemp(prefix="usersvc-pg-"))
    cluster = PostgresCluster(bin_dir=bin_dir, base=base, port=free_port(), user=user)
    try:
        if user is not None:
            for path in (base, *owned_files):
                shutil.chown(path, user=user)
        subprocess.run(
            cluster.command("initdb", "-D", str(cluster.data_dir), "-U", SUPERUSER,
                            "--auth=trust", "--encoding=UTF8", "--no-sync"),
            check=True, capture_output=True,
        )  # fmt: skip
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
