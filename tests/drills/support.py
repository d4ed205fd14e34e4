"""Pieces of the fault drills: a ``usersvc serve`` process, a steady load
of client tasks that tallies every response, the server's access log read
back, and a TCP proxy that can stop forwarding (a database that hangs).

Nothing here touches the database directly; the drills check what they
need with their own queries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support import servers
from support.servers import PROJECT_ROOT as PROJECT_ROOT
from support.servers import SERVING as SERVING
from support.servers import STARTUP_DEADLINE_SECONDS as STARTUP_DEADLINE_SECONDS
from support.servers import health_status as health_status
from support.servers import serve_env

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)

# Every load call carries a deadline: a call that hangs shows up as
# DEADLINE_EXCEEDED in the tally instead of hanging the drill.
CALL_DEADLINE_SECONDS = 3.0
# The reason tallied for a status without ErrorInfo: grpc's own (a call
# refused at the door, a deadline the client's clock ended), not the service's.
TRANSPORT = "-"

_counter = itertools.count(1)


def new_email(prefix: str = "drill") -> str:
    return f"{prefix}-{next(_counter):06d}-{secrets.token_hex(3)}@example.com"


def new_password() -> str:
    return f"Pw-{secrets.token_hex(8)}!"


def signing_key_pem() -> str:
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def service_env(database_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a drill server: cheap bcrypt, no rate limits (the
    load comes from one address), a short grace period."""
    drill = {
        "USERSVC_JWT_PRIVATE_KEY": signing_key_pem(),
        "USERSVC_RATE_LIMIT_RPS": "0",
        "USERSVC_AUTH_RATE_LIMIT_RPS": "0",
        "USERSVC_SHUTDOWN_GRACE_SECONDS": "10",
    }
    return serve_env(database_url, data_dir, log_format="json", **{**drill, **extra})


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed call; TRANSPORT when the status has
    no details (grpc's own, not the service's)."""
    status = rpc_status.from_call(error)
    if status is None:
        return TRANSPORT
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return TRANSPORT


# ----------------------------------------------------------------- the process


class ServeProcess(servers.ServeProcess):
    """tests/support/servers.py's ServeProcess; ``log()`` is its text."""

    def log(self) -> str:
        return self.log_text()


@asynccontextmanager
async def serving(env: Mapping[str, str], log_file: Path) -> AsyncIterator[ServeProcess]:
    """``usersvc serve`` with ``env``, SERVING when entered; killed on exit
    if still running."""
    async with servers.serve_process(env, log_file, kind=ServeProcess) as server:
        yield server


# ----------------------------------------------------------------- the load


@dataclass
class Tally:
    """Every response of a drill, by method, status code and reason."""

    counts: collections.Counter[tuple[str, str, str]] = field(default_factory=collections.Counter)
    # Users whose CreateUser returned OK: each must exist afterwards.
    acknowledged: dict[str, str] = field(default_factory=dict)  # id -> email
    # The first status message seen for each failure kind.
    details: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def ok(self, method: str) -> None:
        self.counts[(method, "OK", "")] += 1

    def failed(self, method: str, error: grpc.aio.AioRpcError) -> None:
        key = (method, error.code().name, reason_of(error))
        self.counts[key] += 1
        self.details.setdefault(key, error.details() or "")

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    @property
    def successes(self) -> int:
        return sum(n for (_, code, _), n in self.counts.items() if code == "OK")

    def count(self, code: str, reason: str | None = None) -> int:
        return sum(
            n
            for (_, c, r), n in self.counts.items()
            if c == code and (reason is None or r == reason)
        )

    def by_outcome(self) -> collections.Counter[tuple[str, str]]:
        outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        for (_, code, reason), count in self.counts.items():
            outcomes[(code, reason)] += count
        return outcomes

    def of_method(self, method: str, code: str = "OK") -> int:
        return sum(n for (m, c, _), n in self.counts.items() if m == method and c == code)

    def report(self, title: str) -> str:
        lines = [f"{title}: {self.sent} calls"]
        for (method, code, reason), count in sorted(self.counts.items()):
            lines.append(f"  {method:<12} {code:<18} {reason:<22} {count:>6}")
            if (method, code, reason) in self.details:
                lines[-1] += f"  ({self.details[(method, code, reason)][:80]})"
        return "\n".join(lines)


@dataclass
class Account:
    email: str
    password: str
    token: str


