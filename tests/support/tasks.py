"""Asyncio tasks a test leaves behind.

A task still pending when the test that started it has ended runs on into
later tests (or is destroyed with the loop: "Task was destroyed but it is
pending!"). tests/conftest.py compares the session loop's tasks before and
after every test with these helpers and fails the test that left one.

Only tasks running Python coroutines are judged. grpc's server starts tasks
of its own compiled (Cython) coroutines while it serves, one waiting for the
next call of each method: they belong to the server, which may be a session
or module fixture's, and live as long as it does (cancelling them from
outside crashes grpc's core).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Collection, Iterable

# Tasks that are finishing (handling their cancellation, closing a channel)
# get this long; asyncio.wait returns as soon as they are all done, so a test
# without leftovers never waits.
SETTLE_SECONDS = 2.0


def live_tasks() -> set[asyncio.Task[object]]:
    """The running loop's tasks that are not done and run a Python
    coroutine, except the caller's own."""
    current = asyncio.current_task()
    return {
        task
        for task in asyncio.all_tasks()
        if task is not current and not task.done() and inspect.iscoroutine(task.get_coro())
    }


async def left_pending(
    before: Collection[asyncio.Task[object]], settle_seconds: float = SETTLE_SECONDS
) -> list[asyncio.Task[object]]:
    """Tasks started since ``before`` was taken that are still pending once
    they had ``settle_seconds`` to finish."""
    new = [task for task in live_tasks() if task not in before]
    if new:
        await asyncio.wait(new, timeout=settle_seconds)
    return sorted((task for task in new if not task.done()), key=lambda task: task.get_name())


async def cancel(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel ``tasks`` and wait until each has ended, so that none is
    destroyed pending later on."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def describe(task: asyncio.Task[object]) -> str:
    """The task's name and coroutine, and the line it waits on."""
    coro = task.get_coro()
    what = getattr(coro, "__qualname__", repr(coro))
    frames = task.get_stack(limit=1)
    where = f" at {frames[0].f_code.co_filename}:{frames[0].f_lineno}" if frames else ""
    return f"{task.get_name()} ({what}){where}"
