"""Wiring of the events parts (the composition root's share for them): the
feed that numbers events and wakes streams, the wake-up that units of work
call after committing events, EventService, the retention task and, with
USERSVC_NATS_URL, the relay to NATS JetStream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.event_retention import EventRetention
from usersvc.adapters.event_wakeup import SequencerWakeup, notify_through
from usersvc.adapters.events import SqlAlchemyEventReader
from usersvc.adapters.nats_relay import NatsEventRelay, RelayHooks
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.api.event_servicer import event_to_proto
from usersvc.config import Settings
from usersvc.domain.events import StoredEvent
from usersvc.services.events import EventService

if TYPE_CHECKING:
    from usersvc.observability.metrics import Metrics


@dataclass
class EventParts:
    service: EventService
    feed: PostgresEventFeed
    # events_committed goes to the units of work (make_uow_factory).
    wakeup: SequencerWakeup
    retention: EventRetention
    # None unless USERSVC_NATS_URL is set.
    relay: NatsEventRelay | None = None

    async def start(self) -> None:
        """Start numbering, retention and (when configured) publishing in
        the background; none of them waits for the database or NATS.
        Raises RuntimeError when started twice."""
        await self.feed.start()
        self.retention.start()
        if self.relay is not None:
            await self.relay.start()

    async def stop(self) -> None:
        """Stop them all (open WatchEvents streams end); a wake-up still due
        goes out first. Raises nothing."""
        await self.wakeup.aclose()
        if self.relay is not None:
            await self.relay.stop()
        await self.retention.stop()
        await self.feed.stop()


def encode_event(event: StoredEvent) -> bytes:
    """The serialized usersvc.v1.Event: the body published to NATS."""
    return event_to_proto(event).SerializeToString()


def build_event_parts(
    settings: Settings,
    engine: AsyncEngine,
    database_url: str,
    metrics: Metrics | None = None,
) -> EventParts:
    """``metrics`` (None: off) hears the relay. Raises
    sqlalchemy.exc.ArgumentError for an unusable database URL."""
    # LISTEN and the publisher's session lock need a session of their own:
    # behind a transaction pool that is the direct URL (as for revocations).
    listen_url = settings.revocation_database_url or database_url
    feed = PostgresEventFeed(asyncpg_connector(listen_url, settings))
    relay = None
    if settings.nats_url is not None:
        relay = NatsEventRelay(
            engine=engine,
            connect=asyncpg_connector(listen_url, settings),
            nats_url=settings.nats_url,
            stream=settings.nats_stream,
            source=settings.event_source,
            encode=encode_event,
            feed=feed,
            window=settings.event_publish_window,
            publish_timeout=settings.event_publish_timeout_seconds,
            hooks=RelayHooks()
            if metrics is None
            else RelayHooks(
                on_published=metrics.event_published,
                on_error=metrics.event_publish_failed,
                on_backlog=metrics.events_unpublished,
            ),
        )
    return EventParts(
        service=EventService(reader=SqlAlchemyEventReader(engine), feed=feed),
        feed=feed,
        # Events committed here wake this feed when it listens (a server),
        # else (a command, a feed reconnecting) the feeds of every replica.
        wakeup=SequencerWakeup(feed=feed, notify=notify_through(engine)),
        retention=EventRetention(
            engine,
            retention_days=settings.event_retention_days,
            keep_unpublished=settings.nats_url is not None,
        ),
        relay=relay,
    )
