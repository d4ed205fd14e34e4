"""Interfaces of the events parts that services depend on; adapters
implement them (usersvc.adapters.events, usersvc.adapters.event_feed)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from usersvc.domain.events import EventDraft, EventQuery, StoredEvent


class EventRecorder(Protocol):
    """Events not carried by another write, in the unit of work's
    transaction. Every method raises DatabaseUnavailable."""

    async def add(self, user_id: uuid.UUID | None, drafts: Sequence[EventDraft]) -> None:
        """The drafts about ``user_id`` (None: about nobody), with the user
        as it is in the transaction."""

    async def add_login_failure(self, email: str) -> None:
        """auth.login_failed for an attempt that found no account to check:
        cause "locked" when an account has this email, else
        "unknown_email". The email itself is not stored."""


class EventReader(Protocol):
    async def list(self, query: EventQuery) -> list[StoredEvent]:
        """Numbered events after ``query.after_sequence`` matching its
        filter, ascending, at most ``query.limit``. Raises InvalidArgument
        (filter), DatabaseUnavailable."""


class EventFeed(Protocol):
    @property
    def latest(self) -> int:
        """The highest number this process knows to be given."""

    @property
    def closed(self) -> bool:
        """True once the process is shutting down: streams should end."""

    async def wait_beyond(self, sequence: int, seconds: float) -> None:
        """Return when an event numbered above ``sequence`` may exist, the
        feed closes, or after ``seconds``. Raises nothing."""