class Load:
    """One task per account, each on a channel of its own, repeating: an
    anonymous CreateUser (a write to keep), a GetUser of itself with its
    token, and every fourth round a Login. Every response is tallied; after
    a failure a client pauses 50 ms, as a client with backoff would."""

    def __init__(self, address: str, accounts: Iterable[Account]) -> None:
        self.address = address
        self.accounts = list(accounts)
        self.tally = Tally()
        self._stopping = asyncio.Event()
        # Set after every response, so a drill can wait for the tally to
        # reach a state.
        self._responded = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._client(account), name=f"drill-client-{i}")
            for i, account in enumerate(self.accounts)
        ]

    async def stop(self) -> Tally:
        """Let every client finish its current call, then stop."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)
        return self.tally

    async def until(self, predicate: Callable[[Tally], bool], limit: float = 30.0) -> float:
        """Seconds until ``predicate(tally)`` holds; TimeoutError after
        ``limit``."""
        started = time.monotonic()
        async with asyncio.timeout(limit):
            while not predicate(self.tally):
                self._responded.clear()
                await self._responded.wait()
        return time.monotonic() - started

    async def more_successes(self, count: int, limit: float = 30.0) -> float:
        """Seconds until ``count`` more calls have succeeded."""
        target = self.tally.successes + count
        return await self.until(lambda tally: tally.successes >= target, limit)

    async def _client(self, account: Account) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            auth = auth_service_pb2_grpc.AuthServiceStub(channel)
            metadata = (("authorization", f"Bearer {account.token}"),)
            for round_number in itertools.count():
                if self._stopping.is_set():
                    return
                email = new_email()
                created = await self._call(
                    "CreateUser",
                    users.CreateUser(
                        user_service_pb2.CreateUserRequest(email=email, password=new_password()),
                        timeout=CALL_DEADLINE_SECONDS,
                    ),
                )
                if created is not None:
                    self.tally.acknowledged[created.user.id] = email
                await self._call(
                    "GetUser",
                    users.GetUser(
                        user_service_pb2.GetUserRequest(id="me"),
                        metadata=metadata,
                        timeout=CALL_DEADLINE_SECONDS,
                    ),
                )
                if round_number % 4 == 3:
                    await self._call(
                        "Login",
                        auth.Login(
                            auth_service_pb2.LoginRequest(
                                email=account.email, password=account.password
                            ),
                            timeout=CALL_DEADLINE_SECONDS,
                        ),
                    )

    async def _call(self, method: str, call: Any) -> Any:
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            self.tally.failed(method, error)
            self._responded.set()
            await asyncio.sleep(0.05)  # client backoff, not synchronisation
            return None
        self.tally.ok(method)
        self._responded.set()
        return response


async def sign_up(address: str, count: int) -> list[Account]:
    """``count`` accounts created and logged in through the API."""
    accounts = []
    async with grpc.aio.insecure_channel(address) as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        auth = auth_service_pb2_grpc.AuthServiceStub(channel)
        for _ in range(count):
            email, password = new_email("client"), new_password()
            await users.CreateUser(
                user_service_pb2.CreateUserRequest(email=email, password=password), timeout=10
            )
            login = await auth.Login(
                auth_service_pb2.LoginRequest(email=email, password=password), timeout=10
            )
            accounts.append(Account(email, password, login.access_token))
    return accounts


# ----------------------------------------------------------------- a hanging network


class FreezableProxy:
    """A TCP proxy to ``target`` on a free port of 127.0.0.1. ``freeze``
    makes it a black hole: connections stay open, nothing passes either
    way and new connections get no answer, as when a network path or the
    database host hangs. ``thaw`` lets the held bytes through again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def freeze(self) -> None:
        self._open.clear()

    def thaw(self) -> None:
        self._open.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._open.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                await self._open.wait()
                sink.write(data)
                await sink.drain()
        sink.close()


# ----------------------------------------------------------------- SIGTERM under load

LOAD_METHODS = {
    "/usersvc.v1.UserService/CreateUser": "CreateUser",
    "/usersvc.v1.UserService/GetUser": "GetUser",
    "/usersvc.v1.AuthService/Login": "Login",
}


@dataclass
class ShutdownDrill:
    """What a SIGTERM under load left behind, from both sides."""

    tally: Tally
    exit_code: int
    exit_seconds: float
    # Per load method: OK answers the server logged, minus the sign-up calls.
    server_ok: collections.Counter[str]
    # Access lines of load methods whose code was not OK.
    server_failures: list[dict[str, Any]]

    @property
    def client_ok(self) -> collections.Counter[str]:
        return collections.Counter(
            {method: self.tally.of_method(method) for method in LOAD_METHODS.values()}
        )

    def unexpected(self) -> dict[tuple[str, str], int]:
        """Outcomes other than OK and a refusal at the door. grpc core
        answers CANCELLED (no ErrorInfo) to a call that reached it in the
        instant the stop began, before the service took it up
        (grpc/grpc#41785): never accepted, nothing done, safe to retry. That
        the service itself failed nothing it accepted is what the access log
        shows (server_failures, server_ok)."""
        allowed = {("OK", ""), ("UNAVAILABLE", TRANSPORT), ("CANCELLED", TRANSPORT)}
        return {k: n for k, n in self.tally.by_outcome().items() if k not in allowed}


async def sigterm_under_load(
    env: Mapping[str, str], log_file: Path, *, clients: int, successes_before: int
) -> ShutdownDrill:
    """Serve, load with ``clients`` tasks until ``successes_before`` calls
    succeeded, SIGTERM, wait for the exit, and keep the load on until every
    client has been refused at least once."""
    grace = float(env.get("USERSVC_SHUTDOWN_GRACE_SECONDS", "10"))
    async with serving(env, log_file) as server:
        accounts = await sign_up(server.listen_addr, clients)
        load = Load(server.listen_addr, accounts)
        load.start()
        try:
            await load.more_successes(successes_before)
            code, seconds = await server.sigterm_and_wait(limit=grace + 30)
            await load.until(lambda tally: tally.count("UNAVAILABLE", TRANSPORT) >= clients)
        finally:
            tally = await load.stop()
        access = server.access_lines()
    server_ok: collections.Counter[str] = collections.Counter()
    failures = []
    for line in access:
        method = LOAD_METHODS.get(str(line.get("method")))
        if method is None:
            continue
        if line.get("code") == "OK":
            server_ok[method] += 1
        else:
            failures.append(line)
    # The accounts' own CreateUser and Login calls.
    server_ok.subtract({"CreateUser": clients, "Login": clients})
    return ShutdownDrill(tally, code, seconds, +server_ok, failures)
