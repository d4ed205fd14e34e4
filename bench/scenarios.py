"""What each scenario loads, on which systems, and what it compares.

A scenario is a Plan: the runs that make up one round (each run is one
system under one load), the calls to verify first, and the ratios and
targets computed from the rounds. The runner (bench/runner.py) decides
the order and the timing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2
from usersvc.domain.listing import Cursor, Filter, Ordering
from usersvc.services.pagination import encode_page_token, query_fingerprint
from usersvc.services.tokens import key_ring_of

from .baselines import common as baseline_tokens
from .calls import (
    AUTH_SERVICE,
    USER_SERVICE,
    Call,
    HttpCall,
    bearer,
    expect_display_name,
    expect_page,
    expect_token,
    expect_user,
    invoke,
)
from .h2load import LoadShape
from .results import AbsoluteSpec, Measurement, RatioSpec, Target
from .seed import (
    ADMIN_EMAIL,
    SEED_DOMAIN,
    USER_EMAIL,
    Seeded,
    delete_users,
    reset_lockouts,
    user_at,
)
from .systems import BARE, NAIVE, SEEDS, USERSVC, USERSVC_BATCH, System, usersvc_system

SCENARIOS = (
    "getuser",
    "lookup",
    "list",
    "update",
    "update-random",
    "create",
    "login",
    "batch",
    "import",
    "batch-writes",
    "events",
    "events-served",
)
# Scenarios that compare usersvc with the baselines (the others load usersvc only).
COMPARED = frozenset({"getuser", "lookup", "list", "update", "update-random", "create"})
# Connections each events-served server keeps (USERSVC_DB_POOL_SIZE;
# --served-pool).
SERVED_POOL = 5
# Scenarios that run on a database of their own (the others on the bench
# database, vacuumed before each of them).
OWN_DATABASE = frozenset({"events"})

# Ratios to the ceiling (bare) of the same call, measured in the same round.
READ_RPS_TARGET = Target(">=", 0.85)
READ_P99_TARGET = Target("<=", 1.5)
SEEDS_RPS_TARGET = Target(">=", 3.0)
LIST_RPS_TARGET = Target(">=", 0.7)
UPDATE_RANDOM_TARGET = Target(">=", 0.6)
UPDATE_HOT_TARGET = Target(">=", 0.5)
CREATE_TARGET = Target(">=", 0.5)
DEEP_PAGE_TARGET = Target("<=", 1.5)
FIRST_PAGE_TARGET = Target("<=", 1.5)
FLOOD_P99_TARGET = Target("<=", 2.0)
IMPORT_TARGET = Target(">=", 20_000)
DEEP_FRACTION = 0.9
IMPORT_METHOD = "ImportUsers"
BATCH_DOMAIN = "batch.bench"
CREATE_DOMAIN = "create.bench"
# Calls in flight on the hot row (the figure the performance issue measured).
HOT_ROW_IN_FLIGHT = 64
# Rows the random-row update spreads over (each driver task owns its share).
UPDATE_SAMPLE_ROWS = 4096


@dataclass
class LoadRun:
    """One system under h2load; each ``background`` load (the Login flood)
    runs beside it, as (system, call, shape)."""

    key: str
    system: System
    call: Call | HttpCall
    shape: LoadShape
    background: list[tuple[System, Call, LoadShape]] = field(default_factory=list)
    # Runs before every measurement of this run (not timed).
    prepare: Callable[[], Awaitable[None]] | None = None


Drive = Callable[[float], Awaitable[tuple[int, float]]]
# One call of a driver: (task number, the method, metadata).
OneCall = Callable[[int, Any, tuple[tuple[str, str], ...]], Awaitable[None]]


@dataclass
class DriverRun:
    """One system under a Python client: ``drive(seconds)`` returns (units
    done, seconds taken)."""

    key: str
    system: System
    drive: Drive
    unit: str


@dataclass
class InProcessRun:
    """Work this process does itself, no server under load (the events
    scenario): ``measure(seconds)`` gives the round's Measurement."""

    key: str
    measure: Callable[[float], Awaitable[Measurement]]
    description: str


