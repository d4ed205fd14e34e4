"""What the adversarial tests share: a server configured so that abuse
limits never decide an outcome (these tests are about what the service does
with hostile input, not about being throttled), a cast of callers and
targets, health and consistency checks.

Hypothesis drives synchronous test functions, while the server and the
client channel live on the session's event loop. The property runs in a
worker thread (``run_property``) and hands each call to the loop
(``Bridge.run``), so the loop stays free to serve it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from e2e.helpers import (
    Account,
    ResponseRecorder,
    World,
    bearer,
    new_email,
    new_password,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, settings
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc_protos.v1 import user_service_pb2

from .invariants import consistency_problems
from .rpcs import Outcome
from .strategies import Pools, PoolUser

T = TypeVar("T")

# Hostile calls made by this tier, by kind and by outcome: printed at the end
# of the run (the issue asks for the fuzz counts).
FUZZ_COUNTS: Counter[str] = Counter()

# RPCs after which the callers are certainly still who they were: the cast
# is checked (and repaired) only after the others.
HARMLESS_RPCS = frozenset(
    {
        "GetUser",
        "LookupUser",
        "ListUsers",
        "BatchGetUsers",
        "CreateUser",
        "BatchCreateUsers",
        "ImportUsers",
        "Login",
        "GetJwks",
        "IntrospectToken",
    }
)


def count(kind: str, outcome: Outcome) -> None:
    """Remember one hostile call of ``kind`` and how it ended."""
    FUZZ_COUNTS[f"calls: {kind}"] += 1
    FUZZ_COUNTS[f"outcome {outcome.code.name}"] += 1


# Examples per (RPC, caller) property: 19 RPCs x 3 callers x this many, in a
# few seconds. The tier as a whole stays well under a minute.
EXAMPLES_PER_PROPERTY = 30


def fuzz_settings(max_examples: int = EXAMPLES_PER_PROPERTY) -> settings:
    """Reproducible runs (derandomize: the same examples every time, no
    example database written into the work tree), no per-example deadline
    (a call's latency is not the property), and no health checks about slow
    or large data: producing large messages is the point."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def generous(base: Any) -> Any:
    """``base`` (a Settings) with every rate limit and concurrency cap the
    service may have raised far out of reach. Works on whichever of those
    settings exist, so it keeps working as limits are added: numeric fields
    named like a rate (``*_rps``, ``*_burst``) or a concurrency cap, and a
    shared Redis limiter turned off."""
    changes: dict[str, Any] = {}
    for spec in dataclasses.fields(base):
        name, value = spec.name, getattr(base, spec.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        rate = name.endswith(("_rps", "_burst")) or ("rate_limit" in name and "second" not in name)
        cap = any(word in name for word in ("concurren", "in_flight", "inflight", "max_pending"))
        if rate or cap:
            changes[name] = type(value)(1_000_000)
    if hasattr(base, "redis_url"):
        changes["redis_url"] = None
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass
class Server:
    """A running server of this tier and a plain channel to it."""

    container: Any  # usersvc.bootstrap.Container
    server: Any  # usersvc.server.UsersvcServer
    channel: grpc.aio.Channel

    @property
    def max_message_bytes(self) -> int:
        limit: int = self.container.settings.max_message_bytes
        return limit


async def truncate_all(engine: AsyncEngine) -> None:
    """Start from an empty schema, so the consistency checks judge only rows
    written through this tier's server."""
    from usersvc.adapters.orm import metadata

    tables = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
    async with engine.begin() as connection:
        await connection.exec_driver_sql(f"TRUNCATE TABLE {tables} RESTART IDENTITY CASCADE")


class Cast:
    """Who calls and what they aim at: an admin and a plain user (both
    logged in; anonymous calls carry no credentials), and victims the
    fuzzer may freely delete, disable or purge. ``pools`` feeds their ids, emails, passwords,
    etags and tokens to the strategies."""

    VICTIMS = 6

    def __init__(self, server: Server, world: World) -> None:
        self.server = server
        self.world = world
        self.channel = server.channel
        self.admin: Account = world.admin
        self.user: Account = world.alice
        self.victims: list[tuple[str, str, str]] = []
        self.pools = Pools()

    @classmethod
    async def assemble(cls, server: Server) -> Cast:
        world = World(
            user_service=server.container.user_service,
            channel=server.channel,
            recorder=ResponseRecorder(),
        )
        await world.populate()
        cast = cls(server, world)
        for index in range(cls.VICTIMS):
            cast.victims.append(
                await world.seed_user(
                    email=new_email(f"victim{index}"), labels={"victim": str(index)}
                )
            )
        await cast.refresh_pools()
        return cast

    def metadata(self, caller: str) -> tuple[tuple[str, str], ...]:
        """The credentials of "anonymous", "user" or "admin"."""
        if caller == "anonymous":
            return ()
        account = self.admin if caller == "admin" else self.user
        return bearer(account.login.access_token)

    async def refresh_pools(self) -> None:
        """Read the world again: users' ids, emails and etags, page tokens,
        fresh tokens of a victim's new session."""
        # The oldest users (the cast among them) and the newest: enough to
        # aim at, and a bounded cost however many users the fuzzer made.
        oldest = await self.admin.users.ListUsers(
            user_service_pb2.ListUsersRequest(page_size=20, show_deleted=True)
        )
        newest = await self.admin.users.ListUsers(
            user_service_pb2.ListUsersRequest(
                page_size=10, order_by="create_time desc", show_deleted=True
            )
        )
        by_email = await self.admin.users.ListUsers(
            user_service_pb2.ListUsersRequest(page_size=1, order_by="email desc")
        )
        users = {u.id: u for u in [*oldest.users, *newest.users]}.values()
        page_tokens = [oldest.next_page_token, newest.next_page_token, by_email.next_page_token]
        known = {
            self.admin.id: self.admin.password,
            self.user.id: self.user.password,
            **{user_id: password for user_id, _, password in self.victims},
        }
        pools = self.pools
        # Users whose password is known first, so a small index finds one.
        pools.users = sorted(
            (PoolUser(u.id, u.email, u.etag, known.get(u.id, "")) for u in users),
            key=lambda user: not user.password,
        )
        pools.page_tokens = [t for t in page_tokens if t]
        # The callers' own refresh tokens stay out: a replay would revoke
        # the session their access tokens belong to.
        pools.access_tokens = [self.admin.login.access_token, self.user.login.access_token]
        pools.refresh_tokens = []
        for _, email, password in self.victims[:2]:
            try:
                login = await self.world.login(email, password)
            except grpc.aio.AioRpcError:
                continue  # deleted, disabled or re-passworded by the fuzzer
            pools.access_tokens.append(login.access_token)
            pools.refresh_tokens.append(login.refresh_token)

    async def repair(self) -> None:
        """Replace a caller the fuzzer has disabled, deleted, purged,
        demoted or logged out, so later examples still call as who they say
        they are; then read the pools again."""
        if not await self._intact(self.admin, admin=True):
            self.admin = await self.world.account(
                f"admin-{secrets.token_hex(2)}", roles=("user", "admin")
            )
        if not await self._intact(self.user, admin=False):
            self.user = await self.world.account(f"alice-{secrets.token_hex(2)}")
        await self.refresh_pools()

    async def after(self, outcome: Outcome) -> None:
        """Repair the cast if ``outcome``'s call may have broken a caller
        (or changed the world the pools describe)."""
        if outcome.rpc.name in HARMLESS_RPCS:
            return
        intact = await self._intact(self.admin, admin=True) and await self._intact(
            self.user, admin=False
        )
        if outcome.ok or not intact:
            await self.repair()

    @staticmethod
    async def _intact(account: Account, *, admin: bool) -> bool:
        try:
            me = await account.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
        except grpc.aio.AioRpcError:
            return False
        return me.user.state == me.user.STATE_ACTIVE and ("admin" in me.user.roles) == admin

    async def new_account(self, name: str = "extra") -> Account:
        """A fresh, logged-in plain user outside the cast."""
        return await self.world.account(f"{name}-{secrets.token_hex(2)}")

    def password(self) -> str:
        """A fresh strong password."""
        return new_password(self.world.recorder)


class Bridge:
    """Runs coroutines on the event loop from the property's worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


async def run_property(prop: Callable[[Bridge], None]) -> None:
    """Run a Hypothesis property in a worker thread; its calls come back to
    this loop through the bridge it is given."""
    bridge = Bridge(asyncio.get_running_loop())
    await asyncio.to_thread(prop, bridge)


async def assert_serving(channel: grpc.aio.Channel) -> None:
    """The server is alive and says so."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10.0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def assert_consistent(engine: AsyncEngine) -> None:
    problems = await consistency_problems(engine)
    assert not problems, "database inconsistent after the run:\n  " + "\n  ".join(problems)
