"""The relay: publishes numbered events to NATS JetStream, in order, at least once.

One publisher at a time across all replicas: the relay of each replica
keeps trying to take a session-level advisory lock (RELAY_LOCK_KEY) on a
dedicated PostgreSQL connection, every ``lock_retry`` seconds. The holder
publishes; when it dies its connection closes, PostgreSQL releases the lock,
and another replica takes over at its next try (within a few seconds).

The holder publishes the unpublished numbered rows in sequence order, one
at a time, waiting for each PubAck, and marks a row published only after
its PubAck. A crash between the two publishes that event again on takeover,
with the same ``Nats-Msg-Id`` (the event id), which JetStream drops as a
duplicate within the stream's duplicate window; consumers de-duplicate by id
beyond it. It wakes on new numbers (the events feed), else polls.

While NATS is down nothing else notices: writes only append rows, which
wait in PostgreSQL. The relay reconnects with capped, jittered backoff,
logs the outage once and the recovery once, and then publishes the backlog,
in order. The stream (subjects ``usersvc.>``) is created when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ARRAY, Uuid, any_, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.events import EVENT_COLUMNS, event_from_row
from usersvc.adapters.orm import events_table
from usersvc.adapters.revocations import Connector, equal_jitter_backoff, retry_forever
from usersvc.domain.event_ports import EventFeed
from usersvc.domain.events import StoredEvent

logger = logging.getLogger(__name__)

# pg_try_advisory_lock key of the publisher ("usersvc" "rly" in ASCII hex).
RELAY_LOCK_KEY = 0x7573_6572_7376_0002
STREAM_SUBJECTS = ["usersvc.>"]
CONTENT_TYPE = "application/protobuf"

_e = events_table.c
_UNPUBLISHED = (
    select(*EVENT_COLUMNS)
    .where(_e.published_at.is_(None), _e.sequence.is_not(None))
    .order_by(_e.sequence)
    .limit(bindparam("batch"))
)
_MARK = (
    update(events_table)
    .where(_e.id == any_(bindparam("event_ids", type_=ARRAY(Uuid))))
    .values(published_at=func.now())
)
_BACKLOG = (
    select(func.count())
    .select_from(events_table)
    .where(_e.published_at.is_(None), _e.sequence.is_not(None))
)
# Rows marked published per statement.
MARK_CHUNK = 100


@dataclass(frozen=True)
class RelayHooks:
    """Who hears what the relay does (metrics); each may be None."""

    on_published: Callable[[float], None] | None = None  # seconds from commit to PubAck
    on_error: Callable[[], None] | None = None  # a failed publish attempt
    on_backlog: Callable[[int], None] | None = None  # numbered rows not yet published


@dataclass
class RelayStats:
    """What the relay has done; read by tests and metrics."""

    published: int = 0
    errors: int = 0
    last_sequence: int = 0
    is_publisher: bool = False


def cloudevents_headers(event: StoredEvent, source: str) -> dict[str, str]:
    """The NATS headers of ``event``: CloudEvents binary mode plus
    Nats-Msg-Id. Raises nothing."""
    return {
        "Nats-Msg-Id": str(event.id),
        "ce-id": str(event.id),
        "ce-specversion": "1.0",
        "ce-type": event.type,
        "ce-source": source,
        "ce-subject": "" if event.user_id is None else str(event.user_id),
        "ce-time": event.create_time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "ce-sequence": str(event.sequence),
        "content-type": CONTENT_TYPE,
    }


class NatsEventRelay:
    """Publishes events while this replica holds the publisher lock.
    ``start`` when serving, ``stop`` on shutdown."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        connect: Connector,
        nats_url: str,
        stream: str,
        source: str,
        encode: Callable[[StoredEvent], bytes],
        feed: EventFeed | None = None,
        batch: int = 500,
        lock_retry: float = 1.0,
        poll_interval: float = 1.0,
        publish_timeout: float = 2.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        hooks: RelayHooks | None = None,
    ) -> None:
        self._engine = engine
        self._connect = connect
        self._nats_url = nats_url
        self._stream = stream
        self._source = source
        self._encode = encode
        self._feed = feed
        self._batch = batch
        self._lock_retry = lock_retry
        self._poll_interval = poll_interval
        self._publish_timeout = publish_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self._nats: Any = None
        self._stream_ready = False
        self._nats_down_logged = False
        self._hooks = hooks or RelayHooks()
        self._next_count = 0.0
        self.stats = RelayStats()

    async def start(self) -> None:
        """Start in the background. Raises RuntimeError when started twice."""
        if self._task is not None:
            raise RuntimeError("the relay is already running")
        self._task = asyncio.create_task(self._run(), name="usersvc-events-relay")

    async def stop(self) -> None:
        """Stop publishing, release the lock and the connections. Idempotent.
        Raises nothing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        await self._close_nats()

    async def _run(self) -> None:
        await retry_forever(
            self._hold_lock_and_publish,
            pause=lambda failures: self._backoff(failures or 1),
            log=logger,
            what="events relay interrupted",
        )

    def _backoff(self, failures: int) -> float:
        return equal_jitter_backoff(failures, self._backoff_initial, self._backoff_max)

    async def _hold_lock_and_publish(self) -> None:
        connection = await self._connect()
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _c: lost.set())
        try:
            while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._lock_retry * random.uniform(0.8, 1.2)):  # noqa: S311
                        await lost.wait()
                if lost.is_set() or connection.is_closed():
                    raise ConnectionError("lost the database connection of the publisher lock")
            self.stats.is_publisher = True
            logger.info("events relay: this replica publishes")
            await self._publish_while_holding(connection, lost)
        finally:
            self.stats.is_publisher = False
            with contextlib.suppress(Exception):
                connection.terminate()

    async def _publish_while_holding(self, connection: Any, lost: asyncio.Event) -> None:
        nats_failures = 0
        while True:
            if lost.is_set() or connection.is_closed():
                raise ConnectionError("lost the database connection of the publisher lock")
            known = 0 if self._feed is None else self._feed.latest
            try:
                published = await self._publish_batch(lost)
                nats_failures = 0
            except _NatsUnavailable as exc:
                nats_failures += 1
                self.stats.errors += 1
                if self._hooks.on_error is not None:
                    self._hooks.on_error()
                if not self._nats_down_logged:
                    self._nats_down_logged = True
                    logger.warning(
                        "NATS unavailable; events wait in PostgreSQL until it returns: %s", exc
                    )
                await self._close_nats()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._backoff(nats_failures)):
                        await lost.wait()
                continue
            if published < self._batch:
                await self._wait_for_more(known)

    async def _wait_for_more(self, known: int) -> None:
        # ``known`` was read before the rows were: all numbered up to it
        # have been seen, so only a higher number is news.
        if self._feed is not None:
            await self._feed.wait_beyond(known, self._poll_interval)
        else:
            await asyncio.sleep(self._poll_interval)

    async def _publish_batch(self, lost: asyncio.Event) -> int:
        with translate_database_errors():
            async with self._engine.connect() as conn:
                rows = (await conn.execute(_UNPUBLISHED, {"batch": self._batch})).mappings().all()
        if self._hooks.on_backlog is not None and time.monotonic() >= self._next_count:
            # At most once a second: the gauge, not the publishing, pays.
            self._next_count = time.monotonic() + 1.0
            await self._count_backlog()
        if not rows:
            return 0
        js = await self._jetstream()
        done = 0
        acked: list[Any] = []
        try:
            for row in rows:
                if lost.is_set():
                    break
                event = event_from_row(row)
                try:
                    await js.publish(
                        event.type,
                        self._encode(event),
                        timeout=self._publish_timeout,
                        stream=self._stream,
                        headers=cloudevents_headers(event, self._source),
                    )
                except Exception as exc:
                    raise _NatsUnavailable(f"{type(exc).__name__}: {exc}") from exc
                acked.append(event.id)
                if self._hooks.on_published is not None:
                    lag = (datetime.now(UTC) - event.create_time).total_seconds()
                    self._hooks.on_published(lag)
                done += 1
                self.stats.published += 1
                self.stats.last_sequence = event.sequence
                if len(acked) >= MARK_CHUNK:
                    await self._mark(acked)
                    acked = []
        finally:
            # Only rows whose PubAck came back; a crash before this line
            # republishes them with the same ids (JetStream drops those).
            if acked:
                await self._mark(acked)
        if self._nats_down_logged and done:
            self._nats_down_logged = False
            logger.info("NATS is back; publishing the events that waited")
        return done

    async def _count_backlog(self) -> None:
        assert self._hooks.on_backlog is not None
        with translate_database_errors():
            async with self._engine.connect() as conn:
                count = await conn.scalar(_BACKLOG)
        self._hooks.on_backlog(int(count or 0))

    async def _mark(self, event_ids: list[Any]) -> None:
        with translate_database_errors():
            async with self._engine.begin() as conn:
                await conn.execute(_MARK, {"event_ids": event_ids})

    async def _jetstream(self) -> Any:
        if self._nats is None or not self._nats.is_connected:
            await self._close_nats()
            import nats

            try:
                self._nats = await nats.connect(
                    self._nats_url,
                    connect_timeout=2,
                    # Reconnecting is ours (backoff, logged once). nats-py
                    # retries the first connect forever with 0 attempts.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,
                    error_cb=_quiet,
                    disconnected_cb=_quiet_cb,
                    closed_cb=_quiet_cb,
                    name="usersvc-events-relay",
                )
            except Exception as exc:
                raise _NatsUnavailable(f"{type(exc).__name__}: {exc}") from exc
            self._stream_ready = False
        js = self._nats.jetstream(timeout=self._publish_timeout)
        if not self._stream_ready:
            await self._ensure_stream(js)
            self._stream_ready = True
        return js

    async def _ensure_stream(self, js: Any) -> None:
        from nats.js.errors import NotFoundError

        try:
            await js.stream_info(self._stream)
        except NotFoundError:
            await js.add_stream(name=self._stream, subjects=STREAM_SUBJECTS)
            logger.info("created the JetStream stream", extra={"stream": self._stream})
        except Exception as exc:
            raise _NatsUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _close_nats(self) -> None:
        client, self._nats = self._nats, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=2)


class _NatsUnavailable(Exception):
    pass


async def _quiet(_exc: Exception) -> None:
    # The relay logs outages itself, once; nats-py would log every attempt.
    return None


async def _quiet_cb() -> None:
    return None
