"""A real ``usersvc serve`` (one process or a supervisor with workers) for
end-to-end tests: its JSON log read back line by line, polling with
deadlines on what it logs, and /metrics scraped over HTTP."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from support.servers import POLL_SECONDS as POLL_SECONDS
from support.servers import STARTUP_DEADLINE_SECONDS, ServeProcess, serve_env, serve_process

from .helpers import Caller, auth_service_pb2

DEADLINE_SECONDS = STARTUP_DEADLINE_SECONDS


def server_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a served process: the test database, a free port,
    cheap bcrypt, JSON logs (parsed by the tests)."""
    return serve_env(database_url, data_dir, log_format="json", **extra)


class Served(ServeProcess):
    """tests/support/servers.py's ServeProcess with what this tier asks of
    it: the log file as ``log``, access lines by request id, and the pids
    that logged "serving" (a supervisor's workers)."""

    @property
    def log(self) -> Path:
        return self.log_file

    def matching_access(self, request_id: str) -> list[dict[str, Any]]:
        """The access lines of the call tagged ``request_id``."""
        return [r for r in self.access_lines() if r.get("request_id") == request_id]

    def serving_pids(self) -> set[int]:
        """Pids of the processes that logged "serving" (each worker once)."""
        return {int(r.get("pid", self.process.pid)) for r in self.matching("serving")}

    async def wait_serving(self, workers: int) -> set[int]:
        return set(
            await self.wait_for(
                f"{workers} serving process(es)",
                lambda: (pids := self.serving_pids()) and len(pids) >= workers and pids,
            )
        )


@asynccontextmanager
async def served(env: Mapping[str, str], log: Path, *args: str) -> AsyncIterator[Served]:
    """``usersvc serve *args`` in the background until the block ends
    (killed then if still running, workers included). Not waited for: the
    tests wait for what they need (``wait_serving``, a log line)."""
    async with serve_process(env, log, *args, wait=False, kind=Served) as running:
        yield running


def answered_by(served: Served, request_id: str) -> int | None:
    """The pid whose access line carries ``request_id``."""
    for record in served.matching_access(request_id):
        return int(record.get("pid", served.process.pid))
    return None


async def jwks_call(address: str, request_id: str) -> None:
    """One GetJwks on a connection of its own (so the kernel picks a worker
    for it), tagged with ``request_id``."""
    async with grpc.aio.insecure_channel(address) as channel:
        await Caller(channel, None).auth.GetJwks(
            auth_service_pb2.GetJwksRequest(),
            metadata=(("x-request-id", request_id),),
            timeout=10,
        )


# Fresh connections until both workers answered: the kernel hashes each
# connection to a worker, so 64 all landing on one of two is a 2**-63 event.
MAX_CONNECTIONS = 64


async def answering_pids(server: Served, want: set[int]) -> set[int]:
    """Call GetJwks on fresh connections until every pid in ``want``
    answered one (or MAX_CONNECTIONS calls were made); the pids that did."""
    return set(await calls_until_answered_by(server, want))


async def calls_until_answered_by(server: Served, want: set[int]) -> list[int]:
    """Like answering_pids, but the pid of each call made, in order."""
    seen: set[int] = set()
    answers: list[int] = []
    for _ in range(MAX_CONNECTIONS):
        request_id = f"workers-{uuid.uuid4().hex}"
        await jwks_call(server.address, request_id)
        pid = await server.wait_for(
            "the call's access line", lambda rid=request_id: answered_by(server, rid)
        )
        seen.add(pid)
        answers.append(pid)
        if want <= seen:
            break
    return answers


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """One sample's value; 0 when absent (a counter never incremented)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]
# Bounds printed by LoopFigures (of the server's buckets).
LOOP_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25)


class LoopHistogram:
    """One histogram of the server's event loop monitor
    (usersvc.observability.loop_lag) between two scrapes."""

    def __init__(self, name: str, before: Samples, after: Samples) -> None:
        self._name, self._before, self._after = name, before, after
        self.count = self._delta(f"{name}_count")

    def _delta(self, name: str, **labels: str) -> float:
        return value(self._after, name, **labels) - value(self._before, name, **labels)

    def above(self, bound: float) -> float:
        """How many measurements were above ``bound`` (one of the buckets)."""
        return self.count - self._delta(f"{self._name}_bucket", le=repr(float(bound)))

    def __str__(self) -> str:
        return ", ".join(f"> {bound * 1000:g} ms: {self.above(bound):.0f}" for bound in LOOP_BOUNDS)


class LoopFigures:
    """What the server's event loop monitor measured between two scrapes:
    ``lag`` (how late a 10 ms sleep woke) and ``hold`` (the part of it the
    loop's thread was computing)."""

    def __init__(self, before: Samples, after: Samples) -> None:
        self.lag = LoopHistogram("usersvc_event_loop_lag_seconds", before, after)
        self.hold = LoopHistogram("usersvc_event_loop_hold_seconds", before, after)
        self.recent_max_lag = value(after, "usersvc_event_loop_lag_max_seconds")

    def __str__(self) -> str:
        return (
            f"{self.lag.count:.0f} measurements; hold {self.hold}; lag {self.lag} "
            f"(longest of the last minute {self.recent_max_lag * 1000:.0f} ms)"
        )
