"""Keyset pagination over a few thousand users while another task keeps
inserting: every user that existed when paging began appears exactly once,
in every ordering.

This module seeds its own users once (no ``clean_db``), so rows that earlier
tests left behind may be listed too; they only have to appear at most once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from .conftest import RunningServer
from .helpers import Account, ResponseRecorder, World, user_pb2, user_service_pb2

SEEDED = 3000
BATCH = 1000
PAGE_SIZE = 200
INSERT_BATCH = 10


@dataclass
class Population:
    admin: Account
    recorder: ResponseRecorder
    rng: random.Random
    ids: set[str] = field(default_factory=set)

    def requests(self, count: int) -> list[user_service_pb2.CreateUserRequest]:
        """Users whose email, name and creation orders all disagree; names
        repeat so that ties must be broken by id."""
        password = "Pagination-" + "".join(self.rng.choices("abcdef0123456789", k=12))
        self.recorder.secrets.add(password)
        return [
            user_service_pb2.CreateUserRequest(
                email="".join(self.rng.choices("0123456789abcdef", k=16)) + "@page.example.com",
                password=password,
                display_name=f"Name {self.rng.randrange(400):03d}",
            )
            for _ in range(count)
        ]

    async def create(self, count: int) -> list[str]:
        response = await self.admin.users.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(requests=self.requests(count))
        )
        ids = [user.id for user in response.users]
        self.ids.update(ids)
        return ids


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def population(primary: RunningServer, recorder: ResponseRecorder) -> Population:
    world = World(
        user_service=primary.container.user_service, channel=primary.channel, recorder=recorder
    )
    admin = await world.account("pager", roles=("user", "admin"))
    people = Population(admin=admin, recorder=recorder, rng=random.Random(20240611))
    for _ in range(SEEDED // BATCH):
        await people.create(BATCH)
    return people


class Inserter:
    """Keeps creating small batches until stopped; the walker waits for one
    more batch after each page, so inserts always land between pages."""

    def __init__(self, population: Population):
        self.population = population
        self.batches = 0
        self._progress = asyncio.Condition()
        self._stopping = False

    async def run(self) -> None:
        while not self._stopping:
            await self.population.create(INSERT_BATCH)
            async with self._progress:
                self.batches += 1
                self._progress.notify_all()

    async def wait_past(self, batches: int) -> int:
        async with self._progress:
            await self._progress.wait_for(lambda: self.batches > batches)
            return self.batches

    def stop(self) -> None:
        self._stopping = True


@pytest_asyncio.fixture(loop_scope="session")
async def inserter(population: Population) -> AsyncIterator[Inserter]:
    running = Inserter(population)
    task = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        running.stop()
        await task


def sort_value(user: user_pb2.User, key: str) -> object:
    if key == "create_time":
        return user.create_time.ToNanoseconds()
    return getattr(user, key)


ORDERINGS = [
    "create_time",
    "create_time desc",
    "email",
    "email desc",
    "display_name",
    "display_name desc",
]


@pytest.mark.parametrize("order_by", ORDERINGS)
async def test_paging_during_inserts_lists_every_existing_user_exactly_once(
    population: Population, inserter: Inserter, order_by: str
) -> None:
    existing = set(population.ids)
    seen: list[user_pb2.User] = []
    token = ""
    batches = await inserter.wait_past(0)
    pages = 0
    for _ in range(10_000):
        page = await population.admin.users.ListUsers(
            user_service_pb2.ListUsersRequest(
                page_size=PAGE_SIZE, page_token=token, order_by=order_by
            )
        )
        seen.extend(page.users)
        pages += 1
        token = page.next_page_token
        if not token:
            break
        batches = await inserter.wait_past(batches)
    else:
        pytest.fail("paging never ended")

    ids = [user.id for user in seen]
    assert len(ids) == len(set(ids)), "a user was listed twice"
    assert existing <= set(ids), f"{len(existing - set(ids))} existing users were skipped"
    assert inserter.batches >= pages, "inserts did not land between pages"
    key, _, direction = order_by.partition(" ")
    values = [sort_value(user, key) for user in seen]
    assert values == sorted(values, reverse=direction == "desc")  # type: ignore[type-var]


async def test_page_size_zero_means_fifty(population: Population) -> None:
    page = await population.admin.users.ListUsers(user_service_pb2.ListUsersRequest())

    assert len(page.users) == 50
    assert page.next_page_token


async def test_page_size_over_a_thousand_is_lowered_to_a_thousand(
    population: Population,
) -> None:
    page = await population.admin.users.ListUsers(user_service_pb2.ListUsersRequest(page_size=5000))

    assert len(page.users) == 1000
    assert page.next_page_token


async def test_total_size_of_a_large_listing_counts_every_match(population: Population) -> None:
    page = await population.admin.users.ListUsers(
        user_service_pb2.ListUsersRequest(filter='email:"@page.example.com"', page_size=10)
    )

    assert page.total_size == len(population.ids)
