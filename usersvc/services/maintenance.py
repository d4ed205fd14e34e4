"""Periodic clean-up of session data that can no longer matter.

- Sessions past their expire_time: no refresh token of theirs works any
  more. They are kept one access token lifetime (plus margin) longer,
  because an access token refreshed just before the end is still valid for
  that long, and a disable or password change must still find the session
  to revoke it. Their refresh tokens go with them (ON DELETE CASCADE).
- Revocation log rows past their expire_time: every access token of the
  session has expired, so no replica needs to remember it.

Every replica runs this on its own timer; the deletes skip rows another
replica is deleting at the same moment, so replicas never wait on each
other. Deletes go in batches, each its own short transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from usersvc.domain.errors import DatabaseUnavailable
from usersvc.domain.ports import CleanupResult, UnitOfWorkFactory
from usersvc.domain.revocations import REVOCATION_MARGIN
from usersvc.services.sessions import SessionLifetimes

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 5000
# Timer spread: replicas started together drift apart instead of cleaning
# up in lockstep.
_JITTER = 0.25


class SessionMaintenance:
    """Deletes expired sessions and revocation log rows, once on demand
    (``run_once``) or every ``interval_seconds`` in the background
    (``start``/``stop``; an interval of 0 disables the timer)."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        lifetimes: SessionLifetimes,
        interval_seconds: float,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._uow_factory = uow_factory
        self._lifetimes = lifetimes
        self._interval = interval_seconds
        self._batch_size = batch_size
        self._task: asyncio.Task[None] | None = None
        self.runs = 0  # completed runs; observable by tests and metrics

    @property
    def running(self) -> bool:
        """Whether the background timer is on."""
        return self._task is not None

    async def run_once(self) -> CleanupResult:
        """Delete everything expired as of now, batch by batch; returns how
        many rows went. Raises DatabaseUnavailable (batches committed
        before the failure stay deleted)."""
        now = self._lifetimes.now()
        session_cutoff = now - self._lifetimes.access_ttl - REVOCATION_MARGIN
        sessions = revocations = 0
        while True:
            async with self._uow_factory() as uow:
                batch = await uow.sessions.delete_expired(
                    session_cutoff=session_cutoff, revocation_cutoff=now, limit=self._batch_size
                )
                await uow.commit()
            sessions += batch.sessions
            revocations += batch.revocations
            if max(batch.sessions, batch.revocations) < self._batch_size:
                break
        self.runs += 1
        return CleanupResult(sessions=sessions, revocations=revocations)

    def start(self) -> None:
        """Run every interval in the background (nothing with interval 0).
        Raises RuntimeError when already started."""
        if self._task is not None:
            raise RuntimeError("session maintenance is already running")
        if self._interval <= 0:
            return
        self._task = asyncio.create_task(self._run(), name="usersvc-session-maintenance")

    async def stop(self) -> None:
        """Stop the timer, cancelling a run in progress (its committed
        batches stay). Idempotent. Raises nothing."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task})

    async def _run(self) -> None:
        while True:
            spread = random.uniform(1 - _JITTER, 1 + _JITTER)  # noqa: S311 - not security
            await asyncio.sleep(self._interval * spread)
            try:
                result = await self.run_once()
            except DatabaseUnavailable:
                logger.warning("session clean-up skipped: database unavailable")
                continue
            except Exception:
                # A timer must survive a bad run; the next one may succeed.
                logger.exception("session clean-up failed")
                continue
            if result.sessions or result.revocations:
                logger.info(
                    "expired sessions cleaned up",
                    extra={"sessions": result.sessions, "revocations": result.revocations},
                )
