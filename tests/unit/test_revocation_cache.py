"""The in-memory set of revoked sessions (usersvc.domain.revocations)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from usersvc.domain.revocations import RevocationCache

T0 = datetime(2030, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def session_id() -> str:
    return str(uuid.uuid4())


def cache_at(clock: Clock) -> RevocationCache:
    return RevocationCache(clock=clock)


def test_a_new_cache_is_unhealthy_until_loaded() -> None:
    assert RevocationCache().healthy is False


def test_an_added_session_is_revoked() -> None:
    cache = cache_at(Clock())
    sid = session_id()

    cache.add([sid], T0 + timedelta(minutes=15))

    assert cache.is_revoked(sid)


def test_a_session_never_added_is_not_revoked() -> None:
    cache = cache_at(Clock())
    cache.add([session_id()], T0 + timedelta(minutes=15))

    assert not cache.is_revoked(session_id())


def test_add_marks_every_session_it_is_given() -> None:
    cache = cache_at(Clock())
    ids = [session_id() for _ in range(3)]

    cache.add(ids, T0 + timedelta(minutes=15))

    assert all(cache.is_revoked(sid) for sid in ids)
    assert len(cache) == 3


def test_an_entry_stops_counting_at_its_expire_time() -> None:
    clock = Clock()
    cache = cache_at(clock)
    sid = session_id()
    cache.add([sid], T0 + timedelta(seconds=10))

    clock.advance(9.999)
    still = cache.is_revoked(sid)
    clock.advance(0.001)

    assert still
    assert not cache.is_revoked(sid)


def test_adding_a_session_again_keeps_the_later_expire_time() -> None:
    clock = Clock()
    cache = cache_at(clock)
    sid = session_id()
    cache.add([sid], T0 + timedelta(seconds=60))

    cache.add([sid], T0 + timedelta(seconds=10))
    clock.advance(30)

    assert cache.is_revoked(sid)


def test_replace_all_forgets_sessions_not_in_the_new_set() -> None:
    cache = cache_at(Clock())
    old, kept = session_id(), session_id()
    cache.add([old, kept], T0 + timedelta(minutes=15))

    cache.replace_all([(kept, T0 + timedelta(minutes=15))])

    assert not cache.is_revoked(old)
    assert cache.is_revoked(kept)


def test_replace_all_keeps_the_later_of_duplicate_entries() -> None:
    clock = Clock()
    cache = cache_at(clock)
    sid = session_id()

    cache.replace_all([(sid, T0 + timedelta(seconds=60)), (sid, T0 + timedelta(seconds=5))])
    clock.advance(30)

    assert cache.is_revoked(sid)


def test_replace_all_leaves_the_health_flag_to_the_caller() -> None:
    cache = cache_at(Clock())

    cache.replace_all([])

    assert cache.healthy is False


def test_prune_drops_expired_entries_and_counts_them() -> None:
    clock = Clock()
    cache = cache_at(clock)
    cache.add([session_id(), session_id()], T0 + timedelta(seconds=5))
    live = session_id()
    cache.add([live], T0 + timedelta(seconds=50))

    dropped = cache.prune(T0 + timedelta(seconds=5))

    assert dropped == 2
    assert len(cache) == 1
    assert cache.is_revoked(live)


def test_prune_drops_at_most_the_limit_and_leaves_the_rest_for_later() -> None:
    cache = cache_at(Clock())
    cache.add([session_id() for _ in range(5)], T0 + timedelta(seconds=5))

    first = cache.prune(T0 + timedelta(seconds=5), limit=3)
    second = cache.prune(T0 + timedelta(seconds=5), limit=3)

    assert (first, second) == (3, 2)
    assert len(cache) == 0


def test_prune_defaults_to_the_clock() -> None:
    clock = Clock()
    cache = cache_at(clock)
    cache.add([session_id()], T0 + timedelta(seconds=5))
    clock.advance(6)

    assert cache.prune() == 1
    assert len(cache) == 0


def test_prune_keeps_an_entry_whose_expiry_was_extended() -> None:
    cache = cache_at(Clock())
    sid = session_id()
    cache.add([sid], T0 + timedelta(seconds=5))
    cache.add([sid], T0 + timedelta(seconds=50))

    dropped = cache.prune(T0 + timedelta(seconds=10))

    assert dropped == 0
    assert cache.is_revoked(sid)


def test_prune_after_replace_all_uses_the_new_entries() -> None:
    cache = cache_at(Clock())
    cache.add([session_id()], T0 + timedelta(seconds=5))
    sid = session_id()
    cache.replace_all([(sid, T0 + timedelta(seconds=5))])

    dropped = cache.prune(T0 + timedelta(seconds=5))

    assert dropped == 1
    assert len(cache) == 0


def test_a_lazily_expired_entry_is_not_counted_again_by_prune() -> None:
    clock = Clock()
    cache = cache_at(clock)
    sid = session_id()
    cache.add([sid], T0 + timedelta(seconds=5))
    clock.advance(5)
    assert not cache.is_revoked(sid)

    assert cache.prune() == 0


def test_a_naive_expire_time_is_refused() -> None:
    cache = cache_at(Clock())

    with pytest.raises(ValueError, match="timezone-aware"):
        cache.add([session_id()], datetime(2030, 1, 1))
