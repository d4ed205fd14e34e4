"""A real ``usersvc serve`` (one process or a supervisor with workers) for
end-to-end tests: its JSON log read back line by line, polling with
deadlines on what it logs, and /metrics scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import Caller, auth_service_pb2
from .test_process import PROJECT_ROOT, free_port, usersvc_command

DEADLINE_SECONDS = 60.0
# How often state is polled; every wait is bounded by DEADLINE_SECONDS.
POLL_SECONDS = 0.02


def server_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a served process: the test database, a free port,
    cheap bcrypt, JSON logs (parsed by the tests)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSVC_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        USERSVC_DATABASE_URL=database_url,
        USERSVC_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        USERSVC_DATA_DIR=str(data_dir),
        USERSVC_BCRYPT_ROUNDS="4",
        USERSVC_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Served:
    process: asyncio.subprocess.Process
    log: Path
    env: Mapping[str, str]

    @property
    def address(self) -> str:
        return self.env["USERSVC_LISTEN_ADDR"]

    def lines(self) -> list[dict[str, Any]]:
        """Every JSON line logged so far (a line still being written is skipped)."""
        records = []
        for line in self.log.read_text(errors="replace").splitlines():
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

    async def wait_for(self, what: str, condition: Callable[[], Any], *, alive: bool = True) -> Any:
        """Poll ``condition`` until it returns something truthy (returned);
        fail after the deadline, or when the process exits while ``alive``
        is required."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_SECONDS
        while loop.time() < deadline:
            result = condition()
            if result:
                return result
            if alive and self.process.returncode is not None:
                pytest.fail(
                    f"server exited ({self.process.returncode}) waiting for {what}:\n"
                    + self.log.read_text(errors="replace")[-6000:]
                )
            await asyncio.sleep(POLL_SECONDS)
        pytest.fail(
            f"not within {DEADLINE_SECONDS}s: {what}\n"
            + self.log.read_text(errors="replace")[-6000:]
        )

    def matching_access(self, request_id: str) -> list[dict[str, Any]]:
        """The access lines of the call tagged ``request_id``."""
        return [
            r
            for r in self.lines()
            if r.get("logger") == "usersvc.access" and r.get("request_id") == request_id
        ]

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

    async def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), DEADLINE_SECONDS)


@asynccontextmanager
async def served(env: Mapping[str, str], log: Path, *args: str) -> AsyncIterator[Served]:
    """``usersvc serve *args`` in the background until the block ends
    (killed then if still running, workers included)."""
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *usersvc_command(),
            "serve",
            *args,
            env=dict(env),
            cwd=PROJECT_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    running = Served(process, log, env)
    try:
        yield running
    finally:
        if process.returncode is None:
            import psutil

            with_children = [psutil.Process(process.pid)]
            with suppress(psutil.NoSuchProcess):
                with_children += with_children[0].children(recursive=True)
            for p in reversed(with_children):
                with suppress(psutil.NoSuchProcess):
                    p.kill()
            await process.wait()


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
