"""bcrypt, kept off the event loop.

bcrypt is deliberately slow (about 0.2 s at cost 12) and releases the GIL,
so it runs in a small thread pool. A semaphore admits at most as many hashes
as there are threads and holds each slot until the thread has finished, so
work never piles up inside the pool: callers wait on the semaphore, where
cancellation (an expired deadline) costs nothing.

The threads are daemon threads of the hasher's own, not a
ThreadPoolExecutor's: the interpreter joins an executor's threads when it
exits, so one long hash would hold a SIGTERM'd process past its grace
period; a daemon thread still hashing is simply dropped at exit.

No call runs more than cost MAX_BCRYPT_COST (16: about 16 times the work of
the default cost 12): a stored hash of a higher cost (which no import
accepts, but SQL could write) is never checked; the call does the dummy work
of the configured cost instead and fails.

The threads must never starve the event loop: by default there is one fewer
than the process's CPUs (usersvc.config.default_bcrypt_threads), and each
thread lowers its own scheduling priority (``nice``; per thread on Linux), so
that while logins flood in, the loop and PostgreSQL still get a core at once
and bcrypt takes only what is left. A login then waits longer; a GetUser does
not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import re
import secrets
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import bcrypt

from usersvc.domain.bulk_import import MAX_BCRYPT_COST, MIN_BCRYPT_COST
from usersvc.domain.passwords import MAX_PASSWORD_BYTES

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{53}")


class BcryptPasswordHasher:
    """usersvc.domain.ports.PasswordHasher on bcrypt."""

    def __init__(self, rounds: int, max_threads: int, *, nice: int = 0) -> None:
        """``nice`` is added to each bcrypt thread's nice value (0: none).
        Raises ValueError for a cost outside 4..16, fewer than one thread or
        a ``nice`` outside 0..19."""
        if not MIN_BCRYPT_COST <= rounds <= MAX_BCRYPT_COST:
            raise ValueError(
                f"bcrypt rounds must be {MIN_BCRYPT_COST}..{MAX_BCRYPT_COST}, got {rounds}"
            )
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19, got {nice}")
        self._rounds = rounds
        self._executor = _DaemonThreadPool(max_threads, nice)
        self._slots = asyncio.Semaphore(max_threads)
        self._dummy_hash: str | None = None
        self._dummy_lock = asyncio.Lock()

    @property
    def rounds(self) -> int:
        return self._rounds

    async def hash(self, password: str) -> str:
        """A fresh bcrypt hash at the configured cost. Raises ValueError for a
        password longer than 72 UTF-8 bytes (validate first: bcrypt would
        otherwise ignore the rest)."""
        secret = password.encode("utf-8")
        if len(secret) > MAX_PASSWORD_BYTES:
            raise ValueError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
        salt = bcrypt.gensalt(self._rounds)
        hashed = await self._run(bcrypt.hashpw, secret, salt)
        return hashed.decode("ascii")

    async def verify(self, password: str, password_hash: str) -> bool:
        """True when ``password`` matches; False for a wrong password, a
        password longer than 72 bytes (bcrypt 5 raises on those) or a
        malformed hash. Raises nothing else."""
        try:
            secret = password.encode("utf-8")
            hashed = password_hash.encode("ascii")
        except UnicodeEncodeError:
            return False
        if len(secret) > MAX_PASSWORD_BYTES:
            return False
        cost = cost_of(password_hash)
        if cost is not None and cost > MAX_BCRYPT_COST:
            # Over the per-call budget: never checked, but as slow as a check.
            await self._run(_checkpw, _PADDING_SECRET, (await self.dummy_hash()).encode())
            return False
        return await self._run(_checkpw, secret, hashed)

    async def pad(self, password_hash: str) -> None:
        """After a failed check of ``password_hash``: the dummy work of one
        check at the configured cost when that hash costs less (or is not a
        bcrypt hash), so that a failure takes at least as long as one for an
        unknown email, whatever cost the stored hash has. Raises nothing."""
        cost = cost_of(password_hash)
        if cost is None or cost < self._rounds:
            await self._run(_checkpw, _PADDING_SECRET, (await self.dummy_hash()).encode())

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash's cost is not the configured cost (cheaper:
        weaker; dearer: slower than every other login, which both wastes CPU
        and tells the account apart by timing), or when it is not a bcrypt
        hash this hasher can read."""
        cost = cost_of(password_hash)
        return cost is None or cost != self._rounds

    async def dummy_hash(self) -> str:
        """A hash of a random password at the configured cost, computed once.
        Logins for unknown emails verify against it so that they take as long
        as logins for known ones."""
        if self._dummy_hash is None:
            async with self._dummy_lock:
                if self._dummy_hash is None:
                    self._dummy_hash = await self.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def close(self) -> None:
        """Stops the pool without waiting: queued work is cancelled, running
        hashes finish in their daemon threads (or are dropped when the
        process exits first); later calls to hash and verify raise
        RuntimeError."""
        self._executor.shutdown()

    async def _run(self, fn: Callable[[bytes, bytes], _T], secret: bytes, other: bytes) -> _T:
        await self._slots.acquire()
        loop = asyncio.get_running_loop()

        def release(_: Future[_T]) -> None:
            # Runs in the worker thread when the job ends (or here, when it is
            # cancelled before starting); the loop may be gone at shutdown.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._slots.release)

        try:
            job = self._executor.submit(fn, secret, other)
        except BaseException:
            self._slots.release()
            raise
        job.add_done_callback(release)
        return await asyncio.wrap_future(job)


_PADDING_SECRET = b"not-a-password"


def cost_of(password_hash: str) -> int | None:
    """The cost of a bcrypt hash; None when it is not one. Raises nothing."""
    match = _BCRYPT_HASH.fullmatch(password_hash)
    return None if match is None else int(match.group(1))


# A function, its arguments and the future of its result.
_Job = tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]


class _DaemonThreadPool:
    """The few methods of a ThreadPoolExecutor the hasher uses, on daemon
    threads (see the module docstring for why). Like an executor's, the
    threads start with the first job (never before a worker process forks);
    the hasher's semaphore keeps the queue short."""

    def __init__(self, threads: int, nice: int) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(nice,), name=f"bcrypt_{index}", daemon=True)
            for index in range(threads)
        ]
        self._started = False

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        """Raises RuntimeError after shutdown."""
        future: Future[_T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the bcrypt pool is shut down")
            if not self._started:
                self._started = True
                for thread in self._threads:
                    thread.start()
            self._jobs.put((fn, args, future))
        return future

    def shutdown(self) -> None:
        """Cancel queued jobs and let the threads end after their current
        one; waits for nothing. Raises nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[2].cancel()
        if self._started:
            for _ in self._threads:
                self._jobs.put(None)

    def _work(self, nice: int) -> None:
        _lower_thread_priority(nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)


def _lower_thread_priority(nice: int) -> None:
    # Runs first in each new worker thread. On Linux the nice value belongs
    # to the thread (setpriority on its thread id); raising it needs no
    # privilege. Elsewhere this would renice the whole process, so it is
    # skipped there.
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        thread_id = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + nice))
    except OSError:
        logger.warning("could not lower the priority of a bcrypt thread", exc_info=True)


def thread_niceness() -> int:
    """The calling thread's nice value (Linux; the process's elsewhere).
    Raises OSError when the platform cannot tell."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _checkpw(secret: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(secret, hashed)
    except ValueError:
        # A malformed or foreign hash in the database is a failed check, not
        # a crash of the login.
        return False
