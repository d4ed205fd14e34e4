"""``usersvc serve --workers N``: N server processes on one port.

grpc is not fork-safe once its core threads run, and the embedded
PostgreSQL's initdb has crashed (SIGSEGV) when started from a process that
already had them. So this supervisor never imports grpc. It does once what
must happen once (the embedded PostgreSQL and its migrations, the development
signing key, the metrics directory), checks that nobody else listens on the
port(s), then starts each worker as a fresh interpreter
(``python -m usersvc serve --worker I``, never a fork). The workers bind the
same port(s) with SO_REUSEPORT, so the kernel spreads connections over them,
and each has its own connection pool.

The supervisor forwards SIGTERM/SIGINT (every worker drains) and SIGHUP (key
reload) to all workers, replaces a worker that dies unexpectedly (with a
growing delay, giving up when workers keep crashing), and exits when the
workers have stopped: 0 when all of them stopped cleanly. Workers hold the
read end of a pipe whose write end only the supervisor has: if the supervisor
dies, even by SIGKILL, they see end of file and stop too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from usersvc.config import Settings, split_host_port

logger = logging.getLogger("usersvc.supervisor")

# Beyond the workers' own stop (USERSVC_SHUTDOWN_DRAIN_SECONDS, then
# USERSVC_SHUTDOWN_GRACE_SECONDS for the calls in flight), how long
# they get to close their pools before they are killed.
STOP_MARGIN_SECONDS = 15.0


@dataclass(frozen=True)
class RestartPolicy:
    """When and how often a dead worker is replaced."""

    # The first restart of a slot waits this long, each consecutive one
    # twice as long, up to max_delay.
    first_delay: float = 0.5
    max_delay: float = 10.0
    # A worker that served this long before dying starts the doubling over.
    stable_after: float = 30.0
    # More unexpected exits than this (all workers together) within the
    # window: the workers are crash-looping; stop everything, exit 1.
    max_restarts: int = 5
    window: float = 60.0


class PortInUse(RuntimeError):
    """Someone already listens on an address the workers would share."""


def check_port_free(addr: str) -> None:
    """Raise PortInUse when ``addr`` (host:port) cannot be bound now.

    The workers set SO_REUSEPORT, and so would bind next to any other
    process that did too (another supervisor's workers) and silently share
    its traffic; this plain bind without the option fails if anybody listens
    there. Raises ValueError for a malformed address."""
    parsed = split_host_port(addr)
    if parsed is None:
        raise ValueError(f"not host:port: {addr!r}")
    host, port = parsed
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot resolve {addr}: {exc}") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR, as grpc sets it: connections in TIME_WAIT from an
        # earlier run do not count as someone listening.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise PortInUse(f"cannot listen on {addr}: {exc.strerror}") from None


class Supervisor:
    """Runs ``workers`` worker processes until stopped. ``command(index,
    parent_fd)`` is a worker's argv."""

    def __init__(
        self,
        *,
        workers: int,
        command: Callable[[int, int], Sequence[str]],
        env: Mapping[str, str],
        stop_timeout: float,
        policy: RestartPolicy | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
    ) -> None:
        self._workers = workers
        self._command = command
        self._env = dict(env)
        self._stop_timeout = stop_timeout
        self._policy = policy or RestartPolicy()
        self._on_worker_exit = on_worker_exit
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._restarts: deque[float] = deque()
        self._stopping: asyncio.Event | None = None
        self._stop_signal = signal.SIGTERM
        self._failed = False

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then stop every worker. Returns the
        exit status: 0 when every worker stopped cleanly, 1 otherwise."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        # Its write end stays here, unwritten, until this process ends.
        parent_fd, keep_alive_fd = os.pipe()
        try:
            slots = [
                asyncio.create_task(self._run_slot(index, parent_fd))
                for index in range(1, self._workers + 1)
            ]
            await self._stopping.wait()
            try:
                await asyncio.wait_for(asyncio.gather(*slots), self._stop_timeout)
            except TimeoutError:
                logger.error(
                    "workers did not stop in time; killing them",
                    extra={"timeout_seconds": self._stop_timeout},
                )
                self._failed = True
                self._forward(signal.SIGKILL)
                await asyncio.gather(*slots, return_exceptions=True)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            os.close(parent_fd)
            os.close(keep_alive_fd)
        logger.info("all workers stopped", extra={"clean": not self._failed})
        return 1 if self._failed else 0

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop: forward ``sig`` to every worker and restart none. Raises nothing."""
        assert self._stopping is not None
        if not self._stopping.is_set():
            logger.info("stopping workers", extra={"signal": signal.Signals(sig).name})
            self._stop_signal = signal.Signals(sig)
            self._stopping.set()
        self._forward(sig)

    def _forward(self, sig: int) -> None:
        for process in list(self._processes.values()):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)

    async def _run_slot(self, index: int, parent_fd: int) -> None:
        assert self._stopping is not None
        consecutive = 0
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._command(index, parent_fd),
                    env=self._env,
                    stdin=asyncio.subprocess.DEVNULL,
                    pass_fds=(parent_fd,),
                    # Its own session: a Ctrl-C in the terminal reaches the
                    # supervisor only, which forwards it once.
                    start_new_session=True,
                )
            except OSError as exc:
                # Out of processes or memory: nothing sensible to retry.
                logger.error("cannot start worker %d: %s", index, exc)
                self._failed = True
                self.request_stop(signal.SIGTERM)
                return
            self._processes[index] = process
            logger.info("worker started", extra={"worker": index, "pid": process.pid})
            if self._stopping.is_set():
                # The stop came while this one was being started.
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(self._stop_signal)
            code = await process.wait()
            del self._processes[index]
            if self._on_worker_exit is not None:
                self._on_worker_exit(process.pid)
            if self._stopping.is_set():
                # Killed by the very signal we forwarded (before it installed
                # its handlers) is a clean stop too: it had nothing to drain.
                clean = code in (0, -self._stop_signal)
                level = logging.INFO if clean else logging.ERROR
                logger.log(
                    level,
                    "worker stopped",
                    extra={"worker": index, "pid": process.pid, "returncode": code},
                )
                if not clean:
                    self._failed = True
                return
            consecutive = (
                1 if loop.time() - started >= self._policy.stable_after else consecutive + 1
            )
            if self._crash_looping():
                logger.error(
                    "workers keep dying; giving up",
                    extra={
                        "restarts": self._policy.max_restarts,
                        "window_seconds": self._policy.window,
                    },
                )
                self._failed = True
                self.request_stop(signal.SIGTERM)
                return
            delay = min(self._policy.first_delay * 2 ** (consecutive - 1), self._policy.max_delay)
            logger.error(
                "worker died; restarting it",
                extra={
                    "worker": index,
                    "pid": process.pid,
                    "returncode": code,
                    "restart_in_seconds": delay,
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _crash_looping(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > self._policy.window:
            self._restarts.popleft()
        return len(self._restarts) > self._policy.max_restarts


def worker_command(index: int, parent_fd: int) -> list[str]:
    """A fresh interpreter running worker ``index``. Raises nothing."""
    return [
        sys.executable,
        "-m",
        "usersvc",
        "serve",
        "--worker",
        str(index),
        "--parent-fd",
        str(parent_fd),
    ]


def supervise(settings: Settings, workers: int) -> int:
    """Prepare once, then run ``workers`` workers until SIGTERM/SIGINT.
    Returns the process exit status (0: every worker stopped cleanly)."""
    for addr in filter(None, (settings.listen_addr, settings.mtls_listen_addr)):
        try:
            check_port_free(addr)
        except (PortInUse, ValueError) as exc:
            logger.error("cannot start: %s", exc)
            return 1
    env = dict(os.environ)
    # Workers are single processes; only the supervisor supervises.
    env["USERSVC_WORKERS"] = "1"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    try:
        _prepare_once(settings, env)
    except Exception as exc:
        logger.error("cannot start: %s", exc)
        return 1
    metrics_dir = None
    endpoint = None
    on_worker_exit = None
    if settings.metrics_addr is not None:
        from usersvc.observability.metrics import mark_worker_dead, serve_multiprocess_metrics

        # Fresh for each run: files of an earlier run's workers would be
        # added to this one's counters.
        metrics_dir = tempfile.mkdtemp(prefix="usersvc-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        try:
            endpoint = serve_multiprocess_metrics(settings.metrics_addr, metrics_dir)
        except OSError as exc:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            logger.error("cannot serve metrics on %s: %s", settings.metrics_addr, exc)
            return 1
        directory = metrics_dir

        def on_worker_exit(pid: int) -> None:
            mark_worker_dead(pid, directory)

    supervisor = Supervisor(
        workers=workers,
        command=worker_command,
        env=env,
        stop_timeout=settings.shutdown_drain_seconds
        + settings.shutdown_grace_seconds
        + STOP_MARGIN_SECONDS,
        on_worker_exit=on_worker_exit,
    )
    logger.info("starting workers", extra={"workers": workers, "addr": settings.listen_addr})
    try:
        return asyncio.run(supervisor.run())
    finally:
        if endpoint is not None:
            endpoint.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _prepare_once(settings: Settings, env: dict[str, str]) -> None:
    """The embedded PostgreSQL (started and migrated here, its URL handed
    to the workers) and the development signing key (generated here, or N
    workers would race to create it). Raises what those raise."""
    if settings.database_url is None:
        from usersvc.adapters.embedded import prepare_embedded_postgres

        env["USERSVC_DATABASE_URL"] = prepare_embedded_postgres(settings.data_dir)
    from usersvc.adapters.keys import read_key_material
    from usersvc.services.tokens import key_ring_of

    material = read_key_material(settings, logger)
    key_ring_of(material.signing, material.verification, retired_secrets=material.retired_secrets)
