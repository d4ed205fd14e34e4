"""Pieces of the rolling-restart drills: replicas (``usersvc serve``
processes on fixed ports, one database, one signing key) that can be
restarted in place, and a paced load of mixed calls, either through
``usersvc.client`` or through bare grpc stubs, tallied by status code.

Everything is bounded: the load makes a fixed number of calls, each with a
deadline; every wait has a limit; only 127.0.0.1 is used."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from support.servers import free_port

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.client import PasswordLogin, UsersvcClient, UsersvcError

from .support import (
    TRANSPORT,
    ServeProcess,
    new_email,
    new_password,
    reason_of,
    service_env,
    serving,
)

# Generous: the machine is shared, and while one replica restarts the other
# takes every call; a call that still misses it is stuck, not slow.
CALL_DEADLINE_SECONDS = 10.0
# A replica that answered SERVING must take load traffic within this.
REJOIN_LIMIT_SECONDS = 30.0
LOAD_METHODS = {
    "/usersvc.v1.UserService/GetUser",
    "/usersvc.v1.UserService/CreateUser",
    "/usersvc.v1.AuthService/GetJwks",
}


def replica_envs(
    database_url: str, base: Path, *, drain_seconds: float, grace_seconds: float = 10.0
) -> list[dict[str, str]]:
    """The environments of two replicas: one database and one signing key,
    each its own port and data directory."""
    first = service_env(
        database_url,
        base / "data-a",
        USERSVC_SHUTDOWN_DRAIN_SECONDS=str(drain_seconds),
        USERSVC_SHUTDOWN_GRACE_SECONDS=str(grace_seconds),
        # On this shared machine, other people's processes at nice 0 starved
        # the one bcrypt thread at nice 10: CreateUser took 1 to 9 s whatever
        # the restarts did. The drill measures restarts, not that.
        USERSVC_BCRYPT_NICE="0",
        # PostgreSQL is shared with other test runs (100 connections): two
        # replicas, one of them briefly twice during its restart, stay
        # within 48 (at 5 + 5, a replica starved of CPU ran out of them).
        USERSVC_DB_POOL_SIZE="8",
        USERSVC_DB_MAX_OVERFLOW="8",
    )
    second = dict(first)
    second.update(
        USERSVC_LISTEN_ADDR=f"127.0.0.1:{free_port()}", USERSVC_DATA_DIR=str(base / "data-b")
    )
    return [first, second]


class Replica:
    """One replica's address; each incarnation logs to a file of its own."""

    def __init__(self, name: str, env: Mapping[str, str], base: Path) -> None:
        self.name = name
        self.env = dict(env)
        self.base = base
        self.incarnation = 0
        self.process: ServeProcess | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.stops: list[tuple[int, float]] = []  # (exit code, seconds)

    @property
    def address(self) -> str:
        return self.env["USERSVC_LISTEN_ADDR"]

    async def start(self) -> None:
        """Start an incarnation; returns once it reports SERVING."""
        self.incarnation += 1
        stack = contextlib.AsyncExitStack()
        log = self.base / f"{self.name}-{self.incarnation}.log"
        self.process = await stack.enter_async_context(serving(self.env, log))
        self._stack = stack

    async def restart(self, limit: float) -> None:
        """SIGTERM, wait for the exit, start again, and wait until the
        load reaches the new incarnation."""
        assert self.process is not None
        self.stops.append(await self.process.sigterm_and_wait(limit))
        await self.close()
        await self.start()
        await self.until_taking_load()

    async def until_taking_load(self) -> None:
        """Until the current incarnation has logged a load call (clients
        reconnect with a backoff; a rolling restart goes on only when the
        restarted replica is back in their rotation)."""
        assert self.process is not None
        async with asyncio.timeout(REJOIN_LIMIT_SECONDS):
            # Another process's log file: nothing to wait on but the file.
            while not any(  # noqa: ASYNC110
                line.get("method") in LOAD_METHODS for line in self.process.access_lines()
            ):
                await asyncio.sleep(0.05)  # polled, bounded by the timeout

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None


