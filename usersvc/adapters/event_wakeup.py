"""Waking the events sequencer after a commit that wrote events.

Rows are inserted without a number, and the sequencer
(usersvc.adapters.events.sequence_pending_on, run by every process's events
feed) numbers the committed ones. Something has to tell it that there are
some. A NOTIFY sent by the writing transaction (a trigger did, until
migration 0007) is costly: PostgreSQL takes a lock that is global to the
server in PreCommit_Notify and holds it until the commit record is flushed,
so the commits that notify queue behind each other one flush at a time
(group commit cannot gather them), and each also signals every listening
backend. So the write's transaction sends nothing, and after its commit the
unit of work calls ``SequencerWakeup.events_committed``, which

- wakes this process's events feed directly when it is listening: it
  numbers the rows, and its one NOTIFY per numbered batch (EVENTS_CHANNEL)
  wakes the readers of every replica;
- otherwise (a command such as create-admin runs no feed; a feed may be
  reconnecting) sends ``NOTIFY usersvc_events_inserted`` in the background,
  from a pooled connection in a transaction of its own, at most once per
  ``min_interval`` however many commits ask: every listening feed numbers.

The request never waits for either. A wake-up that is lost (a NOTIFY that
fails, a process that exits before sending it, an event written by hand)
costs at most the feeds' poll interval: they number pending rows every
second anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.events import INSERTED_CHANNEL

logger = logging.getLogger(__name__)

# At most one NOTIFY per this many seconds per process: a burst of commits
# costs one notifying transaction, and the first one waits for nothing.
NOTIFY_MIN_INTERVAL = 0.005
# How long ``aclose`` lets a NOTIFY still due go out.
_FLUSH_SECONDS = 1.0

Notify = Callable[[], Awaitable[None]]


class LocalFeed(Protocol):
    """This process's events feed (usersvc.adapters.event_feed
    .PostgresEventFeed), as the wake-up uses it."""

    @property
    def listening(self) -> bool:
        """Whether ``wake`` numbers at once."""
        ...

    def wake(self) -> None:
        """Number pending events now; never raises."""
        ...


def notify_through(engine: AsyncEngine) -> Notify:
    """A NOTIFY on INSERTED_CHANNEL from a pooled connection of ``engine``,
    in a transaction of its own. The coroutine raises DBAPI and
    SQLAlchemy errors."""
    statement = text("SELECT pg_notify(:channel, '')").bindparams(channel=INSERTED_CHANNEL)

    async def notify() -> None:
        async with engine.begin() as conn:
            await conn.execute(statement)

    return notify


class SequencerWakeup:
    """Told after every commit that wrote events (``events_committed``);
    wakes ``feed`` when it listens, else sends ``notify`` (None: nothing)
    in the background, coalesced. ``aclose`` on shutdown."""

    def __init__(
        self,
        *,
        feed: LocalFeed | None = None,
        notify: Notify | None = None,
        min_interval: float = NOTIFY_MIN_INTERVAL,
    ) -> None:
        self._feed = feed
        self._notify = notify
        self._min_interval = min_interval
        self._due = False  # a NOTIFY is owed for commits since the last one
        self._sender: asyncio.Task[None] | None = None
        self._closed = False
        self.notifications = 0  # NOTIFYs sent, for tests and the bench

    def events_committed(self) -> None:
        """Events were just committed: get them numbered. Returns at once;
        never raises."""
        feed = self._feed
        if feed is not None and feed.listening:
            feed.wake()
            return
        if self._notify is None or self._closed:
            return
        self._due = True
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(
                self._send(self._notify), name="usersvc-sequencer-wakeup"
            )

    async def _send(self, notify: Notify) -> None:
        try:
            while self._due:
                self._due = False
                try:
                    await notify()
                    self.notifications += 1
                except Exception:  # the feeds' poll numbers the events anyway
                    logger.debug("sequencer wake-up not sent", exc_info=True)
                # Commits during the pause share the next NOTIFY.
                await asyncio.sleep(self._min_interval)
        finally:
            self._sender = None

    async def aclose(self) -> None:
        """Send a NOTIFY still due (waiting up to a second), then stop.
        Later commits wake nothing. Idempotent; raises nothing."""
        self._closed = True
        sender = self._sender
        if sender is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_FLUSH_SECONDS):
                await asyncio.shield(sender)
        sender.cancel()
        await asyncio.wait({sender})
