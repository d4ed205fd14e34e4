"""The in-memory set of revoked sessions every authenticated call consults.

Pure: no I/O and no locks. It lives on the event loop and is only ever touched
from there (the interceptor reads it, the revocation listener writes it), so
a plain dict is both safe and the cheapest O(1) lookup there is.

An entry only needs to live as long as an access token of its session could
still be accepted; after its ``expire_time`` it is dropped (lazily by
``is_revoked``, in bulk by ``prune``). Revocations are never undone, so a
stale entry can at worst refuse a token that has expired anyway.

``healthy`` says whether the set is complete: False until the first full load,
and again from the moment the feed of new revocations is lost until it has
been reconnected and reloaded. Callers must not trust a miss while it is
False (usersvc.adapters.revocations.CachedRevocationChecker asks the database
instead).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

# How long after a revocation its log entry is kept beyond the access token
# lifetime: covers the verifier's leeway on exp and clock differences between
# replicas and the database.
REVOCATION_MARGIN = timedelta(seconds=60)


class RevocationCache:
    """Session ids (canonical lower-case UUID text) that are revoked, each
    with the time after which no access token of the session can still be
    valid."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        # (expire_at, session_id), possibly with outdated pairs for ids that
        # were re-added later; prune checks against _expiry before deleting.
        self._heap: list[tuple[float, str]] = []
        self.healthy = False

    def __len__(self) -> int:
        return len(self._expiry)

    def is_revoked(self, session_id: str) -> bool:
        """True when ``session_id`` is revoked and its entry has not expired.
        Raises nothing."""
        expire_at = self._expiry.get(session_id)
        if expire_at is None:
            return False
        if self._clock() < expire_at:
            return True
        del self._expiry[session_id]
        return False

    def add(self, session_ids: Iterable[str], expire_time: datetime) -> None:
        """Mark sessions revoked until ``expire_time`` (timezone-aware); an id
        already present keeps the later of its two expiry times.

        Raises ValueError for a naive ``expire_time``.
        """
        expire_at = _epoch(expire_time)
        for session_id in session_ids:
            self._put(session_id, expire_at)

    def replace_all(self, entries: Iterable[tuple[str, datetime]]) -> None:
        """Make the set exactly ``entries`` (session id, expire time): the
        result of a full reload. Raises ValueError for a naive expire time."""
        expiry: dict[str, float] = {}
        for session_id, expire_time in entries:
            expire_at = _epoch(expire_time)
            if expire_at > expiry.get(session_id, float("-inf")):
                expiry[session_id] = expire_at
        self._expiry = expiry
        self._heap = [(expire_at, session_id) for session_id, expire_at in expiry.items()]
        heapq.heapify(self._heap)

    def prune(self, now: datetime | None = None, *, limit: int | None = None) -> int:
        """Drop entries whose expire time is not after ``now`` (default: the
        clock), at most ``limit`` of them (default: all); returns how many
        were dropped. O(k log n) for k dropped entries, so a caller on the
        event loop can bound each pause with ``limit``. Raises ValueError
        for a naive ``now``."""
        cutoff = self._clock() if now is None else _epoch(now)
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= cutoff and (limit is None or dropped < limit):
            _, session_id = heapq.heappop(heap)
            current = self._expiry.get(session_id)
            if current is not None and current <= cutoff:
                del self._expiry[session_id]
                dropped += 1
        return dropped

    def _put(self, session_id: str, expire_at: float) -> None:
        current = self._expiry.get(session_id)
        if current is not None and current >= expire_at:
            return
        self._expiry[session_id] = expire_at
        heapq.heappush(self._heap, (expire_at, session_id))


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("revocation expire times must be timezone-aware")
    return moment.timestamp()
