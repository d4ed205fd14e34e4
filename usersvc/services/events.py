"""EventService: the use cases behind usersvc.v1.EventService (the audit
trail): one page of events, or a stream of them that follows new commits.

Page tokens are opaque to callers: urlsafe base64 (no padding) of compact
JSON ``{"v": 1, "s": <last sequence>, "f": "<fingerprint>"}``, the
fingerprint binding the token to the filter and after_sequence it was issued
for. Unsigned: a forged one only starts a page elsewhere in events the
caller may read anyway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from usersvc.domain import policies
from usersvc.domain.errors import InvalidArgument
from usersvc.domain.event_filter import format_event_filter, parse_event_filter
from usersvc.domain.event_ports import EventFeed, EventReader
from usersvc.domain.events import EventFilter, EventQuery, StoredEvent
from usersvc.domain.models import Principal

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# Rows a stream reads from the database at once.
WATCH_BATCH = 500
# A stream re-reads at least this often (seconds), notification or not.
WATCH_POLL_SECONDS = 1.0
_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_-]{1,256}")


@dataclass(frozen=True, slots=True)
class EventPage:
    events: tuple[StoredEvent, ...]
    next_page_token: str


class EventService:
    def __init__(
        self,
        *,
        reader: EventReader,
        feed: EventFeed | None = None,
        poll_seconds: float = WATCH_POLL_SECONDS,
    ) -> None:
        """``feed`` wakes streams when events are numbered (None: they poll
        every ``poll_seconds``). Raises nothing."""
        self._reader = reader
        self._feed = feed
        self._poll_seconds = poll_seconds

    async def list_events(
        self,
        *,
        principal: Principal,
        page_size: int,
        page_token: str,
        filter: str,
        after_sequence: int,
    ) -> EventPage:
        """One page in ascending sequence.

        Raises PermissionDenied (callers other than admins and services),
        InvalidArgument (page_size, page_token, filter, after_sequence),
        DatabaseUnavailable.
        """
        policies.ensure(policies.can_read_events(principal), "read events")
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument.single(
                "page_size", f"must be between 0 and {MAX_PAGE_SIZE}, got {page_size}"
            )
        _check_after(after_sequence)
        parsed = parse_event_filter(filter)
        fingerprint = _fingerprint(parsed, after_sequence)
        start = after_sequence
        if page_token:
            start = _decode_token(page_token, fingerprint)
        size = page_size or DEFAULT_PAGE_SIZE
        # One more than asked: tells whether a next page exists.
        rows = await self._reader.list(EventQuery(parsed, start, size + 1))
        events = tuple(rows[:size])
        token = _encode_token(events[-1].sequence, fingerprint) if len(rows) > size else ""
        return EventPage(events=events, next_page_token=token)

    async def watch_events(
        self, *, principal: Principal, after_sequence: int, filter: str
    ) -> AsyncIterator[StoredEvent]:
        """The events after ``after_sequence`` matching ``filter``: the
        backlog, then new ones as they are numbered, until the caller stops
        iterating or the service shuts down (the iterator then ends).

        Raises PermissionDenied, InvalidArgument (filter, after_sequence)
        before the first event; DatabaseUnavailable at any time.
        """
        policies.ensure(policies.can_read_events(principal), "read events")
        _check_after(after_sequence)
        parsed = parse_event_filter(filter)
        return self._follow(parsed, after_sequence)

    async def _follow(self, parsed: EventFilter, after: int) -> AsyncIterator[StoredEvent]:
        last = after
        while not self._closed():
            # Read before the query: every event numbered up to here is in
            # its result (or filtered out), so waiting for a higher number
            # never spins on events the filter skips.
            known = 0 if self._feed is None else self._feed.latest
            batch = await self._reader.list(EventQuery(parsed, last, WATCH_BATCH))
            for event in batch:
                yield event
                last = event.sequence
            if len(batch) == WATCH_BATCH:
                continue
            await self._wait(max(last, known))

    def _closed(self) -> bool:
        return self._feed is not None and self._feed.closed

    async def _wait(self, last: int) -> None:
        if self._feed is not None:
            await self._feed.wait_beyond(last, self._poll_seconds)
        else:
            await asyncio.sleep(self._poll_seconds)


def _check_after(after_sequence: int) -> None:
    if after_sequence < 0:
        raise InvalidArgument.single("after_sequence", "must not be negative")


def _fingerprint(parsed: EventFilter, after_sequence: int) -> str:
    canonical = json.dumps([format_event_filter(parsed), after_sequence], separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _encode_token(sequence: int, fingerprint: str) -> str:
    body = json.dumps({"v": 1, "s": sequence, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode("ascii")).rstrip(b"=").decode("ascii")


def _bad_token() -> InvalidArgument:
    return InvalidArgument.single(
        "page_token", "is not a page token this service issued; pass next_page_token unchanged"
    )


def _decode_token(token: str, fingerprint: str) -> int:
    if _TOKEN_TEXT.fullmatch(token) is None:
        raise _bad_token()
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise _bad_token() from None
    if not isinstance(body, dict) or body.keys() != {"v", "s", "f"} or body["v"] != 1:
        raise _bad_token()
    if body["f"] != fingerprint:
        raise InvalidArgument.single(
            "page_token", "page_token was issued for another filter/after_sequence"
        )
    sequence = body["s"]
    if type(sequence) is not int or not 0 <= sequence < 2**63:
        raise _bad_token()
    return sequence
