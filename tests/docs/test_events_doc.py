"""The README's consumer example, run as written: a real relay publishes
an event to a private nats-server, and the example hands it over once."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from nats_servers import PrivateNats
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.events import SqlAlchemyEventRecorder, sequence_pending
from usersvc.adapters.nats_relay import NatsEventRelay
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_session_factory
from usersvc.bootstrap_events import encode_event
from usersvc.config import Settings
from usersvc.domain.events import EventDraft, EventType

ROOT = Path(__file__).resolve().parents[2]


def _example() -> dict[str, Any]:
    doc = (ROOT / "README.md").read_text()
    block = re.search(
        r"<!-- consumer:start -->\s*```python\n(.*?)```\s*<!-- consumer:end -->", doc, re.DOTALL
    )
    assert block, "README.md has no consumer example"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.fixture
def private_nats(tmp_path: Path) -> Any:
    server = PrivateNats(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_consumer_example_receives_a_published_event_once(
    engine: AsyncEngine,
    test_settings: Settings,
    database_url: str,
    clean_db: None,
    private_nats: PrivateNats,
) -> None:
    follow = _example()["follow_usersvc_events"]
    async with make_session_factory(engine)() as session, session.begin():
        await SqlAlchemyEventRecorder(session).add(None, [EventDraft(EventType.LOGIN_FAILED)])
    await sequence_pending(engine)
    async with engine.connect() as conn:
        event_id = str(await conn.scalar(text("SELECT id FROM events")))
    relay = NatsEventRelay(
        engine=engine,
        connect=asyncpg_connector(database_url, test_settings),
        nats_url=private_nats.url,
        stream="USERSVC_EVENTS",
        source="usersvc",
        encode=encode_event,
        poll_interval=0.1,
    )
    received: list[Any] = []
    got_one = asyncio.Event()

    async def handle(event: Any) -> None:
        received.append(event)
        got_one.set()

    await relay.start()
    try:
        # Published (the stream exists) before the consumer binds to it.
        async with asyncio.timeout(30):
            while True:
                async with engine.connect() as conn:
                    if await conn.scalar(
                        text("SELECT published_through > 0 FROM event_relay_mark")
                    ):
                        break
                await asyncio.sleep(0.05)
        consumer = asyncio.ensure_future(follow(private_nats.url, "doc-test", handle))
        waiter = asyncio.ensure_future(got_one.wait())
        try:
            done, _ = await asyncio.wait(
                {consumer, waiter},
                timeout=30,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if consumer in done:
                consumer.result()  # the example failed: show why
        finally:
            consumer.cancel()
            waiter.cancel()
            await asyncio.gather(consumer, waiter, return_exceptions=True)
    finally:
        await relay.stop()
    assert got_one.is_set()
    assert [(e.id, e.type) for e in received] == [(event_id, EventType.LOGIN_FAILED.value)]
