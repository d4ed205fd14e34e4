"""The servers under test, each a subprocess on a port of its own: usersvc
itself (``usersvc serve``, production settings), the bare ceilings, the
naive ORM server, and the seeds' FastAPI design (HTTP/1.1).

Nothing is pinned to a CPU: the systems share the machine's cores with
PostgreSQL and h2load the way a real deployment shares a host. Only one
system is loaded at a time; the idle ones cost a few wake-ups per second.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
USERSVC = "usersvc"
BARE = "bare"
NAIVE = "naive"
SEEDS = "fastapi"
USERSVC_BATCH = "usersvc-bcrypt4"

# Production settings except where a benchmark would measure the setting
# instead of the code: the per-caller rate limits would throttle h2load (one
# caller), and access tokens outlive a long run. Printed by the harness.
USERSVC_OVERRIDES = {
    "USERSVC_RATE_LIMIT_RPS": "1000000",
    "USERSVC_RATE_LIMIT_BURST": "1000000",
    "USERSVC_AUTH_RATE_LIMIT_RPS": "1000000",
    "USERSVC_AUTH_RATE_LIMIT_BURST": "1000000",
    "USERSVC_ACCESS_TOKEN_TTL_SECONDS": "86400",
}


class SystemFailure(RuntimeError):
    """A system under test did not start or died."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_signing_key(path: Path) -> None:
    """An Ed25519 key for the bench's usersvc (production refuses to run
    without one). Raises OSError."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.write_bytes(pem)
    path.chmod(0o600)


@dataclass
class System:
    """One server process. ``log`` collects its stderr."""

    name: str
    description: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path
    # "grpc", or "http" for the FastAPI comparison.
    protocol: str = "grpc"
    process: subprocess.Popen[bytes] | None = None
    _log_offset: int = field(default=0, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, method_path: str) -> str:
        return f"http://{self.address}{method_path}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise SystemFailure(f"{self.name} is not running")
        return self.process.pid

    def start(self) -> None:
        """Start the process. Raises OSError when it cannot be run."""
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )

    async def wait_ready(self, within: float, *, health: bool) -> None:
        """Until the port answers (the gRPC health check when ``health``).
        Raises SystemFailure when the process exits or ``within`` seconds pass."""
        deadline = time.monotonic() + within
        while True:
            self.check_alive()
            if self.protocol == "http":
                # uvicorn listens once its start-up (the engine) is done.
                try:
                    _, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", self.port), timeout=1.0
                    )
                except (TimeoutError, OSError):
                    if time.monotonic() > deadline:
                        raise SystemFailure(
                            f"{self.name} not ready after {within:.0f} s; log: {self.log}"
                        ) from None
                    await asyncio.sleep(0.2)
                    continue
                writer.close()
                return
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    await asyncio.wait_for(channel.channel_ready(), timeout=1.0)
                    if health:
                        stub = health_pb2_grpc.HealthStub(channel)
                        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                        if answer.status != health_pb2.HealthCheckResponse.SERVING:
                            raise ConnectionError("not serving yet")
                return
            except (TimeoutError, ConnectionError, grpc.aio.AioRpcError):
                if time.monotonic() > deadline:
                    raise SystemFailure(
                        f"{self.name} not ready after {within:.0f} s; log: {self.log}"
                    ) from None
                await asyncio.sleep(0.2)

    def check_alive(self) -> None:
        """Raises SystemFailure when the process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise SystemFailure(f"{self.name} exited ({code}); log: {self.log}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            # uvicorn re-raises the SIGTERM it handled once it has shut down.
            if self.protocol == "http" and self.process.returncode == -signal.SIGTERM:
                return 0
        return self.process.returncode

    def mark_log(self) -> None:
        """Remember the log's end, for ``access_codes_since_mark``."""
        self._log_offset = self.log.stat().st_size

    def access_codes_since_mark(self) -> Counter[tuple[str, str]]:
        """(method, status code) of the usersvc access-log lines written
        since ``mark_log``; empty for the baselines, which log no calls."""
        codes: Counter[tuple[str, str]] = Counter()
        with self.log.open("rb") as stream:
            stream.seek(self._log_offset)
            data = stream.read()
        for line in data.splitlines():
            if b'"logger":"usersvc.access"' not in line:
                continue
            codes[(_field(line, b"method"), _field(line, b"code"))] += 1
        return codes


def _field(line: bytes, name: bytes) -> str:
    # A substring search instead of json.loads: a run writes tens of thousands
    # of lines, and these two string fields hold no escapes.
    marker = b'"' + name + b'":"'
    start = line.find(marker)
    if start < 0:
        return "?"
    start += len(marker)
    return line[start : line.find(b'"', start)].decode(errors="replace")


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    # Settings the caller's shell happens to export (a Redis URL, a log
    # level) must not leak into the systems: every run is configured alike.
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSVC_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra)
    return env


