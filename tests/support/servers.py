"""The one way the tiers start a usersvc server.

Two variants:

- ``serve_process``: ``usersvc serve`` (one process, or a supervisor with
  ``--workers``) as a subprocess, its output in a log file, SERVING (by the
  standard health service) when the block is entered unless ``wait=False``,
  stopped on exit (``stop="kill"``, children included, or ``"sigterm"``).
  Uses only the standard library, grpc and grpc_health: nothing of the
  service's Python code.
- ``in_process``: ``bootstrap`` + ``UsersvcServer.start`` on port 0 of this
  event loop, and a channel to it (interceptors of the test's choosing).

Plus what every caller of them needs: ``free_port``, ``usersvc_command``,
``serve_env`` (a clean environment: no USERSVC_ variable of the caller's
shell leaks in) and ``run_usersvc`` for the other subcommands.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "usersvc"
STARTUP_DEADLINE_SECONDS = 60.0
STOP_DEADLINE_SECONDS = 60.0
COMMAND_TIMEOUT_SECONDS = 60.0
# How often a starting process is polled; every wait has a deadline.
POLL_SECONDS = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def usersvc_command() -> list[str]:
    """The installed console script next to this interpreter; ``python -m
    usersvc`` where it is not installed (same entry point, same code)."""
    if CONSOLE_SCRIPT.exists():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "usersvc"]


def clean_environ() -> dict[str, str]:
    """This process's environment without USERSVC_ variables (and without a
    multiprocess metrics directory of a parent)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSVC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def serve_env(
    database_url: str, data_dir: Path, *, log_format: str = "json", **extra: str
) -> dict[str, str]:
    """The environment of a served process: ``database_url``, a free port,
    cheap bcrypt, unbuffered output; ``extra`` (USERSVC_... = value) last."""
    env = clean_environ()
    env.update(
        USERSVC_DATABASE_URL=database_url,
        USERSVC_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        USERSVC_DATA_DIR=str(data_dir),
        USERSVC_BCRYPT_ROUNDS="4",
        USERSVC_LOG_FORMAT=log_format,
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_usersvc(
    env: Mapping[str, str], *args: str, cwd: Path = PROJECT_ROOT,
    limit_seconds: float = COMMAND_TIMEOUT_SECONDS,
) -> Completed:  # fmt: skip
    """``usersvc *args`` to completion (killed after ``limit_seconds``)."""
    process = await asyncio.create_subprocess_exec(
        *usersvc_command(), *args, env=dict(env), cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit_seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def health_status(address: str, service: str = "", limit: float = 1.0) -> int | None:
    """The health status the server at ``address`` reports; None when it
    does not answer."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=limit
            )
        except grpc.aio.AioRpcError:
            return None
    status: int = reply.status
    return status


@dataclass
class ServeProcess:
    """A running ``usersvc serve`` and what it logged."""

    process: asyncio.subprocess.Process
    log_file: Path
    env: Mapping[str, str]

    @property
    def address(self) -> str:
        return self.env["USERSVC_LISTEN_ADDR"]

    listen_addr = address

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line logged so far (a line still being written is
        skipped)."""
        records = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def matching(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.lines()
            if r.get("msg") == msg and all(r.get(k) == v for k, v in fields.items())
        ]

    def access_lines(self) -> list[dict[str, Any]]:
        """The access log: one JSON object per call the server accepted."""
        return [r for r in self.lines() if r.get("logger") == "usersvc.access"]

    def failure(self, what: str) -> str:
        return f"{what}:\n{self.log_text()[-6000:]}"

    async def wait_for(
        self, what: str, condition: Callable[[], Any], *, alive: bool = True,
        deadline_seconds: float = STARTUP_DEADLINE_SECONDS,
    ) -> Any:  # fmt: skip
        """Poll ``condition`` until it returns something truthy (returned);
        fail after the deadline, or when the process exits while ``alive``
        is required."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        while loop.time() < deadline:
            result = condition()
            if result:
                return result
            if alive and self.process.returncode is not None:
                pytest.fail(self.failure(f"exited ({self.process.returncode}) before {what}"))
            await asyncio.sleep(POLL_SECONDS / 2)  # a poll interval, bounded above
        pytest.fail(self.failure(f"not within {deadline_seconds}s: {what}"))

    async def wait_healthy(self, deadline_seconds: float = STARTUP_DEADLINE_SECONDS) -> None:
        """Until the health service says SERVING; fails when the process
        exits first or the deadline passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        while await health_status(self.address) != SERVING:
            if self.process.returncode is not None:
                pytest.fail(self.failure(f"server exited with {self.process.returncode}"))
            if loop.time() > deadline:
                pytest.fail(self.failure(f"server not SERVING in {deadline_seconds}s"))
            await asyncio.sleep(POLL_SECONDS)  # a poll interval, bounded above

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM, limit: float = STOP_DEADLINE_SECONDS) -> int:
        """Send ``sig`` and wait for the exit code."""
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), limit)

    async def sigterm_and_wait(self, limit: float) -> tuple[int, float]:
        """SIGTERM, then the exit code and the seconds it took."""
        started = time.monotonic()
        code = await self.stop(signal.SIGTERM, limit)
        return code, time.monotonic() - started

    async def terminate(self, limit: float = STOP_DEADLINE_SECONDS) -> int:
        """SIGTERM and wait for a graceful exit; killed after ``limit``."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), limit)
            except TimeoutError:
                await self.kill()
        assert self.process.returncode is not None
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL to the process and every descendant (a supervisor's
        workers), then reap it."""
        if self.process.returncode is not None:
            return
        import psutil

        family = [psutil.Process(self.process.pid)]
        with suppress(psutil.NoSuchProcess):
            family += family[0].children(recursive=True)
        for member in reversed(family):
            with suppress(psutil.NoSuchProcess):
                member.kill()
        await self.process.wait()


