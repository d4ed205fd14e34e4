"""Redis for tests: the machine's shared one, and private ones that a test
may stop and start (never the shared one: other test runs use it).

The shared Redis is ``USERSVC_TEST_REDIS_URL``, else redis://127.0.0.1:6379/0
when it answers; tests needing it skip only when neither is there (CI sets
the variable, so there they fail instead). A private Redis is a
``redis-server`` subprocess on a free port of 127.0.0.1 without persistence;
``stop`` kills it, ``start`` brings it back empty on the same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

import pytest
from support.servers import free_port as _free_port

TEST_REDIS_URL_ENV = "USERSVC_TEST_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT_SECONDS = 10.0


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def shared_redis_url() -> str:
    """The shared test Redis; skips the test when there is none."""
    url = os.environ.get(TEST_REDIS_URL_ENV, "").strip()
    if url:
        return url
    if not _answers("127.0.0.1", 6379):
        pytest.skip(f"no Redis: set {TEST_REDIS_URL_ENV} or run one on 127.0.0.1:6379")
    return DEFAULT_REDIS_URL


def _redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get(TEST_REDIS_URL_ENV):
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed")
    return binary


@dataclass
class PrivateRedis:
    binary: str
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    _output: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, empty) on this port and wait until it answers.
        Raises RuntimeError when it does not within START_TIMEOUT_SECONDS."""
        # Its output, read back when it does not start.
        output = tempfile.TemporaryFile()  # noqa: SIM115 (outlives this block)
        self._output = output
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _answers("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                output.seek(0)
                said = output.read().decode(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{said}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it (no shutdown courtesy: an outage) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        if self._output is not None:
            self._output.close()
            self._output = None


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A running private Redis, killed on exit. Skips (fails in CI) when
    redis-server is not installed."""
    server = PrivateRedis(_redis_server_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()
