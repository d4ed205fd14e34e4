"""The supervisor of ``serve --workers`` with stand-in workers (small Python
processes), for what real workers rarely do: crash in a loop, fail their
drain. And the rule it exists for: it never loads grpc."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from usersvc.supervisor import RestartPolicy, Supervisor

DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.02

# A stand-in worker: announces itself with a file, then waits for SIGTERM and
# exits with the status given on its command line.
WORKER = """
import os, signal, sys, time
directory, index, stop_status = sys.argv[1], sys.argv[2], int(sys.argv[3])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(stop_status))
with open(os.path.join(directory, f"{index}-{os.getpid()}"), "w"):
    pass
while True:
    signal.pause()
"""


def stand_in(directory: Path, stop_status: int) -> Callable[[int, int], list[str]]:
    def command(index: int, parent_fd: int) -> list[str]:
        return [sys.executable, "-c", WORKER, str(directory), str(index), str(stop_status)]

    return command


async def wait_for_files(directory: Path, count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_SECONDS
    while len(os.listdir(directory)) < count:
        assert loop.time() < deadline, f"fewer than {count} workers started"
        await asyncio.sleep(POLL_SECONDS)


async def test_stopping_returns_0_when_every_worker_stops_cleanly(tmp_path: Path) -> None:
    exits: list[int] = []
    supervisor = Supervisor(
        workers=2,
        command=stand_in(tmp_path, 0),
        env={},
        stop_timeout=DEADLINE_SECONDS,
        on_worker_exit=exits.append,
    )
    run = asyncio.ensure_future(supervisor.run())
    await wait_for_files(tmp_path, 2)
    supervisor.request_stop()
    status = await asyncio.wait_for(run, DEADLINE_SECONDS)

    started = {int(name.split("-")[1]) for name in os.listdir(tmp_path)}
    assert status == 0
    assert sorted(exits) == sorted(started)


async def test_a_worker_failing_its_stop_makes_the_exit_status_1(tmp_path: Path) -> None:
    supervisor = Supervisor(
        workers=2,
        command=stand_in(tmp_path, 1),
        env={},
        stop_timeout=DEADLINE_SECONDS,
    )
    run = asyncio.ensure_future(supervisor.run())
    await wait_for_files(tmp_path, 2)
    supervisor.request_stop()

    assert await asyncio.wait_for(run, DEADLINE_SECONDS) == 1


async def test_crash_looping_workers_make_the_supervisor_give_up_with_1(tmp_path: Path) -> None:
    exits: list[int] = []

    def crashing(index: int, parent_fd: int) -> list[str]:
        return [sys.executable, "-c", "raise SystemExit(3)"]

    supervisor = Supervisor(
        workers=2,
        command=crashing,
        env={},
        stop_timeout=DEADLINE_SECONDS,
        policy=RestartPolicy(first_delay=0.01, max_delay=0.05, max_restarts=3, window=60),
        on_worker_exit=exits.append,
    )
    status = await asyncio.wait_for(supervisor.run(), DEADLINE_SECONDS)

    assert status == 1
    # Four unexpected exits exceed three restarts; the other slot may have
    # crashed once more meanwhile, never more than that.
    assert 4 <= len(exits) <= 5


def test_the_supervisor_side_never_imports_grpc() -> None:
    # grpc's threads make fork-and-initdb crash; the supervisor process
    # loads only these modules before it starts the workers.
    probe = (
        "import sys\n"
        "import usersvc.cli, usersvc.supervisor, usersvc.observability.metrics\n"
        "import usersvc.adapters.embedded, usersvc.adapters.migrations\n"
        "import usersvc.services.tokens, usersvc.logging_setup\n"
        "loaded = sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == ""
