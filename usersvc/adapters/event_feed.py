"""The per-process events feed: numbers new events and wakes their readers.

One dedicated asyncpg connection per process (outside the pool: LISTEN needs
a connection that stays ours) runs the sequencer
(usersvc.adapters.events.sequence_pending_on) and LISTENs on two channels:

- INSERTED_CHANNEL: events were committed by a process that has no
  listening feed of its own (usersvc.adapters.event_wakeup): number them.
  Every replica's feed may; the advisory lock makes them take turns, so
  numbering stays single-file, and there is no sequencer to fail over.
- EVENTS_CHANNEL (the sequencer, with the highest new number, once per
  batch): WatchEvents streams and the relay waiting in this process are
  woken, on every replica.

Events committed in this process wake the feed directly (``wake``, called
after the commit through the wake-up), without a notification.

Notifications are only a hint. Every ``poll_interval`` the feed numbers
pending rows and reads the highest number anyway, so a wake-up lost (a
process that died after its commit, a notification sent while the
connection was down) delays an event by at most that long. While the
database is unreachable it retries with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from usersvc.adapters.events import (
    EVENTS_CHANNEL,
    INSERTED_CHANNEL,
    SEQUENCE_BATCH,
    sequence_pending_on,
)
from usersvc.adapters.revocations import Connector, equal_jitter_backoff, retry_forever

logger = logging.getLogger(__name__)

_TOP_SQL = "SELECT coalesce(max(sequence), 0) FROM events"
# At most one numbering pass per this many seconds while commits keep
# waking the feed: a pass costs the database about 300 us of CPU besides
# 18 us per row it numbers (docs/performance.md, "The event write, third
# pass"), and a feed that numbers on every wake-up makes a pass per few
# events under load. So a stream of commits waits up to this long to be
# numbered together (at 1,000 events/s, 50 rows a pass, 24 us a row; at
# 20 ms it was 41); the first wake-up after a quiet moment numbers at once.
NUMBER_MIN_INTERVAL = 0.05


class PostgresEventFeed:
    """usersvc.domain.event_ports.EventFeed. ``start`` when serving,
    ``stop`` on shutdown (waiters are released then)."""

    def __init__(
        self,
        connect: Connector,
        *,
        poll_interval: float = 1.0,
        min_pass_interval: float = NUMBER_MIN_INTERVAL,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self._connect = connect
        self._poll_interval = poll_interval
        self._min_pass_interval = min_pass_interval
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()  # rows were inserted: number them
        self._changed = asyncio.Event()  # replaced on every new number
        self._listening = asyncio.Event()  # set while connected and listening
        self._closed = False
        self.latest = 0  # the highest number known here

    @property
    def closed(self) -> bool:
        """True once ``stop`` began: streams should end. Raises nothing."""
        return self._closed

    @property
    def listening(self) -> bool:
        """True while the feed is connected and listening, so that ``wake``
        numbers at once. Raises nothing."""
        return self._listening.is_set()

    async def wait_listening(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the feed to listen (it has then
        numbered what was pending when it connected); whether it does.
        Raises nothing but CancelledError."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._listening.wait()
        return self.listening

    def wake(self) -> None:
        """Number pending events now rather than at the next poll: events
        were committed in this process. Raises nothing."""
        self._kick.set()

    async def start(self) -> None:
        """Start in the background. Raises RuntimeError when started twice."""
        if self._task is not None:
            raise RuntimeError("the events feed is already running")
        self._closed = False
        self._task = asyncio.create_task(self._run(), name="usersvc-events-feed")

    def close(self) -> None:
        """From now on ``closed`` is True and waiters return at once: the
        streams end (the server is stopping); numbering goes on until
        ``stop``. Raises nothing."""
        self._closed = True
        self._announce()

    async def stop(self) -> None:
        """Stop, release every waiter. Idempotent. Raises nothing."""
        self.close()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})

    async def wait_beyond(self, sequence: int, seconds: float) -> None:
        """Return once an event numbered above ``sequence`` is known, the
        feed stops, or ``seconds`` passed (whichever is first).
        Raises nothing but CancelledError."""
        if self.latest > sequence or self._closed:
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.latest <= sequence and not self._closed:
                    await changed.wait()
                    changed = self._changed

    def _announce(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _note(self, top: int) -> None:
        if top > self.latest:
            self.latest = top
            self._announce()

    async def _run(self) -> None:
        # One doubling more than the relay's: the first retry after a
        # failure waits up to twice ``backoff_initial``.
        await retry_forever(
            self._listen_once,
            pause=lambda failures: equal_jitter_backoff(
                failures + 1, self._backoff_initial, self._backoff_max
            ),
            log=logger,
            what="events feed unavailable",
        )

    async def _listen_once(self) -> None:
        connection = await self._connect()
        try:
            connection.add_termination_listener(self._on_inserted)
            await connection.add_listener(INSERTED_CHANNEL, self._on_inserted)
            await connection.add_listener(EVENTS_CHANNEL, self._on_numbered)
            logger.info("events feed connected")
            polled = True
            first = True
            loop = asyncio.get_running_loop()
            while True:
                last_pass = loop.time()
                # Number whatever is pending, then wait for an insert or
                # the poll interval. A short batch took every row committed
                # when it ran; a row committed since has set the kick (its
                # wake-up comes after its commit), so no pass that would
                # find nothing is made. On the feed's own connection:
                # nothing taken from the pool.
                while await sequence_pending_on(connection) >= SEQUENCE_BATCH:
                    pass
                if polled:
                    # Notifications may have been lost (while connecting):
                    # read the highest number. The database is the
                    # authority, also when it holds less than we heard of
                    # (a table emptied by hand, or in tests).
                    top = int(await connection.fetchval(_TOP_SQL) or 0)
                    if top != self.latest:
                        self.latest = top
                        self._announce()
                if connection.is_closed():
                    raise ConnectionError("the events feed's connection closed")
                if first:
                    first = False
                    self._listening.set()
                polled = False
                try:
                    async with asyncio.timeout(self._poll_interval):
                        await self._kick.wait()
                except TimeoutError:
                    polled = True
                if not polled:
                    # Woken: let the commits of the next few milliseconds
                    # join this pass rather than each making its own.
                    pause = last_pass + self._min_pass_interval - loop.time()
                    if pause > 0:
                        await asyncio.sleep(pause)
                self._kick.clear()
        finally:
            self._listening.clear()
            with contextlib.suppress(Exception):
                connection.terminate()

    def _on_inserted(self, *_args: Any) -> None:
        self._kick.set()

    def _on_numbered(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._note(int(payload))
        except ValueError:
            self._kick.set()