@dataclass
class Plan:
    name: str
    title: str
    runs: list[LoadRun | DriverRun | InProcessRun] = field(default_factory=list)
    checks: list[tuple[System, str, Call | HttpCall]] = field(default_factory=list)
    ratios: list[RatioSpec] = field(default_factory=list)
    absolutes: list[AbsoluteSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Why the scenario cannot run (printed instead of results).
    skipped: str | None = None
    teardown: Callable[[], Awaitable[None]] | None = None


@dataclass
class Context:
    usersvc: System
    baselines: list[System]
    seeded: Seeded
    database_url: str
    work_dir: Path
    shape: LoadShape
    list_shape: LoadShape
    user_token: str
    admin_token: str
    flood_getuser_rps: float
    flood_streams: int
    batch_tasks: int
    batch_size: int
    import_streams: int
    import_batch: int
    import_users: int
    workers: int | None
    extra_systems: list[System] = field(default_factory=list)
    # The seeds' FastAPI design and a token it accepts (getuser only).
    seeds: System | None = None
    seeds_token: str = ""
    warmup: float = 1.0
    # batch-writes: users renamed per run; events: see bench/events.py.
    batch_writes_users: int = 1000
    events_count: int = 20_000
    events_rate: int = 500
    events_writes: int = 1000
    # events-served: each server's database pool (bench/event_served.py).
    served_pool: int = SERVED_POOL

    @property
    def compared(self) -> list[System]:
        return [self.usersvc, *self.baselines]

    def has(self, name: str) -> bool:
        return any(system.name == name for system in self.baselines)


async def login(address: str, email: str, password: str) -> str:
    """An access token from AuthService.Login. Raises grpc.aio.AioRpcError."""
    call = Call(
        AUTH_SERVICE + "Login",
        auth_service_pb2.LoginRequest(email=email, password=password),
        auth_service_pb2.LoginResponse,
        expect_token,
    )
    response = await invoke(address, call)
    return str(response.access_token)


def _vs_baselines(
    ctx: Context,
    key_suffix: str = "",
    *,
    rps_target: Target | None = None,
    p99_target: Target | None = None,
    p99: bool = True,
) -> list[RatioSpec]:
    specs: list[RatioSpec] = []
    suffix = f" {key_suffix}" if key_suffix else ""
    what = f"{key_suffix} " if key_suffix else ""
    if ctx.has(BARE):
        specs.append(
            RatioSpec(
                f"usersvc / bare {what}req/s",
                (USERSVC + suffix, "rps"),
                (BARE + suffix, "rps"),
                rps_target,
            )
        )
        if p99:
            specs.append(
                RatioSpec(
                    f"usersvc / bare {what}p99",
                    (USERSVC + suffix, "p99_ms"),
                    (BARE + suffix, "p99_ms"),
                    p99_target,
                )
            )
        specs.append(
            RatioSpec(
                f"usersvc / bare {what}CPU per call",
                (USERSVC + suffix, "cpu_us"),
                (BARE + suffix, "cpu_us"),
            )
        )
    if ctx.has(NAIVE):
        specs.append(
            RatioSpec(
                f"usersvc / naive {what}req/s",
                (USERSVC + suffix, "rps"),
                (NAIVE + suffix, "rps"),
            )
        )
    return specs


def expect_json_user(*, id: str, email: str) -> Callable[[Any], str | None]:
    """The FastAPI design's JSON user has this id and email."""

    def check(answer: Any) -> str | None:
        if not isinstance(answer, dict):
            return f"not a JSON object: {answer!r}"
        if answer.get("id") != id or answer.get("email") != email:
            return f"user {answer.get('id')!r} {answer.get('email')!r}, expected {id!r} {email!r}"
        return None

    return check


def getuser(ctx: Context) -> Plan:
    user_id = str(ctx.seeded.user.id)
    call = Call(
        USER_SERVICE + "GetUser",
        user_service_pb2.GetUserRequest(id=user_id),
        user_service_pb2.GetUserResponse,
        expect_user(id=user_id, email=USER_EMAIL),
        # The same header goes to the baselines (which ignore it), so every
        # system decodes the same request.
        bearer(ctx.user_token),
    )
    plan = Plan("getuser", "GetUser (authenticated: a user reading itself)")
    for system in ctx.compared:
        plan.runs.append(LoadRun(system.name, system, call, ctx.shape))
        plan.checks.append((system, "GetUser", call))
    plan.ratios = _vs_baselines(ctx, rps_target=READ_RPS_TARGET, p99_target=READ_P99_TARGET)
    if ctx.seeds is not None:
        from .baselines.seeds import USERS_PATH

        http_call = HttpCall(
            USERS_PATH + user_id,
            expect_json_user(id=user_id, email=USER_EMAIL),
            bearer(ctx.seeds_token),
        )
        # HTTP/1.1 has one call in flight per connection: as many
        # connections as the gRPC runs have calls in flight.
        shape = replace(ctx.shape, clients=ctx.shape.in_flight, streams=1)
        plan.runs.append(LoadRun(SEEDS, ctx.seeds, http_call, shape))
        plan.checks.append((ctx.seeds, "GET /api/v1/users/{id}", http_call))
        plan.ratios.append(
            RatioSpec(
                "usersvc / fastapi (seeds' design) req/s",
                (USERSVC, "rps"),
                (SEEDS, "rps"),
                SEEDS_RPS_TARGET,
            )
        )
        plan.notes.append(
            f"fastapi: h2load --h1 {shape.describe()}, JSON over HTTP/1.1, HS256 bearer "
            "token, AsyncSession.get per request (bench/baselines/seeds.py)"
        )
    return plan


async def lookup(ctx: Context) -> Plan:
    depth = ctx.seeded.rows // 2 + 7
    email = Seeded.email_at(depth)
    row_id, _ = await user_at(ctx.database_url, depth)
    call = Call(
        USER_SERVICE + "LookupUser",
        user_service_pb2.LookupUserRequest(email=email),
        user_service_pb2.LookupUserResponse,
        expect_user(id=str(row_id), email=email),
        bearer(ctx.admin_token),
    )
    plan = Plan("lookup", "LookupUser (by email, as an admin)")
    for system in ctx.compared:
        plan.runs.append(LoadRun(system.name, system, call, ctx.shape))
        plan.checks.append((system, "LookupUser", call))
    plan.ratios = _vs_baselines(ctx, rps_target=READ_RPS_TARGET, p99_target=READ_P99_TARGET)
    return plan


def _page_token_keys(system: System) -> tuple[bytes, ...]:
    """The HMAC keys usersvc tags page tokens with: derived from its signing
    key, which the harness wrote (systems.usersvc_system)."""
    pem = Path(system.env["USERSVC_JWT_PRIVATE_KEY_FILE"]).read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("the bench's usersvc signs with an Ed25519 key")
    return key_ring_of(key).page_token_keys


def _page_token(system: System, cursor: tuple[Any, Any], total: int) -> str:
    create_time, row_id = cursor
    if system.name == USERSVC:
        return encode_page_token(
            Cursor(sort_value=create_time, id=row_id),
            fingerprint=query_fingerprint(Filter(), Ordering(), False),
            total_size=total,
            keys=_page_token_keys(system),
        )
    return baseline_tokens.encode_page_token(baseline_tokens.PageToken(create_time, row_id, total))


async def list_pages(ctx: Context) -> Plan:
    rows = ctx.seeded.rows
    total = rows + ctx.seeded.accounts
    deep = int(rows * DEEP_FRACTION)
    page = baseline_tokens.DEFAULT_PAGE_SIZE
    cursors = {}
    for name, depth in (("page2", page), ("deep", deep)):
        row_id, create_time = await user_at(ctx.database_url, depth)
        cursors[name] = (create_time, row_id, depth)
    plan = Plan(
        "list",
        f"ListUsers, {page} per page: first page (with total_size), page 2, "
        f"and the page after depth {deep:,} of {total:,} (keyset cursors); "
        f"h2load {ctx.list_shape.describe()}",
    )
    for system in ctx.compared:
        first = Call(
            USER_SERVICE + "ListUsers",
            user_service_pb2.ListUsersRequest(),
            user_service_pb2.ListUsersResponse,
            expect_page(first_email=Seeded.email_at(1), size=page, total=total),
            bearer(ctx.admin_token),
        )
        plan.runs.append(LoadRun(f"{system.name} first", system, first, ctx.list_shape))
        plan.checks.append((system, "ListUsers first page", first))
        for name, (create_time, row_id, depth) in cursors.items():
            token = _page_token(system, (create_time, row_id), total)
            call = Call(
                USER_SERVICE + "ListUsers",
                user_service_pb2.ListUsersRequest(page_token=token),
                user_service_pb2.ListUsersResponse,
                expect_page(first_email=Seeded.email_at(depth + 1), size=page, total=total),
                bearer(ctx.admin_token),
            )
            plan.runs.append(LoadRun(f"{system.name} {name}", system, call, ctx.list_shape))
            plan.checks.append((system, f"ListUsers {name}", call))
    for system in ctx.compared:
        name = system.name
        plan.ratios.append(
            RatioSpec(
                f"{name}: first page / page 2 p50",
                (f"{name} first", "p50_ms"),
                (f"{name} page2", "p50_ms"),
                FIRST_PAGE_TARGET if name == USERSVC else None,
            )
        )
        plan.ratios.append(
            RatioSpec(
                f"{name}: deep / page 2 p50 (keyset cost alone)",
                (f"{name} deep", "p50_ms"),
                (f"{name} page2", "p50_ms"),
                DEEP_PAGE_TARGET if name == USERSVC else None,
            )
        )
    for which in ("first", "page2", "deep"):
        plan.ratios.extend(
            _vs_baselines(
                ctx, which, rps_target=LIST_RPS_TARGET if which == "page2" else None, p99=False
            )
        )
    plan.notes.append(
        "a first page's total_size is exact up to 10,000 matches and an estimate beyond "
        "(docs/api.md); the bare ceiling takes the planner's estimate in its one statement; "
        "later pages carry the figure in the token"
    )
    plan.notes.append(
        "4 calls in flight on one connection, as before the first page became cheap, so "
        "the figures compare with earlier runs"
    )
    return plan


def update(ctx: Context) -> Plan:
    user_id = str(ctx.seeded.user.id)
    shape = replace(ctx.shape, streams=max(1, HOT_ROW_IN_FLIGHT // ctx.shape.clients))
    plan = Plan(
        "update",
        "UpdateUser on one hot row (display_name mask, no etag; every call the same "
        f"user), h2load {shape.describe()}",
    )
    for system in ctx.compared:
        name = f"Bench {system.name}"
        call = Call(
            USER_SERVICE + "UpdateUser",
            user_service_pb2.UpdateUserRequest(
                user=user_pb2.User(id=user_id, display_name=name),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            user_service_pb2.UpdateUserResponse,
            expect_display_name(user_id, name),
            bearer(ctx.user_token),
        )
        plan.runs.append(LoadRun(system.name, system, call, shape))
        plan.checks.append((system, "UpdateUser", call))
    plan.ratios = _vs_baselines(ctx, rps_target=UPDATE_HOT_TARGET)
    plan.notes.append(
        "h2load repeats one body, so every update hits one row: the calls queue on its "
        "row lock, as a hot row would; the ceiling is one UPDATE ... WHERE id = $1 RETURNING"
    )
    return plan


async def _drive_unary(
    address: str,
    path: str,
    response_type: type[Any],
    *,
    tasks: int,
    seconds: float,
    warmup: float,
    metadata: tuple[tuple[str, str], ...],
    one_call: OneCall,
) -> tuple[int, float]:
    """A closed loop of ``tasks`` Python gRPC callers, each awaiting
    ``one_call(task, method, metadata)`` again and again; calls that end
    within the ``warmup`` are not counted. (calls counted, seconds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(
            path,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        began = time.perf_counter()
        counting_from = began + warmup
        deadline = counting_from + seconds

        async def worker(task: int) -> int:
            done = 0
            while (now := time.perf_counter()) < deadline:
                await one_call(task, method, metadata)
                if now >= counting_from:
                    done += 1
            return done

        counts = await asyncio.gather(*(worker(task) for task in range(tasks)))
        return sum(counts), time.perf_counter() - counting_from


def _unary_drives(
    ctx: Context,
    method: str,
    response_type: type[Any],
    one_call: OneCall,
    tasks: int,
    token: str,
) -> Callable[[System], Drive]:
    """For a system, the Drive that runs ``_drive_unary`` on its UserService
    ``method`` with ``tasks`` callers, bearing ``token``."""

    def drive_on(system: System) -> Drive:
        async def drive(seconds: float) -> tuple[int, float]:
            return await _drive_unary(
                system.address,
                USER_SERVICE + method,
                response_type,
                tasks=tasks,
                seconds=seconds,
                warmup=ctx.warmup,
                metadata=bearer(token),
                one_call=one_call,
            )

        return drive

    return drive_on


async def _sample_rows(url: str, count: int) -> list[tuple[str, int]]:
    """(id, version) of ``count`` seeded users spread over the table."""
    from .baselines.bare import connect_kwargs

    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        rows = await connection.fetch(
            "SELECT id, version FROM users TABLESAMPLE SYSTEM (2) "
            "WHERE email LIKE $1 AND delete_time IS NULL LIMIT $2",
            f"user%@{SEED_DOMAIN}",
            count,
        )
    finally:
        await connection.close()
    return [(str(row["id"]), int(row["version"])) for row in rows]


def etag_updates(rows: list[tuple[str, int]], tasks: int, name: str) -> OneCall:
    """UpdateUser of a display name (``name`` and a serial number) of a
    random one of ``rows`` ((id, version)) with its etag, each answer
    checked. Each task owns every tasks-th row, so no two calls in flight
    race for one row and every etag sent is the current one. The etags go
    from system to system with the rows: all answer with the row's
    version."""
    etags = {row_id: f"v{version}" for row_id, version in rows}
    owned = [[row_id for row_id, _ in rows[task::tasks]] for task in range(tasks)]
    serial = itertools.count()
    mask = field_mask_pb2.FieldMask(paths=["display_name"])

    async def one_call(task: int, method: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        row_id = random.choice(owned[task])
        display_name = f"{name} {next(serial)}"
        request = user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=row_id, display_name=display_name, etag=etags[row_id]),
            update_mask=mask,
        )
        user = (await method(request, metadata=metadata, timeout=30)).user
        if user.id != row_id or user.display_name != display_name or user.etag == etags[row_id]:
            raise AssertionError(f"UpdateUser of {row_id} answered {user.id} {user.etag}")
        etags[row_id] = user.etag

    return one_call


def new_user_creates(domain: str, prefix: str, password: str) -> OneCall:
    """CreateUser of a new user ``<prefix><run tag>-<n>@<domain>`` per
    call, each answer checked."""
    serial = itertools.count()
    run_tag = secrets.token_hex(3)

    async def one_call(task: int, method: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        del task
        email = f"{prefix}{run_tag}-{next(serial)}@{domain}"
        request = user_service_pb2.CreateUserRequest(
            email=email, password=password, display_name="Created user"
        )
        user = (await method(request, metadata=metadata, timeout=30)).user
        if user.email != email or not user.id:
            raise AssertionError(f"CreateUser of {email} answered {user.email!r}")

    return one_call


async def update_random(ctx: Context) -> Plan:
    tasks = ctx.shape.in_flight
    sample = await _sample_rows(ctx.database_url, UPDATE_SAMPLE_ROWS)
    if len(sample) < tasks:
        raise LookupError(f"only {len(sample)} seeded users to update, need {tasks}")
    one_call = etag_updates(sample, tasks, "Bench random")
    drive_on = _unary_drives(
        ctx, "UpdateUser", user_service_pb2.UpdateUserResponse, one_call, tasks, ctx.admin_token
    )
    plan = Plan(
        "update-random",
        f"UpdateUser of random rows with their etag (display_name mask, {len(sample):,} "
        f"rows, {tasks} calls in flight, Python grpc.aio client)",
    )
    plan.runs = [DriverRun(USERSVC, ctx.usersvc, drive_on(ctx.usersvc), "calls")]
    bare = next((system for system in ctx.baselines if system.name == BARE), None)
    if bare is not None:
        plan.runs.append(DriverRun(BARE, bare, drive_on(bare), "calls"))
        plan.ratios = [
            RatioSpec(
                "usersvc / bare req/s", (USERSVC, "rps"), (BARE, "rps"), UPDATE_RANDOM_TARGET
            ),
            RatioSpec("usersvc / bare CPU per call", (USERSVC, "cpu_us"), (BARE, "cpu_us")),
        ]
    plan.notes.append(
        "every answer is checked by the driver (the id, the new name, a new etag); the "
        "ceiling is one UPDATE ... WHERE id = $1 AND version = $2 RETURNING; the client "
        "runs in the harness's process and costs both systems alike"
    )
    return plan


async def create(ctx: Context) -> Plan:
    system = usersvc_system(
        name=USERSVC_BATCH,
        database_url=ctx.database_url,
        work_dir=ctx.work_dir,
        bcrypt_rounds=4,
        workers=ctx.workers,
    )
    await _start_extra(ctx, system)
    token = await login(system.address, ADMIN_EMAIL, ctx.seeded.admin.password)
    tasks = ctx.shape.in_flight
    password = _strong_password()
    run_tag = secrets.token_hex(3)  # of the checks' emails
    one_call = new_user_creates(CREATE_DOMAIN, "c", password)
    drive_on = _unary_drives(
        ctx, "CreateUser", user_service_pb2.CreateUserResponse, one_call, tasks, token
    )
    plan = Plan(
        "create",
        f"CreateUser, one user per call, {tasks} calls in flight (Python grpc.aio client), "
        "usersvc at bcrypt cost 4",
    )
    plan.runs = [DriverRun(USERSVC, system, drive_on(system), "calls")]
    for target in [system, *ctx.baselines]:
        if target.name in (USERSVC_BATCH, BARE):
            check_email = f"check-{target.name}-{run_tag}@{CREATE_DOMAIN}"
            check = Call(
                USER_SERVICE + "CreateUser",
                user_service_pb2.CreateUserRequest(
                    email=check_email, password=password, display_name="Created user"
                ),
                user_service_pb2.CreateUserResponse,
                expect_user(email=check_email),
                bearer(token),
            )
            plan.checks.append((target, "CreateUser", check))
    bare = next((target for target in ctx.baselines if target.name == BARE), None)
    if bare is not None:
        plan.runs.append(DriverRun(BARE, bare, drive_on(bare), "calls"))
        plan.ratios = [
            RatioSpec("usersvc / bare req/s", (USERSVC, "rps"), (BARE, "rps"), CREATE_TARGET),
            RatioSpec("usersvc / bare CPU per call", (USERSVC, "cpu_us"), (BARE, "cpu_us")),
        ]
    plan.notes.append(
        "the ceiling is one INSERT ... RETURNING with a hash computed once; usersvc hashes "
        "each password at cost 4 (USERSVC_BCRYPT_ROUNDS=4) on its bcrypt threads"
    )

    async def teardown() -> None:
        await _stop_extra(ctx, system)
        await delete_users(ctx.database_url, CREATE_DOMAIN)

    plan.teardown = teardown
    return plan


def login_flood(ctx: Context) -> Plan:
    user_id = str(ctx.seeded.user.id)
    getuser_call = Call(
        USER_SERVICE + "GetUser",
        user_service_pb2.GetUserRequest(id=user_id),
        user_service_pb2.GetUserResponse,
        expect_user(id=user_id, email=USER_EMAIL),
        bearer(ctx.user_token),
    )
    login_calls = [
        Call(
            AUTH_SERVICE + "Login",
            auth_service_pb2.LoginRequest(email=account.email, password=account.password),
            auth_service_pb2.LoginResponse,
            expect_token,
        )
        for account in ctx.seeded.flood
    ]
    clients = ctx.shape.clients
    steady = replace(ctx.shape, rps_per_client=ctx.flood_getuser_rps / clients)
    # One h2load per flood account, each with fewer logins in flight than
    # the lockout threshold.
    flood = LoadShape(clients=1, streams=ctx.flood_streams, seconds=0.0, warmup_seconds=0.5)
    system = ctx.usersvc
    plan = Plan(
        "login",
        f"GetUser at a fixed {ctx.flood_getuser_rps:g}/s, idle vs during a Login flood "
        f"(bcrypt 12, {flood.in_flight * len(login_calls)} logins in flight over "
        f"{len(login_calls)} accounts)",
    )
    plan.runs = [
        LoadRun("getuser idle", system, getuser_call, steady),
        LoadRun(
            "getuser + login flood",
            system,
            getuser_call,
            steady,
            background=[(system, call, flood) for call in login_calls],
            prepare=functools.partial(reset_lockouts, ctx.database_url),
        ),
    ]
    plan.checks = [(system, "GetUser", getuser_call)]
    plan.checks += [(system, "Login", call) for call in login_calls]
    plan.ratios = [
        RatioSpec(
            "flood / idle GetUser p99",
            ("getuser + login flood", "p99_ms"),
            ("getuser idle", "p99_ms"),
            FLOOD_P99_TARGET,
        ),
        RatioSpec(
            "flood / idle GetUser p50",
            ("getuser + login flood", "p50_ms"),
            ("getuser idle", "p50_ms"),
        ),
    ]
    plan.absolutes = [
        AbsoluteSpec("logins/s during the flood", "getuser + login flood", "background_rps")
    ]
    return plan


async def _start_extra(ctx: Context, system: System) -> None:
    system.start()
    ctx.extra_systems.append(system)
    await system.wait_ready(60.0, health=True)


async def _stop_extra(ctx: Context, system: System) -> None:
    await asyncio.to_thread(system.stop)
    ctx.extra_systems.remove(system)


def _strong_password() -> str:
    return "bench " + secrets.token_urlsafe(12)


async def batch_create(ctx: Context) -> Plan:
    system = usersvc_system(
        name=USERSVC_BATCH,
        database_url=ctx.database_url,
        work_dir=ctx.work_dir,
        bcrypt_rounds=4,
        workers=ctx.workers,
    )
    await _start_extra(ctx, system)
    token = await login(system.address, ADMIN_EMAIL, ctx.seeded.admin.password)
    password = _strong_password()
    serial = itertools.count()
    run_tag = secrets.token_hex(3)

    def request(size: int) -> user_service_pb2.BatchCreateUsersRequest:
        return user_service_pb2.BatchCreateUsersRequest(
            requests=[
                user_service_pb2.CreateUserRequest(
                    email=f"b{run_tag}-{next(serial)}@{BATCH_DOMAIN}",
                    password=password,
                    display_name="Batch user",
                )
                for _ in range(size)
            ]
        )

    async def drive(seconds: float) -> tuple[int, float]:
        async with grpc.aio.insecure_channel(system.address) as channel:
            method = channel.unary_unary(
                USER_SERVICE + "BatchCreateUsers",
                request_serializer=user_service_pb2.BatchCreateUsersRequest.SerializeToString,
                response_deserializer=user_service_pb2.BatchCreateUsersResponse.FromString,
            )
            metadata = bearer(token)
            began = time.perf_counter()
            deadline = began + seconds

            async def worker() -> int:
                created = 0
                while time.perf_counter() < deadline:
                    response = await method(request(ctx.batch_size), metadata=metadata, timeout=120)
                    if len(response.users) != ctx.batch_size:
                        raise AssertionError(
                            f"BatchCreateUsers created {len(response.users)} users, "
                            f"expected {ctx.batch_size}"
                        )
                    created += len(response.users)
                return created

            counts = await asyncio.gather(*(worker() for _ in range(ctx.batch_tasks)))
            return sum(counts), time.perf_counter() - began

    check = Call(
        USER_SERVICE + "BatchCreateUsers",
        request(2),
        user_service_pb2.BatchCreateUsersResponse,
        lambda response: None if len(response.users) == 2 else "not 2 users created",
        bearer(token),
    )
    plan = Plan(
        "batch",
        f"BatchCreateUsers, {ctx.batch_size} users per call, {ctx.batch_tasks} calls in "
        "flight (Python grpc.aio client)",
    )
    plan.runs = [DriverRun(USERSVC_BATCH, system, drive, "users")]
    plan.checks = [(system, "BatchCreateUsers", check)]
    plan.absolutes = [AbsoluteSpec("users/s created", USERSVC_BATCH, "rps", unit="users/s")]
    plan.notes.append(
        "run against a second usersvc with USERSVC_BCRYPT_ROUNDS=4: at cost 12 every new "
        "password takes a bcrypt hash of ~0.2 s on one core, so creates are bounded by "
        "about (cores / 0.2 s) users/s whatever the service does"
    )

    async def teardown() -> None:
        await _stop_extra(ctx, system)
        await delete_users(ctx.database_url, BATCH_DOMAIN)

    plan.teardown = teardown
    return plan


def import_rpc_available() -> bool:
    """Whether the generated UserService has ImportUsers yet."""
    service = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
    return IMPORT_METHOD in service.methods_by_name


async def import_users(ctx: Context) -> Plan:
    plan = Plan("import", "ImportUsers (client streaming, existing bcrypt hashes)")
    if not import_rpc_available():
        plan.skipped = (
            "usersvc.v1.UserService/ImportUsers is not in the generated code yet; "
            "the scenario runs once it is"
        )
        return plan
    from .importer import import_plan

    return await import_plan(ctx, plan)


async def batch_writes(ctx: Context) -> Plan:
    from .batch_writes import batch_writes_plan

    return await batch_writes_plan(ctx)


async def events(ctx: Context) -> Plan:
    from .events import events_plan

    return await events_plan(ctx)


async def events_served(ctx: Context) -> Plan:
    from .event_served import events_served_plan

    return await events_served_plan(ctx)


BUILDERS: dict[str, Callable[[Context], Plan | Awaitable[Plan]]] = {
    "getuser": getuser,
    "lookup": lookup,
    "list": list_pages,
    "update": update,
    "update-random": update_random,
    "create": create,
    "login": login_flood,
    "batch": batch_create,
    "import": import_users,
    "batch-writes": batch_writes,
    "events": events,
    "events-served": events_served,
}
