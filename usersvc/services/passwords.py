"""bcrypt, kept off the event loop.

bcrypt is deliberately slow (about 0.2 s at cost 12) and releases the GIL,
so it runs in a small thread pool. A semaphore admits at most as many hashes
as there are threads and holds each slot until the thread has finished, so
work never piles up inside the pool: callers wait on the semaphore, where
cancellation (an expired deadline) costs nothing.

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
import re
import secrets
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import bcrypt

from usersvc.domain.passwords import MAX_PASSWORD_BYTES

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{53}")


class BcryptPasswordHasher:
    """usersvc.domain.ports.PasswordHasher on bcrypt."""

    def __init__(self, rounds: int, max_threads: int, *, nice: int = 0) -> None:
        """``nice`` is added to each bcrypt thread's nice value (0: none).
        Raises ValueError for a cost outside 4..31, fewer than one thread or
        a ``nice`` outside 0..19."""
        if not 4 <= rounds <= 31:
            raise ValueError(f"bcrypt rounds must be 4..31, got {rounds}")
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0..19, got {nice}")
        self._rounds = rounds
        self._executor = ThreadPoolExecutor(
            max_workers=max_threads,
            thread_name_prefix="bcrypt",
            initializer=_lower_thread_priority,
            initargs=(nice,),
        )
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
        return await self._run(_checkpw, secret, hashed)

    def needs_rehash(self, password_hash: str) -> bool:
        """True when the hash's cost is below the configured cost, or when it
        is not a bcrypt hash this hasher can read."""
        match = _BCRYPT_HASH.fullmatch(password_hash)
        return match is None or int(match.group(1)) < self._rounds

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
        """Stops the pool: queued work is cancelled, running hashes finish;
        later calls to hash and verify raise RuntimeError."""
        self._executor.shutdown(wait=False, cancel_futures=True)

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