@asynccontextmanager
async def serve_process(
    env: Mapping[str, str],
    log_file: Path,
    *args: str,
    wait: bool = True,
    stop: str = "kill",
    cwd: Path = PROJECT_ROOT,
    command: Sequence[str] | None = None,
    kind: type[ServeProcess] = ServeProcess,
) -> AsyncIterator[Any]:
    """``usersvc serve *args`` with ``env`` until the block ends; SERVING
    when entered unless ``wait`` is false. On exit a process still running
    is killed with its children (``stop="kill"``) or sent SIGTERM and given
    STOP_DEADLINE_SECONDS first (``stop="sigterm"``). ``kind``: a subclass
    of ServeProcess to hand out (a tier's own helpers on top)."""
    assert stop in ("kill", "sigterm"), stop
    argv = [*(command if command is not None else usersvc_command()), "serve", *args]
    with log_file.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *argv, env=dict(env), cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
        )  # fmt: skip
    served = kind(process, log_file, env)
    try:
        if wait:
            await served.wait_healthy()
        yield served
    finally:
        if stop == "sigterm":
            await served.terminate()
        else:
            await served.kill()


# ----------------------------------------------------------------- in process


@dataclass
class InProcessServer:
    """A server in this event loop, its container, and a channel to it."""

    container: Any  # usersvc.bootstrap.Container
    server: Any  # usersvc.server.UsersvcServer
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def port(self) -> int:
        port: int = self.server.port
        return port


@asynccontextmanager
async def in_process(
    settings: Any,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    **bootstrap_options: Any,
) -> AsyncIterator[InProcessServer]:
    """A real server for ``settings`` on an ephemeral port of 127.0.0.1 and
    an insecure channel to it with ``interceptors``; ``bootstrap_options``
    go to usersvc.bootstrap.bootstrap (a clock, tracing). Stopped, and its
    container closed, on exit."""
    from usersvc.bootstrap import bootstrap
    from usersvc.server import UsersvcServer

    container = bootstrap(settings, database_url=settings.database_url, **bootstrap_options)
    try:
        server = await UsersvcServer.start(container, listen_addr="127.0.0.1:0")
        try:
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{server.port}", interceptors=list(interceptors) or None
            )
            try:
                yield InProcessServer(container, server, channel)
            finally:
                await channel.close()
        finally:
            await server.stop(0)
    finally:
        await container.aclose()