@dataclass
class Outcomes:
    """Every call of a load: counts by (method, code), and the first
    message of each failure kind. A failure the service itself answered is
    counted as ``CODE/REASON`` (its ErrorInfo reason), one from grpc (a
    refusal, a dropped call, a lost connection) as the bare ``CODE``."""

    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    details: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, method: str, code: str, detail: str = "") -> None:
        self.counts[(method, code)] += 1
        if code != "OK":
            self.details.setdefault((method, code), detail)

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def failed(self) -> int:
        return sum(n for (_, code), n in self.counts.items() if code != "OK")

    @property
    def refused(self) -> int:
        """Failures a stop causes, all from grpc: CANCELLED (grpc core
        dropped the call), UNAVAILABLE (refused, or the connection went
        away)."""
        return sum(
            n for (_, code), n in self.counts.items() if code in ("CANCELLED", "UNAVAILABLE")
        )

    def by_code(self) -> dict[str, int]:
        codes: collections.Counter[str] = collections.Counter()
        for (_, code), n in self.counts.items():
            codes[code] += n
        return dict(sorted(codes.items()))

    def report(self, title: str) -> str:
        lines = [f"{title}: {self.calls} calls, {self.failed} failed, by code {self.by_code()}"]
        for (method, code), n in sorted(self.counts.items()):
            line = f"  {method:<12} {code:<18} {n:>6}"
            if (method, code) in self.details:
                line += f"  ({self.details[(method, code)][:100]})"
            lines.append(line)
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps({"calls": self.calls, "failed": self.failed, "by_code": self.by_code()})


Call = Callable[[int], Awaitable[None]]


async def paced(
    call: Call,
    *,
    rate: float,
    seconds: float,
    longer_until: asyncio.Event,
    max_seconds: float,
    concurrency: int = 256,
) -> None:
    """Calls at ``rate`` per second, the i-th started at i / rate seconds
    (later when ``concurrency`` calls are still in flight), for ``seconds``
    and beyond until ``longer_until`` is set, never more than
    ``max_seconds``; all awaited."""
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    started = loop.time()
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int) -> None:
        try:
            await call(index)
        finally:
            slots.release()

    for index in range(int(rate * max_seconds)):
        if index >= rate * seconds and longer_until.is_set():
            break
        delay = started + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing, not synchronisation
        await slots.acquire()
        task = asyncio.create_task(one(index))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


def balanced_target(replicas: list[Replica]) -> str:
    """One target naming every replica: ipv4:127.0.0.1:A,127.0.0.1:B."""
    return "ipv4:" + ",".join(replica.address for replica in replicas)


ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")


