"""How long the event loop is held: a task that sleeps ``interval`` seconds
over and over and measures how late it wakes.

Everything a server process does for its calls runs on one event loop, so a
step that does not yield (a long computation, a large message encoded in one
go) delays every other call of the process by as long as it runs, health
checks and the database monitor included. Sleeping for a fixed interval and
measuring how much later than asked the loop came back shows that delay
from the outside, whatever caused it: the lateness of one wake-up is (up to
the interval) the length of the step the loop was busy with when the wake-up
was due.

The lag also counts time the process spent waiting for a CPU (a machine
whose CPUs are overcommitted) or for the GIL. So each wake-up also gives the
*hold*: the lag, but at most the CPU time the loop's thread used while the
task slept. A step that does not yield is CPU time and shows in both; a
process that waits for a CPU uses none and shows in the lag only. (The hold
may still count up to one interval of short steps that ran before the
wake-up was due.)

Nothing here knows about Prometheus: ``observe`` receives each lag and hold
(usersvc.observability.metrics feeds histograms and a gauge with them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

# Often enough to see a hold of ~10 ms (the longest the service means to
# hold the loop, docs/performance.md), cheap enough to run always: 100
# wake-ups a second cost a few microseconds each.
DEFAULT_INTERVAL_SECONDS = 0.01
# The longest lag is reported over a sliding window of this many slots of
# SLOT_SECONDS each: long enough for a scrape every 15-30 s to see it, short
# enough that one stall does not stay the maximum for the process's life.
SLOT_SECONDS = 10.0
SLOTS = 6


class WindowedMax:
    """The largest value seen in the last ``slots`` slots of
    ``slot_seconds`` (the current slot, which has begun, included: so
    between (slots - 1) * slot_seconds and slots * slot_seconds back).
    Times are whatever clock the caller passes, in seconds."""

    def __init__(self, *, slot_seconds: float = SLOT_SECONDS, slots: int = SLOTS) -> None:
        """Raises ValueError for a slot length or count below the minimum."""
        if slot_seconds <= 0:
            raise ValueError(f"slot_seconds must be positive, got {slot_seconds}")
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self._slot_seconds = slot_seconds
        self._slots = slots
        # (slot number, largest value in it), oldest first.
        self._maxima: list[tuple[int, float]] = []

    def add(self, value: float, now: float) -> float:
        """Record ``value`` at time ``now`` (never earlier than the previous
        call's); the largest value of the window. Raises nothing."""
        slot = int(now // self._slot_seconds)
        maxima = self._maxima
        if maxima and maxima[-1][0] == slot:
            if value > maxima[-1][1]:
                maxima[-1] = (slot, value)
        else:
            maxima.append((slot, value))
            oldest = slot - self._slots + 1
            while maxima[0][0] < oldest:
                del maxima[0]
        return max(largest for _, largest in maxima)


class LoopLagMonitor:
    """Measures the event loop's lag every ``interval`` seconds and passes
    each measurement to ``observe(lag, hold)`` (seconds, >= 0, hold <= lag;
    see the module docstring). ``start`` from the loop to watch; ``stop``
    ends it."""

    def __init__(
        self,
        observe: Callable[[float, float], None],
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
    ) -> None:
        """Raises ValueError for an interval that is not positive."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._observe = observe
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start measuring on the running loop (again after ``stop``; a
        second start while running does nothing). Raises RuntimeError
        without a running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._watch(), name="event-loop-lag"
            )

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._interval
        observe = self._observe
        cpu = time.thread_time
        while True:
            due = loop.time() + interval
            used = cpu()
            await asyncio.sleep(interval)
            # The loop may run a timer up to its clock resolution early.
            lag = max(0.0, loop.time() - due)
            observe(lag, min(lag, cpu() - used))

    async def stop(self) -> None:
        """Stop measuring and wait until the task has ended. Raises nothing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
