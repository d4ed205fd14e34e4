"""The relay: publishes numbered events to NATS JetStream, in order, at least once.

One publisher at a time across all replicas: the relay of each replica
keeps trying to take a session-level advisory lock (RELAY_LOCK_KEY) on a
dedicated PostgreSQL connection, every ``lock_retry`` seconds. The holder
publishes; when it dies its connection closes, PostgreSQL releases the lock,
and another replica takes over at its next try (within a few seconds).

The holder publishes the unpublished numbered rows in sequence order,
pipelined: up to ``window`` publishes await their PubAck at once
(usersvc.adapters.publish_window), and the PubAcks are taken in the order
of the publishes. Progress is one number, moved only after the PubAcks,
once per ``batch`` acknowledged events: event_relay_mark.published_through
becomes the highest sequence whose PubAck, and every earlier one, came
back (the events themselves are not written again). On any failure
(no PubAck in time, a refusal, NATS gone) the rest of the window is
dropped and publishing resumes from the first unacknowledged event, in
order. A crash between a PubAck and its mark publishes that event again on
takeover, with the same ``Nats-Msg-Id`` (the event id), which JetStream
drops as a duplicate within the stream's duplicate window; consumers
de-duplicate by id beyond it. It wakes on new numbers (the events feed),
else polls.

While NATS is down nothing else notices: writes only append rows, which
wait in PostgreSQL. The relay reconnects with capped, jittered backoff,
logs the outage once and the recovery once, and then publishes the backlog,
in order. The stream (subjects ``usersvc.>``) is created when missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.events import EVENT_COLUMNS, PUBLISHED_THROUGH, event_from_row
from usersvc.adapters.orm import event_relay_mark_table, events_table
from usersvc.adapters.publish_window import (
    EXPECTED_STREAM,
    PubAck,
    PublishFailed,
    PublishRejected,
    PublishWindow,
)
from usersvc.adapters.revocations import Connector, equal_jitter_backoff, retry_forever
from usersvc.domain.event_ports import EventFeed
from usersvc.domain.events import StoredEvent

logger = logging.getLogger(__name__)

# pg_try_advisory_lock key of the publisher ("usersvc" "rly" in ASCII hex).
RELAY_LOCK_KEY = 0x7573_6572_7376_0002
STREAM_SUBJECTS = ["usersvc.>"]
CONTENT_TYPE = "application/protobuf"
# Publishes awaiting their PubAck at once, by default
# (USERSVC_EVENT_PUBLISH_WINDOW).
PUBLISH_WINDOW = 256
# Publishes sent before the relay lets the event loop run other work (the
# API's calls): a slice of a backlog holds the loop for about a millisecond.
SEND_SLICE = 32

_e = events_table.c
_m = event_relay_mark_table.c
# The next :batch rows to publish, after the mark and after :after (the
# last row already read). The numbers after the mark are contiguous (the
# relay publishes in order, the sequencer leaves no gaps, retention keeps
# them), so a range of :batch numbers holds them: every plan reads :batch
# entries of uq_events_sequence at most, whatever the backlog, even when the
# table's statistics predate it.
_FROM = func.greatest(PUBLISHED_THROUGH, bindparam("after"))
_UNPUBLISHED = (
    select(*EVENT_COLUMNS)
    .where(
        _e.sequence.is_not(None),
        _e.sequence > _FROM,
        _e.sequence <= _FROM + bindparam("batch"),
    )
    .order_by(_e.sequence)
)
# Every numbered row up to :up_to is published: the relay read them all
# (in order, a number being visible only once every lower one is, the
# sequencer being single-file) and they are acked. One row written per
# acknowledged batch; the mark never moves back (a former publisher's late
# mark changes nothing).
_MARK = pg_insert(event_relay_mark_table).values(id=1, published_through=bindparam("up_to"))
_MARK_UP_TO = _MARK.on_conflict_do_update(
    index_elements=[_m.id],
    set_={
        "published_through": func.greatest(_m.published_through, _MARK.excluded.published_through)
    },
)
# Numbered rows not yet published: they are the numbers between the mark
# and the highest, all present, so the count is a difference.
_BACKLOG = select(
    func.greatest(
        select(func.coalesce(func.max(_e.sequence), 0)).scalar_subquery() - PUBLISHED_THROUGH, 0
    )
)


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
    # The most publishes that awaited their PubAck at once.
    peak_in_flight: int = 0
    # Windows restarted because something else published into the stream
    # between two of ours (not an error: resent in order, at once).
    restarts: int = 0


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
        window: int = PUBLISH_WINDOW,
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
        self._window = window
        self._lock_retry = lock_retry
        self._poll_interval = poll_interval
        self._publish_timeout = publish_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._task: asyncio.Task[None] | None = None
        self._nats: Any = None
        self._publisher: JetStreamPublisher | None = None
        self._stream_ready = False
        self._nats_down_logged = False
        self._hooks = hooks or RelayHooks()
        self._next_count = 0.0
        self.stats = RelayStats()

    @property
    def publish_timeout(self) -> float:
        """Seconds a publish waits for its PubAck."""
        return self._publish_timeout

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
                caught_up = await self._publish_pending(lost)
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
            if caught_up:
                await self._wait_for_more(known)

    async def _wait_for_more(self, known: int) -> None:
        # ``known`` was read before the rows were: all numbered up to it
        # have been seen, so only a higher number is news.
        if self._feed is not None:
            await self._feed.wait_beyond(known, self._poll_interval)
        else:
            await asyncio.sleep(self._poll_interval)

    async def _publish_pending(self, lost: asyncio.Event) -> bool:
        """Publish the unpublished rows, in order, ``batch`` rows read at a
        time, the window kept full across reads. Returns True once none is
        left (False: resume at once). Raises _NatsUnavailable,
        DatabaseUnavailable."""
        rows = await self._unpublished(after=0)
        if not rows:
            return True
        publisher = await self._jetstream()
        acked = _Acked(self)
        window: PublishWindow[StoredEvent] = PublishWindow(
            publisher, size=self._window, timeout=self._publish_timeout, on_ack=acked.add
        )
        following: asyncio.Task[list[RowMapping]] | None = None
        sent = 0
        try:
            while True:
                # The next rows are read while these go out: the window
                # does not run dry waiting for PostgreSQL.
                if len(rows) == self._batch:
                    following = asyncio.create_task(
                        self._unpublished(after=rows[-1]["sequence"]),
                        name="usersvc-events-relay-read",
                    )
                for row in rows:
                    if lost.is_set():
                        return False
                    event = event_from_row(row)
                    headers = cloudevents_headers(event, self._source)
                    headers[EXPECTED_STREAM] = self._stream
                    await window.send(event, event.type, self._encode(event), headers)
                    sent += 1
                    if sent % SEND_SLICE == 0:
                        await asyncio.sleep(0)
                acked.mark_now_and_then()
                if following is None:
                    break
                rows, following = await following, None
            await window.drain()
        except PublishRejected as exc:
            if not exc.out_of_turn:
                raise _NatsUnavailable(str(exc)) from exc
            # Something else published into the stream between two of ours:
            # the window's later publishes were refused (their expected last
            # message is not last); resend from the refused one, at once.
            self.stats.restarts += 1
            return False
        except PublishFailed as exc:
            raise _NatsUnavailable(str(exc)) from exc
        finally:
            if following is not None:
                await _cancelled(following)
            window.discard()
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, window.peak)
            # Only rows whose PubAck (and every earlier one) came back; a
            # crash before this line republishes them with the same ids.
            await acked.mark_all()
        if self._nats_down_logged and acked.count:
            self._nats_down_logged = False
            logger.info("NATS is back; publishing the events that waited")
        return True

    async def _unpublished(self, *, after: int) -> list[RowMapping]:
        with translate_database_errors():
            async with self._engine.connect() as conn:
                result = await conn.execute(_UNPUBLISHED, {"after": after, "batch": self._batch})
                rows = list(result.mappings().all())
        if self._hooks.on_backlog is not None and time.monotonic() >= self._next_count:
            # At most once a second: the gauge, not the publishing, pays.
            self._next_count = time.monotonic() + 1.0
            await self._count_backlog()
        return rows

    async def _count_backlog(self) -> None:
        assert self._hooks.on_backlog is not None
        with translate_database_errors():
            async with self._engine.connect() as conn:
                count = await conn.scalar(_BACKLOG)
        self._hooks.on_backlog(int(count or 0))

    async def _mark_up_to(self, sequence: int) -> None:
        with translate_database_errors():
            async with self._engine.begin() as conn:
                await conn.execute(_MARK_UP_TO, {"up_to": sequence})

    async def _jetstream(self) -> JetStreamPublisher:
        if self._nats is None or not self._nats.is_connected or self._publisher is None:
            await self._close_nats()
            import nats

            publisher = JetStreamPublisher()
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
                    # This connection's outstanding publishes fail at once.
                    disconnected_cb=publisher.connection_lost,
                    closed_cb=publisher.connection_lost,
                    name="usersvc-events-relay",
                )
                await publisher.attach(self._nats)
            except Exception as exc:
                raise _NatsUnavailable(f"{type(exc).__name__}: {exc}") from exc
            self._publisher = publisher
            self._stream_ready = False
        if not self._stream_ready:
            await self._ensure_stream(self._nats.jetstream(timeout=self._publish_timeout))
            self._stream_ready = True
        return self._publisher

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
        self._publisher = None
        if client is not None:
            await _close_client(client)


class _Acked:
    """The acknowledged prefix of one run of the relay (what ``on_ack`` of
    its window hears, in order) and its marking: one UPDATE per ``batch``
    PubAcks, in the background, one at a time, so that the window keeps
    going while PostgreSQL writes."""

    def __init__(self, relay: NatsEventRelay) -> None:
        self._relay = relay
        self._marking: asyncio.Task[None] | None = None
        self.up_to = 0  # the highest sequence acked with all before it
        self.marked = 0
        self.count = 0

    def add(self, event: StoredEvent, _ack: PubAck) -> None:
        relay = self._relay
        hook = relay._hooks.on_published
        if hook is not None:
            hook((datetime.now(UTC) - event.create_time).total_seconds())
        self.up_to = event.sequence
        self.count += 1
        relay.stats.published += 1
        relay.stats.last_sequence = event.sequence

    def mark_now_and_then(self) -> None:
        """Start marking what is acked when a batch is, unless a mark is
        still running. Raises DatabaseUnavailable of the previous mark."""
        if self._marking is not None:
            if not self._marking.done():
                return
            marking, self._marking = self._marking, None
            marking.result()
        if self.up_to - self.marked >= self._relay._batch:
            self.marked = self.up_to
            self._marking = asyncio.create_task(
                self._relay._mark_up_to(self.marked), name="usersvc-events-relay-mark"
            )

    async def mark_all(self) -> None:
        """Wait for the running mark, then mark the rest. Raises
        DatabaseUnavailable."""
        marking, self._marking = self._marking, None
        if marking is not None:
            await marking
        if self.up_to > self.marked:
            self.marked = self.up_to
            await self._relay._mark_up_to(self.marked)


async def _cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, whatever it raised."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: it is not lost, only no longer wanted


class JetStreamPublisher:
    """publish_window.AckingPublisher over one nats-py connection: core
    publishes, each with a reply subject of its own under one inbox, whose
    single subscription resolves the PubAck futures. (nats-py's
    JetStreamContext.publish_async leaves a future unresolved when
    JetStream answers with an error: a refusal would look like a timeout.)"""

    def __init__(self) -> None:
        self._client: Any = None
        self._prefix = ""
        self._next = 0
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}

    async def attach(self, client: Any) -> None:
        """Subscribe to this connection's PubAck inbox. Raises what
        nats-py raises."""
        self._client = client
        self._prefix = client.new_inbox() + "."
        await client.subscribe(self._prefix + "*", cb=self._on_reply)

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        """Send the message now; the future holds its PubAck, or a
        PublishFailed. Raises what nats-py's publish raises (closed
        connection, message over the server's limit)."""
        self._next += 1
        token = str(self._next)
        ack: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._waiting[token] = ack
        try:
            await self._client.publish(
                subject, payload, reply=self._prefix + token, headers=headers
            )
        except BaseException:
            del self._waiting[token]
            raise
        return ack

    async def connection_lost(self) -> None:
        """The connection is gone: every outstanding publish fails now
        rather than at its timeout. Raises nothing."""
        waiting, self._waiting = self._waiting, {}
        for ack in waiting.values():
            if not ack.done():
                ack.set_exception(PublishFailed("the NATS connection was lost"))

    async def _on_reply(self, msg: Any) -> None:
        ack = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if ack is None or ack.done():
            return  # a publish given up on (a dropped window)
        try:
            ack.set_result(_pub_ack(msg))
        except PublishFailed as exc:
            ack.set_exception(exc)


