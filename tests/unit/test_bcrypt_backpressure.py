"""The bcrypt work queue is bounded: hashes beyond the thread count wait on
the hasher's semaphore (where a cancelled call costs nothing), never inside
the thread pool's unbounded queue (usersvc.services.passwords)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from usersvc.services.passwords import BcryptPasswordHasher


class Outstanding:
    """Counts jobs handed to an executor that have not finished."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def submitted(self, future: Future[Any]) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        future.add_done_callback(self._finished)

    def _finished(self, _: Future[Any]) -> None:
        with self._lock:
            self.now -= 1


async def test_the_thread_pool_never_holds_more_jobs_than_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    executor = hasher._executor
    outstanding = Outstanding()
    real_submit = executor.submit

    def counting_submit(fn: Any, /, *args: Any) -> Future[Any]:
        future = real_submit(fn, *args)
        outstanding.submitted(future)
        return future

    monkeypatch.setattr(executor, "submit", counting_submit)
    try:
        hashes = await asyncio.gather(*(hasher.hash(f"password-{i}") for i in range(40)))
    finally:
        hasher.close()

    assert len(set(hashes)) == 40
    assert outstanding.peak == 2


async def test_a_cancelled_waiting_hash_never_reaches_bcrypt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    submitted: list[Any] = []
    real_submit = hasher._executor.submit

    def recording_submit(fn: Any, /, *args: Any) -> Future[Any]:
        submitted.append(args)
        return real_submit(fn, *args)

    monkeypatch.setattr(hasher._executor, "submit", recording_submit)
    try:
        first = asyncio.create_task(hasher.hash("the-first-one"))
        waiting = [asyncio.create_task(hasher.hash(f"waiting-{i}")) for i in range(10)]
        # One turn of the loop: every task runs to its first wait, the first
        # in bcrypt, the others on the semaphore.
        await asyncio.sleep(0)
        assert not any(task.done() for task in waiting)
        for task in waiting:
            task.cancel()
        await first
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        hasher.close()

    assert len(submitted) == 1
