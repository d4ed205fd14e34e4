"""Where the event write's cost goes, served: ``make bench-perf``
(``python -m bench.perf_served``).

The ``events-served`` scenario (bench/event_served.py) says how much slower
UpdateUser and CreateUser run with their event; this says where the
difference is spent. It starts the same two servers (``usersvc serve`` and
bench/baselines/no_events.py, bcrypt 4, pools of ``--pool``), loads one at
a time with the same calls, 32 in flight, and samples the whole machine
with ``perf record -e cpu-clock -g -a`` during each load. Per call, for each
server: CPU by process (PostgreSQL's backends, the server, the harness's
client, idle), and the PostgreSQL functions the event's work runs under,
inclusive of what they call. A sample is 1/FREQUENCY s of one CPU, so
samples / calls is CPU time per call. The figures are the sums over
``--repeat`` loads of each server, alternating.

Needs perf (Debian's ``linux-perf``, which the make target installs) and
the right to sample every process (root, or kernel.perf_event_paranoid -1).
PostgreSQL's static functions have no symbols in Debian's build, so only
its exported ones are named; the rest count in the process totals.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from usersvc_protos.v1 import user_service_pb2

from .baselines.bare import connect_kwargs
from .calls import USER_SERVICE
from .event_served import SERVED_DOMAIN, _closed_loop, _numbered
from .scenarios import (
    SERVED_POOL,
    UPDATE_SAMPLE_ROWS,
    _sample_rows,
    _strong_password,
    etag_updates,
    login,
    new_user_creates,
)
from .seed import (
    ADMIN_EMAIL,
    delete_users,
    hold_run_lock,
    locate_database,
    seed,
    vacuum_written,
)
from .systems import System, usersvc_system

FREQUENCY = 999  # samples per second per CPU
SEED_ROWS = 1_000_000  # as python -m bench seeds by default: its seed is reused
IN_FLIGHT = 32
WITH_EVENTS = "with event"
WITHOUT_EVENTS = "without"
# PostgreSQL functions whose inclusive time names a part of the event's
# work (or of the statement around it), in the order they are printed.
POSTGRES_FUNCTIONS = (
    ("standard_ExecutorStart", "starting the statement (tables and indexes opened)"),
    ("standard_ExecutorRun", "running it (the write, its CTEs)"),
    ("standard_ExecutorFinish", "finishing it (data-modifying CTEs: the event's INSERT)"),
    ("CommitTransactionCommand", "the commit"),
    ("plpgsql_exec_function", "the numbering (usersvc_number_events)"),
    ("jsonb_build_object", "  the user's snapshot"),
    ("heap_insert", "  heap inserts"),
    ("heap_update", "  heap updates (the numbering's new versions among them)"),
    ("btinsert", "  index entries"),
    ("ExecConstraints", "  CHECK and NOT NULL constraints"),
    ("ExecOpenIndices", "  opening indexes"),
    ("nextval_internal", "  sequences (events.position)"),
    ("gen_random_uuid", "  random bits of ids"),
    ("LWLockAcquire", "waiting for and taking buffer and other light locks"),
    ("LWLockRelease", "releasing them (waking the waiters)"),
)
_WANTED = frozenset(name for name, _ in POSTGRES_FUNCTIONS)


@dataclass
class Tally:
    """Samples of one server's loads, and the calls they completed."""

    calls: int = 0
    by_process: Counter[str] = field(default_factory=Counter)
    postgres: Counter[str] = field(default_factory=Counter)

    def per_call(self, samples: float) -> float:
        """Microseconds of CPU per call that ``samples`` stand for."""
        return samples / FREQUENCY / self.calls * 1e6 if self.calls else float("nan")


def read_samples(data: Path, tally: Tally, roles: dict[int, str]) -> None:
    """Add the samples perf recorded in ``data`` to ``tally``
    (``count_samples``). Raises subprocess.CalledProcessError."""
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,ip,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    count_samples(script, tally, roles)


def count_samples(script: str, tally: Tally, roles: dict[int, str]) -> None:
    """Add the samples of ``script`` (``perf script -F comm,pid,ip,sym``: per
    sample a "comm pid" line, then one "address symbol" line per frame, a
    blank line after) to ``tally``: each by process (``roles`` names pids;
    the idle task is "idle", other processes go by their command name), and
    PostgreSQL's also under each wanted function on their stack, once per
    sample however deep the recursion. Raises nothing."""
    for block in script.split("\n\n"):
        lines = block.strip("\n").splitlines()
        if not lines:
            continue
        header = lines[0].split()
        if len(header) < 2 or not header[-1].isdigit():
            continue
        comm, pid = " ".join(header[:-1]), int(header[-1])
        role = roles.get(pid, "idle" if comm == "swapper" else comm)
        if comm == "postgres":
            role = "PostgreSQL"
            frames = {line.split(None, 1)[-1].strip() for line in lines[1:]}
            tally.postgres.update(frames & _WANTED)
        tally.by_process[role] += 1