def usersvc_system(
    *,
    name: str,
    database_url: str,
    work_dir: Path,
    bcrypt_rounds: int = 12,
    workers: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    module: str = "usersvc",
) -> System:
    """``usersvc serve`` with production settings (USERSVC_ENV=production,
    a key file, JSON access log, default interceptors, pool and limits),
    except USERSVC_OVERRIDES. ``module``: what ``python -m`` runs (a
    variant in bench.baselines). Raises OSError writing the key."""
    port = free_port()
    key = work_dir / f"{name}-jwt.pem"
    if not key.exists():
        write_signing_key(key)
    env = _child_env(
        {
            "USERSVC_ENV": "production",
            "USERSVC_DATABASE_URL": database_url,
            "USERSVC_LISTEN_ADDR": f"127.0.0.1:{port}",
            "USERSVC_JWT_PRIVATE_KEY_FILE": str(key),
            "USERSVC_BCRYPT_ROUNDS": str(bcrypt_rounds),
            "USERSVC_DATA_DIR": str(work_dir),
            **USERSVC_OVERRIDES,
            **(extra_env or {}),
        }
    )
    argv = [sys.executable, "-m", module, "serve"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    described = f"{module} serve (production settings, bcrypt {bcrypt_rounds}"
    if workers is not None:
        described += f", --workers {workers}"
    return System(
        name=name,
        description=described + ")",
        argv=argv,
        env=env,
        port=port,
        log=work_dir / f"{name}.log",
    )


def baseline_system(kind: str, *, database_url: str, work_dir: Path, pool_size: int) -> System:
    """The bare (asyncpg) or naive (ORM session per call) baseline."""
    port = free_port()
    descriptions = {
        BARE: "grpc.aio + raw asyncpg pool, one statement per call, no auth (the ceilings)",
        NAIVE: "grpc.aio + SQLAlchemy ORM session per call, no auth",
    }
    argv = [
        sys.executable,
        "-m",
        f"bench.baselines.{kind}",
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        "--pool-size",
        str(pool_size),
    ]
    return System(
        name=kind,
        description=descriptions[kind],
        argv=argv,
        env=_child_env({}),
        port=port,
        log=work_dir / f"{kind}.log",
    )


def seeds_system(*, database_url: str, work_dir: Path, pool_size: int, secret: str) -> System:
    """The seeds' design (bench/baselines/seeds.py): FastAPI + ORM under
    uvicorn, HTTP/1.1, verifying HS256 tokens signed with ``secret``."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.baselines.seeds",
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        "--pool-size",
        str(pool_size),
    ]
    return System(
        name=SEEDS,
        description="FastAPI + SQLAlchemy ORM under uvicorn (httptools, uvloop), HTTP/1.1 JSON",
        argv=argv,
        env=_child_env({"BENCH_SEEDS_SECRET": secret}),
        port=port,
        log=work_dir / f"{SEEDS}.log",
        protocol="http",
    )


@contextlib.contextmanager
def running(systems: list[System]) -> Iterator[list[System]]:
    """Start every system, stop them all on the way out."""
    try:
        for system in systems:
            system.start()
        yield systems
    finally:
        for system in systems:
            system.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far
    (``usersvc serve --workers N`` forks); NaN when it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total
    except psutil.NoSuchProcess:
        return math.nan


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (``usersvc serve
    --workers N`` forks). Raises ProcessLookupError when ``pid`` is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        total = 0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
