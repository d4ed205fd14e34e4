"""The event write's cost on the RPCs' throughput, served: the
``events-served`` scenario (the in-process figures of the event write are
the ``events`` scenario's, bench/events.py).

Two servers on the bench database, side by side, each loaded in turn by the
same Python gRPC client (calls as the update-random and create scenarios
of bench/scenarios.py make them): ``usersvc serve`` as it ships, and the same server
with UpdateUser's and CreateUser's event drafts left out
(bench/baselines/no_events.py), both at bcrypt cost 4 with pools of
``--served-pool`` connections (SERVED_POOL, 5: the baselines and the main
usersvc hold most of PostgreSQL's 100 meanwhile; with 20, UpdateUser's
ratio came out a few points lower), neither publishing to NATS (the relay's cost is the events
scenario's relay run). Per RPC: calls/s with the
event / without, which the events issue bounds at 10% slower.

Each round measures the two servers in alternating slices (the order
flipping every slice), so that what else the machine does weighs on both
alike. The numbering of the events is inside the measurement: every slice
starts once no event waits to be numbered (so one slice's leftovers do not
weigh on the next), and a slice's time ends only when the events it wrote
are numbered, by the server's own feed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc

from usersvc_protos.v1 import user_service_pb2

from .baselines.bare import connect_kwargs
from .calls import USER_SERVICE, bearer
from .event_cost import BACKENDS_SQL, cpu_since, local_cpu, paired_runs
from .results import Measurement, RatioSpec, Target
from .scenarios import (
    UPDATE_SAMPLE_ROWS,
    Context,
    InProcessRun,
    OneCall,
    Plan,
    _sample_rows,
    _start_extra,
    _stop_extra,
    _strong_password,
    etag_updates,
    login,
    new_user_creates,
)
from .seed import ADMIN_EMAIL, delete_users
from .systems import System, cpu_seconds, usersvc_system

SERVED_DOMAIN = "events.bench"
WITH_EVENTS = "usersvc-events"
WITHOUT_EVENTS = "usersvc-no-events"
# Read from the sequencer's floor, as a pass reads its queue (migration
# 0009): below it the queue index holds only the entries of rows numbered
# since the last vacuum, which a look every few milliseconds would walk.
_NOTHING_TO_NUMBER = (
    "SELECT NOT EXISTS (SELECT 1 FROM events WHERE sequence IS NULL AND txid >= "
    "coalesce((SELECT txid_floor FROM event_sequencer WHERE id = 1), 0))"
)
# With event / without: at most 10% slower (bench/events.py's target).
SERVED_TARGET = Target(">=", 0.9)
# Slices per server per round, alternating (the order flips every slice),
# so that what else the machine does weighs on both alike.
SLICES = 6
# How often the wait for the numbering looks, and for how long at most.
_DRAIN_POLL = 0.002
_DRAIN_LIMIT = 60.0


async def _numbered(connection: asyncpg.Connection) -> None:
    """Return once no committed event waits to be numbered. Raises
    TimeoutError after _DRAIN_LIMIT seconds, asyncpg errors."""
    async with asyncio.timeout(_DRAIN_LIMIT):
        while not await connection.fetchval(_NOTHING_TO_NUMBER):  # noqa: ASYNC110 (the database is what is watched)
            await asyncio.sleep(_DRAIN_POLL)


async def _closed_loop(
    method: Any, one_call: OneCall, token: str, tasks: int, seconds: float
) -> int:
    """Calls completed by ``tasks`` callers, each calling again as soon as
    its answer came, for ``seconds``."""
    deadline = time.perf_counter() + seconds
    metadata = bearer(token)

    async def caller(task: int) -> int:
        done = 0
        while time.perf_counter() < deadline:
            await one_call(task, method, metadata)
            done += 1
        return done

    return sum(await asyncio.gather(*(caller(task) for task in range(tasks))))


async def _backends_cpu(connection: asyncpg.Connection) -> dict[int, float]:
    return local_cpu(row[0] for row in await connection.fetch(BACKENDS_SQL))


@dataclass
class _Served:
    system: System
    token: str


def _measure_pair(
    ctx: Context, servers: tuple[_Served, _Served], rpc: str, response_type: type[Any],
    one_call: OneCall,
) -> Callable[[float], Awaitable[tuple[Measurement, Measurement]]]:  # fmt: skip
    """The measurement of (without, with the event): SLICES alternating
    slices of each server per round, the order flipping every slice."""
    tasks = ctx.shape.in_flight

    async def measure(seconds: float) -> tuple[Measurement, Measurement]:
        loadavg = os.getloadavg()[0]
        # calls, wall, server CPU, server and database backends' CPU
        tallies = [[0, 0.0, 0.0, 0.0], [0, 0.0, 0.0, 0.0]]
        backends_seen = True
        connection = await asyncpg.connect(**connect_kwargs(ctx.database_url))
        channels = [grpc.aio.insecure_channel(served.system.address) for served in servers]
        try:
            methods = [
                channel.unary_unary(
                    USER_SERVICE + rpc,
                    request_serializer=lambda message: message.SerializeToString(),
                    response_deserializer=response_type.FromString,
                )
                for channel in channels
            ]
            for index, served in enumerate(servers):  # warm-up, not counted
                await _closed_loop(methods[index], one_call, served.token, tasks, ctx.warmup / 2)
            for n in range(SLICES):
                for index in (0, 1) if n % 2 == 0 else (1, 0):
                    served, tally = servers[index], tallies[index]
                    await _numbered(connection)  # not timed: what came before
                    served.system.check_alive()
                    backends = await _backends_cpu(connection)
                    cpu, began = cpu_seconds(served.system.pid), time.perf_counter()
                    tally[0] += await _closed_loop(
                        methods[index], one_call, served.token, tasks, seconds / SLICES
                    )
                    # Timed: the numbering of this slice's last events (the
                    # same short look for the server that wrote none).
                    await _numbered(connection)
                    tally[1] += time.perf_counter() - began
                    server_cpu = cpu_seconds(served.system.pid) - cpu
                    after = await _backends_cpu(connection)
                    backends_seen &= bool(after)
                    tally[2] += server_cpu
                    tally[3] += server_cpu + cpu_since(backends, after)
        finally:
            for channel in channels:
                await channel.close(None)
            await connection.close()
        return tuple(  # type: ignore[return-value]
            Measurement(
                rps=calls / wall,
                # The server's and the database backends' CPU per call
                # together: the event's cost is mostly the database's work,
                # and CPU time is what the machine's noise disturbs least.
                # The server's alone when PostgreSQL is not on this machine.
                cpu_us=(total if backends_seen else server) / calls * 1e6,
                requests=int(calls),
                loadavg_1m=loadavg,
            )
            for calls, wall, server, total in tallies
        )

    return measure


async def events_served_plan(ctx: Context) -> Plan:
    """Start the two servers and plan the runs; the teardown stops them and
    deletes the users created. Raises SystemFailure, LookupError."""
    tasks = ctx.shape.in_flight
    rows = await _sample_rows(ctx.database_url, UPDATE_SAMPLE_ROWS)
    if len(rows) < tasks:
        raise LookupError(f"only {len(rows)} seeded users to update, need {tasks}")
    pool = {"USERSVC_DB_POOL_SIZE": str(ctx.served_pool)}
    systems = {
        WITH_EVENTS: usersvc_system(
            name=WITH_EVENTS, database_url=ctx.database_url, work_dir=ctx.work_dir,
            bcrypt_rounds=4, extra_env=pool,
        ),
        WITHOUT_EVENTS: usersvc_system(
            name=WITHOUT_EVENTS, database_url=ctx.database_url, work_dir=ctx.work_dir,
            bcrypt_rounds=4, extra_env=pool, module="bench.baselines.no_events",
        ),
    }  # fmt: skip
    started: list[System] = []

    async def teardown() -> None:
        for system in started:
            await _stop_extra(ctx, system)
        await delete_users(ctx.database_url, SERVED_DOMAIN)

    try:
        for system in systems.values():
            await _start_extra(ctx, system)
            started.append(system)
        tokens = {
            name: await login(system.address, ADMIN_EMAIL, ctx.seeded.admin.password)
            for name, system in systems.items()
        }
    except BaseException:
        await teardown()
        raise
    update = etag_updates(rows, tasks, "Bench event")
    create = new_user_creates(SERVED_DOMAIN, "e", _strong_password())
    servers = (
        _Served(systems[WITHOUT_EVENTS], tokens[WITHOUT_EVENTS]),
        _Served(systems[WITH_EVENTS], tokens[WITH_EVENTS]),
    )
    runs: list[InProcessRun] = []
    ratios: list[RatioSpec] = []
    for rpc, key, one_call, response in (
        ("UpdateUser", "update rpc", update, user_service_pb2.UpdateUserResponse),
        ("CreateUser", "create rpc", create, user_service_pb2.CreateUserResponse),
    ):
        measure = _measure_pair(ctx, servers, rpc, response, one_call)
        runs += paired_runs(
            (key, f"{key} + event"), f"{rpc} served, {SLICES} alternating slices each", measure
        )
        ratios += [
            RatioSpec(f"{rpc} RPCs/s served, with event / without",
                      (f"{key} + event", "rps"), (key, "rps"), SERVED_TARGET),
            RatioSpec(f"{rpc} server + database CPU per call, without event / with",
                      (key, "cpu_us"), (f"{key} + event", "cpu_us")),
        ]  # fmt: skip
    plan = Plan(
        "events-served",
        "UpdateUser and CreateUser served with and without their event write, side by side",
    )
    plan.runs = runs
    plan.ratios = ratios
    plan.teardown = teardown
    plan.notes = [
        f"{WITH_EVENTS} (usersvc serve) and {WITHOUT_EVENTS} (bench/baselines/no_events.py: "
        "the same server, UpdateUser and CreateUser writing no event), bcrypt 4, pools of "
        f"{ctx.served_pool}, no NATS, {tasks} calls in flight from a Python grpc.aio client; "
        "UpdateUser of random seeded rows with their etag, CreateUser of new users; each "
        "slice starts with nothing to number and ends when its events are numbered; CPU "
        "per call is the server process's plus the database backends' (from /proc when "
        "PostgreSQL is local)",
    ]
    return plan
