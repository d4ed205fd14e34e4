"""The event loop lag monitor (usersvc.observability.loop_lag) and the
metrics it feeds: a step that holds the loop shows as a lag and a hold of
its length, a wait that uses no CPU as a lag only, and the largest lag is
kept for a window of time, not for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from usersvc.observability.loop_lag import LoopLagMonitor, WindowedMax
from usersvc.observability.metrics import Metrics

HOLD_SECONDS = 0.05


def spin(seconds: float) -> None:
    """Compute (hold the CPU) for ``seconds``."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def measure_after(step: Callable[[], None]) -> tuple[float, float]:
    """The (lag, hold) the monitor measures when ``step`` runs on the loop
    right after the monitor went to sleep for 10 ms."""
    measured: list[tuple[float, float]] = []
    wake = asyncio.Event()

    def observe(lag: float, hold: float) -> None:
        measured.append((lag, hold))
        wake.set()

    monitor = LoopLagMonitor(observe, interval=0.01)
    monitor.start()
    try:
        await asyncio.wait_for(wake.wait(), 5)
        step()
        at = len(measured)
        wake.clear()
        await asyncio.wait_for(wake.wait(), 5)
    finally:
        await monitor.stop()
    return measured[at]


async def test_a_step_that_computes_without_yielding_is_a_lag_and_a_hold() -> None:
    lag, hold = await measure_after(lambda: spin(HOLD_SECONDS))
    # The monitor was due 10 ms into the step.
    assert lag >= HOLD_SECONDS - 0.015
    assert hold >= HOLD_SECONDS - 0.015


async def test_a_wait_that_uses_no_cpu_is_a_lag_but_no_hold() -> None:
    # As when the process waits for a CPU the machine does not have free.
    lag, hold = await measure_after(lambda: time.sleep(HOLD_SECONDS))
    assert lag >= HOLD_SECONDS - 0.015
    assert hold < HOLD_SECONDS / 2


async def test_stop_ends_the_monitor_and_it_can_start_again() -> None:
    seen = asyncio.Event()
    monitor = LoopLagMonitor(lambda *_: seen.set(), interval=0.001)
    for _ in range(2):
        seen.clear()
        monitor.start()
        await asyncio.wait_for(seen.wait(), 5)
        await monitor.stop()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag"]


def test_the_monitor_refuses_an_interval_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        LoopLagMonitor(lambda *_: None, interval=0)


def test_the_window_keeps_the_largest_value_of_its_slots() -> None:
    window = WindowedMax(slot_seconds=10, slots=3)
    assert window.add(0.5, now=100) == 0.5
    assert window.add(0.1, now=105) == 0.5
    assert window.add(0.2, now=115) == 0.5
    assert window.add(0.3, now=129.9) == 0.5


def test_the_largest_value_leaves_the_window_when_its_slot_does() -> None:
    window = WindowedMax(slot_seconds=10, slots=3)
    window.add(0.5, now=100)
    window.add(0.2, now=115)
    # Slots 10, 11, 12 -> 11, 12, 13: the 0.5 of slot 10 is gone.
    assert window.add(0.1, now=130) == 0.2
    # Far later: only the new value is left.
    assert window.add(0.05, now=1000) == 0.05


def test_the_window_refuses_empty_slots() -> None:
    with pytest.raises(ValueError, match="slots"):
        WindowedMax(slots=0)
    with pytest.raises(ValueError, match="slot_seconds"):
        WindowedMax(slot_seconds=0)


def test_each_measurement_feeds_the_histograms_and_the_windowed_maximum() -> None:
    metrics = Metrics.create()
    metrics.loop_lag(0.3, 0.001, now=100)
    metrics.loop_lag(0.004, 0.004, now=101)
    registry = metrics.registry
    assert registry.get_sample_value("usersvc_event_loop_lag_seconds_count") == 2
    assert registry.get_sample_value("usersvc_event_loop_lag_seconds_bucket", {"le": "0.005"}) == 1
    assert registry.get_sample_value("usersvc_event_loop_hold_seconds_bucket", {"le": "0.005"}) == 2
    assert registry.get_sample_value("usersvc_event_loop_lag_max_seconds") == 0.3
    metrics.loop_lag(0.002, 0.002, now=200)
    assert registry.get_sample_value("usersvc_event_loop_lag_max_seconds") == 0.002


async def test_metrics_measure_the_loop_lag_once_started() -> None:
    metrics = Metrics.create()
    metrics.start()
    try:
        deadline = time.monotonic() + 5
        while not metrics.registry.get_sample_value("usersvc_event_loop_lag_seconds_count"):
            assert time.monotonic() < deadline, "no lag measured within 5 s"
            await asyncio.sleep(0.01)
    finally:
        await metrics.stop()
