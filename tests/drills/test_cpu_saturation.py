"""A machine whose every core is saturated by other processes is slow, not
down: a real ``usersvc serve`` on a private PostgreSQL, under the drills'
steady load, while busy processes (two per core, each stopping itself after
SATURATION_SECONDS) take the CPU. The probe timeout is tight (50 ms), so
that saturation does make probes late. No call may get DATABASE_UNAVAILABLE
and health must stay SERVING: the database breaker trips on refused connections
at once but on late probes only after a sustained window
(usersvc.adapters.db_monitor). That a stopped PostgreSQL still trips it at
once is the restart drill's part (tests/drills/test_drills.py).

Slow (a little over a minute): ``-m 'not slow'`` skips it. Run with ``-s``
to see the counts.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .support import SERVING, Load, health_status, service_env, serving, sign_up

pytestmark = pytest.mark.slow

SATURATION_SECONDS = 60.0
CLIENTS = 8
# A tight probe timeout, so that saturation makes some probes late (with
# the default of 1 s it rarely does on two cores): the drill then shows
# that late probes alone do not trip the breaker.
PROBE_TIMEOUT_SECONDS = "0.05"
LATE_PROBE_WARNING = "database probe got no answer"
HEALTH_EVERY_SECONDS = 0.25
# Generous: under saturation the answer may take a while; a late answer is
# counted apart from a NOT_SERVING one.
HEALTH_LIMIT_SECONDS = 5.0

# A busy loop that ends itself, so a crashed test leaves nothing burning
# for long; the test also kills each one by its pid when it is done.
_BURN = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@contextmanager
def saturated_cores(seconds: float) -> Iterator[int]:
    """Two busy processes per core for ``seconds``; yields their number."""
    count = 2 * (os.cpu_count() or 1)
    burners = [subprocess.Popen([sys.executable, "-c", _BURN, str(seconds)]) for _ in range(count)]
    try:
        yield count
    finally:
        for burner in burners:
            if burner.poll() is None:
                burner.send_signal(signal.SIGKILL)
        for burner in burners:
            burner.wait()


async def watch_health(address: str, until: float) -> collections.Counter[str]:
    """Health answers until the monotonic time ``until``, by status name."""
    seen: collections.Counter[str] = collections.Counter()
    while time.monotonic() < until:
        status = await health_status(address, limit=HEALTH_LIMIT_SECONDS)
        seen["no answer in time" if status is None else _status_name(status)] += 1
        await asyncio.sleep(HEALTH_EVERY_SECONDS)  # the sampling period
    return seen


def _status_name(status: int) -> str:
    return "SERVING" if status == SERVING else f"status {status}"


async def test_saturated_cores_make_no_call_database_unavailable_and_health_stays_serving(
    cluster_database_url: str, tmp_path: Path
) -> None:
    env = service_env(
        cluster_database_url,
        tmp_path / "data",
        USERSVC_DB_PROBE_TIMEOUT_SECONDS=PROBE_TIMEOUT_SECONDS,
    )
    async with serving(env, tmp_path / "serve.log") as server:
        load = Load(server.listen_addr, await sign_up(server.listen_addr, CLIENTS))
        load.start()
        try:
            await load.more_successes(100)
            before = load.tally.successes
            with saturated_cores(SATURATION_SECONDS) as burners:
                health = await watch_health(
                    server.listen_addr, time.monotonic() + SATURATION_SECONDS
                )
            during = load.tally.successes - before
        finally:
            tally = await load.stop()
        exit_code, _ = await server.sigterm_and_wait(limit=40)
        late_streaks = server.log().count(LATE_PROBE_WARNING)
    unavailable = tally.count("UNAVAILABLE", "DATABASE_UNAVAILABLE")
    print(  # the drill's figures, shown with -s
        tally.report(f"{burners} busy processes for {SATURATION_SECONDS:.0f}s under load"),
        f"\n  OK during saturation {during}; DATABASE_UNAVAILABLE {unavailable};"
        f" health answers {dict(health)}; streaks of late probes"
        f" ({PROBE_TIMEOUT_SECONDS}s timeout) {late_streaks}",
    )

    assert during > 0
    assert unavailable == 0
    assert set(health) <= {"SERVING", "no answer in time"}
    assert health["SERVING"] > 0
    assert exit_code == 0