class ClientLoad:
    """Mixed calls through usersvc.client, balanced round_robin over the
    replicas: GetUser of itself (a logged-in user), CreateUser (idempotent:
    the client gives each a request_id) and GetJwks."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.outcomes = Outcomes()
        self._target = balanced_target(replicas)
        self._user: UsersvcClient | None = None
        self._anonymous: UsersvcClient | None = None

    async def __aenter__(self) -> ClientLoad:
        self._anonymous = UsersvcClient.connect(
            self._target, options=[ROUND_ROBIN], default_timeout=CALL_DEADLINE_SECONDS
        )
        email, password = new_email("rolling"), new_password()
        await self._anonymous.create_user(email, password)
        self._user = UsersvcClient.connect(
            self._target,
            credentials=PasswordLogin(email, password),
            options=[ROUND_ROBIN],
            default_timeout=CALL_DEADLINE_SECONDS,
        )
        await self._user.get_user()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in (self._user, self._anonymous):
            if client is not None:
                await client.close()

    async def call(self, index: int) -> None:
        assert self._user is not None
        assert self._anonymous is not None
        kind = index % 4
        method = ("GetUser", "CreateUser", "GetUser", "GetJwks")[kind]
        try:
            if kind == 1:
                await self._anonymous.create_user(new_email("load"), new_password())
            elif kind == 3:
                await self._anonymous.get_jwks()
            else:
                await self._user.get_user()
        except UsersvcError as error:
            code = error.code.name + (f"/{error.reason}" if error.reason else "")
            self.outcomes.add(method, code, error.message)
        else:
            self.outcomes.add(method, "OK")


def raw_channel_options() -> list[tuple[str, Any]]:
    """A bare grpc channel that balances like usersvc.client (round_robin,
    health checked) but repeats nothing: no retries, no retry policy."""
    config = {"healthCheckConfig": {"serviceName": ""}}
    return [
        ROUND_ROBIN,
        ("grpc.enable_retries", 0),
        ("grpc.service_config", json.dumps(config)),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class RawLoad:
    """The same mix as ClientLoad through bare grpc stubs on one channel:
    every failure counts, nothing is repeated."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.outcomes = Outcomes()
        self._target = balanced_target(replicas)
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    async def __aenter__(self) -> RawLoad:
        self._channel = grpc.aio.insecure_channel(self._target, options=raw_channel_options())
        users = user_service_pb2_grpc.UserServiceStub(self._channel)
        auth = auth_service_pb2_grpc.AuthServiceStub(self._channel)
        email, password = new_email("raw"), new_password()
        request = user_service_pb2.CreateUserRequest(email=email, password=password)
        await users.CreateUser(request, timeout=10, wait_for_ready=True)
        login = await auth.Login(auth_service_pb2.LoginRequest(email=email, password=password))
        self._metadata = (("authorization", f"Bearer {login.access_token}"),)
        self._users = users
        self._auth = auth
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            await self._channel.close(None)

    async def call(self, index: int) -> None:
        kind = index % 4
        method = ("GetUser", "CreateUser", "GetUser", "GetJwks")[kind]
        try:
            if kind == 1:
                await self._users.CreateUser(
                    user_service_pb2.CreateUserRequest(
                        email=new_email("load"),
                        password=new_password(),
                        request_id=uuid.uuid4().hex,
                    ),
                    timeout=CALL_DEADLINE_SECONDS,
                )
            elif kind == 3:
                await self._auth.GetJwks(
                    auth_service_pb2.GetJwksRequest(), timeout=CALL_DEADLINE_SECONDS
                )
            else:
                await self._users.GetUser(
                    user_service_pb2.GetUserRequest(id="me"),
                    metadata=self._metadata,
                    timeout=CALL_DEADLINE_SECONDS,
                )
        except grpc.aio.AioRpcError as error:
            reason = reason_of(error)
            code = error.code().name + ("" if reason == TRANSPORT else f"/{reason}")
            self.outcomes.add(method, code, error.details() or "")
        else:
            self.outcomes.add(method, "OK")


async def rolling_restart(
    replicas: list[Replica],
    call: Call,
    *,
    rate: float,
    seconds: float,
    first_restart_after: float,
    stop_limit: float,
) -> None:
    """Load at ``rate`` calls/s for ``seconds``; after
    ``first_restart_after`` seconds, restart each replica in turn (the
    next once the previous is back in rotation). On a slow day the load
    goes on until a second after the last restart (at most 3 x
    ``seconds``), so that every restart happens under load."""
    restarted = asyncio.Event()
    load = asyncio.create_task(
        paced(call, rate=rate, seconds=seconds, longer_until=restarted, max_seconds=3 * seconds)
    )
    try:
        await asyncio.sleep(first_restart_after)  # let the load settle first
        for replica in replicas:
            await replica.restart(stop_limit)
        await asyncio.sleep(1.0)  # load on both restarted replicas
    finally:
        restarted.set()
        await load