async def _load_once(
    system: System, token: str, rpc: str, one_call: Any, response: Any, seconds: float,
    out: Path, connection: asyncpg.Connection,
) -> int:  # fmt: skip
    """Warm ``system`` up, then load it for ``seconds`` under perf writing
    ``out``; the calls completed. Raises SystemFailure, grpc errors,
    subprocess errors."""
    async with grpc.aio.insecure_channel(system.address) as channel:
        method = channel.unary_unary(
            USER_SERVICE + rpc,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,
        )
        await _closed_loop(method, one_call, token, IN_FLIGHT, 2.0)
        await _numbered(connection)
        system.check_alive()
        perf = subprocess.Popen(  # noqa: ASYNC220 (stopped below, not awaited)
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY), "-g", "-a",
             "-o", str(out)],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            calls = await _closed_loop(method, one_call, token, IN_FLIGHT, seconds)
            await _numbered(connection)  # the numbering of these calls' events counts
        finally:
            perf.send_signal(signal.SIGINT)
            await asyncio.to_thread(perf.wait)
    return calls


async def profile(rpc: str, seconds: float, repeat: int, pool: int) -> dict[str, Tally]:
    """Load each server ``repeat`` times, alternating, under perf; the
    tallies by server. Raises SystemFailure, grpc, asyncpg and subprocess
    errors."""
    database = locate_database()
    run_lock = await hold_run_lock(database.url)  # not beside a bench run
    try:
        return await _profile(database.url, rpc, seconds, repeat, pool)
    finally:
        await run_lock.close()


async def _profile(
    url: str, rpc: str, seconds: float, repeat: int, pool_size: int
) -> dict[str, Tally]:
    seeded = await seed(url, SEED_ROWS)
    rows = await _sample_rows(url, UPDATE_SAMPLE_ROWS)
    await vacuum_written(url)
    tallies = {WITHOUT_EVENTS: Tally(), WITH_EVENTS: Tally()}
    with tempfile.TemporaryDirectory(prefix="usersvc-perf-") as scratch:
        work = Path(scratch)
        pool = {"USERSVC_DB_POOL_SIZE": str(pool_size)}
        systems = {
            WITH_EVENTS: usersvc_system(
                name="perf-events", database_url=url, work_dir=work,
                bcrypt_rounds=4, extra_env=pool,
            ),
            WITHOUT_EVENTS: usersvc_system(
                name="perf-no-events", database_url=url, work_dir=work,
                bcrypt_rounds=4, extra_env=pool, module="bench.baselines.no_events",
            ),
        }  # fmt: skip
        connection = await asyncpg.connect(**connect_kwargs(url))
        try:
            for system in systems.values():
                system.start()
            for system in systems.values():
                await system.wait_ready(60.0, health=True)
            if rpc == "UpdateUser":
                one_call = etag_updates(rows, IN_FLIGHT, "Perf event")
                response: Any = user_service_pb2.UpdateUserResponse
            else:
                one_call = new_user_creates(SERVED_DOMAIN, "p", _strong_password())
                response = user_service_pb2.CreateUserResponse
            for n in range(repeat):
                for name in (
                    (WITHOUT_EVENTS, WITH_EVENTS) if n % 2 == 0 else (WITH_EVENTS, WITHOUT_EVENTS)
                ):
                    system = systems[name]
                    token = await login(system.address, ADMIN_EMAIL, seeded.admin.password)
                    out = work / f"{n}-{system.name}.data"
                    calls = await _load_once(
                        system, token, rpc, one_call, response, seconds, out, connection
                    )
                    tallies[name].calls += calls
                    roles = {system.pid: "the server", os.getpid(): "the harness's client"}
                    await asyncio.to_thread(read_samples, out, tallies[name], roles)
                    print(f"  {name}: {calls:,} calls in {seconds:.0f} s", flush=True)
        finally:
            await connection.close()
            for system in systems.values():
                await asyncio.to_thread(system.stop)
            await delete_users(url, SERVED_DOMAIN)
    return tallies


def report(rpc: str, tallies: dict[str, Tally], seconds: float) -> str:
    """The table of CPU per call by process and by PostgreSQL function."""
    without, with_ = tallies[WITHOUT_EVENTS], tallies[WITH_EVENTS]
    lines = [
        f"{rpc}, {IN_FLIGHT} in flight: without {without.calls / seconds:,.0f} calls/s, "
        f"with event {with_.calls / seconds:,.0f} calls/s",
        f"{'us of CPU per call':<62}{'without':>9}{'with':>9}{'diff':>9}",
    ]

    def row(label: str, a: float, b: float) -> None:
        lines.append(f"{label:<62}{a:>9.1f}{b:>9.1f}{b - a:>+9.1f}")

    processes = sorted(
        set(without.by_process) | set(with_.by_process),
        key=lambda name: -(with_.by_process[name] + without.by_process[name]),
    )
    for name in processes[:8]:
        row(
            name, without.per_call(without.by_process[name]), with_.per_call(with_.by_process[name])
        )
    lines.append("PostgreSQL, inclusive:")
    for function, label in POSTGRES_FUNCTIONS:
        row(
            f"  {label} [{function}]"[:61],
            without.per_call(without.postgres[function]),
            with_.per_call(with_.postgres[function]),
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf_served", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rpc", choices=("UpdateUser", "CreateUser"), default="UpdateUser")
    parser.add_argument("--seconds", type=float, default=15.0, help="each load (15)")
    parser.add_argument("--repeat", type=int, default=2, help="loads of each server (2)")
    parser.add_argument(
        "--pool", type=int, default=SERVED_POOL, help=f"each server's database pool ({SERVED_POOL})"
    )
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    tallies = asyncio.run(profile(args.rpc, args.seconds, args.repeat, args.pool))
    print(report(args.rpc, tallies, args.seconds * args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
