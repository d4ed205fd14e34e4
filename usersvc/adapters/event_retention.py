"""Retention of the events table: events older than the retention period
go, a slice at a time, never one that is not numbered yet, and, when a relay
publishes to NATS, never one that is not published yet."""

from __future__ import annotations

import asyncio
import logging
import random

from sqlalchemy import bindparam, delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.events import PUBLISHED_THROUGH
from usersvc.adapters.orm import events_table

logger = logging.getLogger(__name__)

_e = events_table.c
RETENTION_SLICE = 5_000


def _expired(*, keep_unpublished: bool) -> object:
    conditions = [
        _e.sequence.is_not(None),
        # The newest event always stays: the sequencer numbers after the
        # highest number kept, and must never start again from 1.
        _e.sequence < select(func.max(_e.sequence)).scalar_subquery(),
        _e.create_time < func.now() - func.make_interval(0, 0, 0, bindparam("days")),
    ]
    if keep_unpublished:
        # Published: at or below the relay's mark (nats_relay).
        conditions.append(_e.sequence <= PUBLISHED_THROUGH)
    doomed = (
        select(_e.id)
        .where(*conditions)
        .order_by(_e.create_time)
        .limit(RETENTION_SLICE)
        .with_for_update(skip_locked=True)
    )
    return delete(events_table).where(_e.id.in_(doomed.scalar_subquery()))


async def delete_expired_events(
    engine: AsyncEngine, *, retention_days: int, keep_unpublished: bool
) -> int:
    """Delete up to RETENTION_SLICE events older than ``retention_days``;
    ``keep_unpublished`` spares those the relay has not published. Returns
    how many went. Raises DatabaseUnavailable."""
    stmt = _expired(keep_unpublished=keep_unpublished)
    with translate_database_errors():
        async with engine.begin() as conn:
            result = await conn.execute(stmt, {"days": retention_days})  # type: ignore[call-overload]
    count = result.rowcount
    return count if isinstance(count, int) and count > 0 else 0


class EventRetention:
    """Runs delete_expired_events every ``interval_seconds`` (jittered, so
    replicas spread out) until stopped."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        retention_days: int,
        keep_unpublished: bool,
        interval_seconds: float = 600.0,
    ) -> None:
        self._engine = engine
        self._days = retention_days
        self._keep_unpublished = keep_unpublished
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Raises RuntimeError when started twice."""
        if self._task is not None:
            raise RuntimeError("event retention is already running")
        self._task = asyncio.create_task(self._run(), name="usersvc-events-retention")

    async def stop(self) -> None:
        """Idempotent. Raises nothing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval * random.uniform(0.5, 1.0))  # noqa: S311
            try:
                while (
                    await delete_expired_events(
                        self._engine,
                        retention_days=self._days,
                        keep_unpublished=self._keep_unpublished,
                    )
                    == RETENTION_SLICE
                ):
                    pass
            except Exception as exc:
                # Tried again at the next interval; nothing is lost meanwhile.
                logger.warning("event retention failed: %s: %s", type(exc).__name__, exc)