def _pub_ack(msg: Any) -> PubAck:
    """The PubAck in a reply. Raises PublishRejected for an error reply
    (or no stream), PublishFailed for one that is not JSON."""
    if msg.headers and msg.headers.get("Status") == "503":
        raise PublishRejected(503, 0, "no stream takes the subject")
    try:
        reply = json.loads(msg.data)
    except ValueError as exc:
        raise PublishFailed(f"not a PubAck: {msg.data[:80]!r}") from exc
    error = reply.get("error")
    if error is not None:
        raise PublishRejected(
            int(error.get("code", 0)), int(error.get("err_code", 0)), str(error.get("description"))
        )
    return PubAck(
        stream=str(reply.get("stream", "")),
        sequence=int(reply.get("seq", 0)),
        duplicate=bool(reply.get("duplicate", False)),
    )


class _NatsUnavailable(Exception):
    pass


async def _close_client(client: Any) -> None:
    """Close a nats-py connection and end its tasks. Raises nothing."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), timeout=2)
    # nats-py's close stops half-way when the socket broke while publishes
    # were still buffered (its last flush raises): the tasks of the
    # connection's subscriptions are then never cancelled, and its flusher
    # ends with an exception nobody retrieves. End and collect them here.
    tasks = [
        getattr(sub, "_wait_for_msgs_task", None) for sub in getattr(client, "_subs", {}).values()
    ]
    tasks += [
        getattr(client, name, None)
        for name in ("_flusher_task", "_reading_task", "_ping_interval_task")
    ]
    ours = [task for task in tasks if isinstance(task, asyncio.Task)]
    for task in ours:
        task.cancel()
    if ours:
        await asyncio.wait(ours, timeout=2)
    for task in ours:
        if task.done() and not task.cancelled():
            task.exception()


async def _quiet(_exc: Exception) -> None:
    # The relay logs outages itself, once; nats-py would log every attempt.
    return None
