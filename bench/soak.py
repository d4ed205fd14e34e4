"""Item 6: resident memory under a long steady load.

Three h2load processes load usersvc at fixed rates at once (GetUser,
ListUsers page 2, UpdateUser) for the whole duration while the harness
samples the resident set of the usersvc process tree every interval. The
RSS at the end of the warm-up is the reference; every later sample must lie
within +-10% of it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import h2load
from .h2load import LoadShape
from .scenarios import Context, LoadRun, getuser, list_pages, update
from .systems import System, rss_bytes

MIB = 1024 * 1024
TOLERANCE = 0.10
# Well below what one process serves here, so the load stays steady instead
# of saturating (memory under overload is another question).
DEFAULT_RATES = {"getuser": 400.0, "list": 50.0, "update": 50.0}
# Connections and calls in flight per load: room for latency spikes on a
# busy machine without h2load falling behind its rate.
_SHAPES = {"getuser": (2, 16), "list": (1, 8), "update": (1, 8)}


def parse_rates(text: str) -> dict[str, float]:
    """``getuser=600,list=100,update=100`` -> rates per second. Raises
    ValueError for an unknown load or a rate that is not positive."""
    rates = dict(DEFAULT_RATES)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in DEFAULT_RATES:
            raise ValueError(f"unknown soak load {name!r} (known: {', '.join(DEFAULT_RATES)})")
        rate = float(value)
        if rate <= 0:
            raise ValueError(f"soak rate of {name} must be positive")
        rates[name] = rate
    return rates


@dataclass
class SoakResult:
    duration: float
    warmup: float
    interval: float
    rates: dict[str, float]
    idle_rss: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def reference(self) -> tuple[float, int] | None:
        """The first sample at or after the warm-up."""
        for moment, rss in self.samples:
            if moment >= self.warmup:
                return moment, rss
        return None

    @property
    def deviations(self) -> list[float]:
        reference = self.reference
        if reference is None:
            return []
        return [(rss - reference[1]) / reference[1] for t, rss in self.samples if t >= self.warmup]

    @property
    def max_deviation(self) -> float | None:
        deviations = self.deviations
        return max(deviations, key=abs) if deviations else None

    @property
    def status(self) -> str:
        """The memory verdict; failed calls are reported apart (problems)."""
        deviation = self.max_deviation
        if deviation is None:
            return "INCOMPLETE"
        return "PASS" if abs(deviation) <= TOLERANCE else "MISS"

    def as_json(self) -> dict[str, Any]:
        reference = self.reference
        return {
            "duration_s": self.duration,
            "warmup_s": self.warmup,
            "interval_s": self.interval,
            "rates_per_s": self.rates,
            "idle_rss_bytes": self.idle_rss,
            "reference_rss_bytes": None if reference is None else reference[1],
            "max_deviation": self.max_deviation,
            "tolerance": TOLERANCE,
            "status": self.status,
            "samples": [{"t_s": round(t, 1), "rss_bytes": rss} for t, rss in self.samples],
            "loads": self.loads,
            "problems": self.problems,
        }


async def _soak_runs(ctx: Context) -> dict[str, LoadRun]:
    runs = {"getuser": getuser(ctx).runs[0], "update": update(ctx).runs[0]}
    list_plan = await list_pages(ctx)
    runs["list"] = next(run for run in list_plan.runs if run.key.endswith("page2"))
    return {name: run for name, run in runs.items() if isinstance(run, LoadRun)}


async def run_soak(
    ctx: Context,
    *,
    duration: float,
    warmup: float,
    interval: float,
    rates: dict[str, float],
    say: Any,
) -> SoakResult:
    """Load usersvc for ``duration`` seconds and sample its RSS. Raises
    SystemFailure when usersvc dies, h2load.H2loadError when h2load fails."""
    system: System = ctx.usersvc
    runs = await _soak_runs(ctx)
    result = SoakResult(duration, warmup, interval, rates, idle_rss=rss_bytes(system.pid))
    system.mark_log()
    processes = {}
    logs: dict[str, Path] = {}
    for name, run in runs.items():
        clients, streams = _SHAPES[name]
        shape = LoadShape(
            clients=clients,
            streams=streams,
            seconds=duration,
            warmup_seconds=0.1,
            rps_per_client=rates[name] / clients,
        )
        body = run.call.write_body(ctx.work_dir / f"soak-{name}.body")
        logs[name] = ctx.work_dir / f"soak-{name}.log"
        processes[name] = h2load.start(
            h2load.command(
                system.url(run.call.path),
                body,
                shape,
                log_file=logs[name],
                headers=run.call.h2load_headers(),
            ),
            logs[name],
        )
        result.loads[name] = {"path": run.call.path, "load": shape.describe()}
    began = time.monotonic()
    say(f"  idle RSS {result.idle_rss / MIB:.1f} MiB; sampling every {interval:g} s")
    while True:
        elapsed = time.monotonic() - began
        system.check_alive()
        rss = rss_bytes(system.pid)
        result.samples.append((elapsed, rss))
        say(f"  t={elapsed:6.0f} s  RSS {rss / MIB:8.1f} MiB")
        if elapsed >= duration or all(p.poll() is not None for p in processes.values()):
            break
        await asyncio.sleep(min(interval, max(0.0, duration - elapsed)) or interval)
    for name, process in processes.items():
        run_result = await asyncio.to_thread(h2load.finish, process, logs[name], timeout=120.0)
        summary = run_result.summary
        result.loads[name].update(
            rps=summary.requests_per_second,
            requests=summary.done,
            p50_ms=run_result.p50_ms,
            p99_ms=run_result.p99_ms,
            clean=summary.clean,
        )
        if not summary.clean:
            result.problems.append(f"h2load {name}: not every request succeeded: {summary}")
    codes = system.access_codes_since_mark()
    wrong = {f"{method} {code}": n for (method, code), n in codes.items() if code != "OK"}
    # h2load resets the calls in flight when its time is up (CANCELLED).
    in_flight = sum(clients * streams for clients, streams in _SHAPES.values())
    cancelled = sum(n for (_, code), n in codes.items() if code == "CANCELLED")
    if cancelled <= in_flight:
        wrong = {key: n for key, n in wrong.items() if not key.endswith(" CANCELLED")}
    if wrong:
        result.problems.append(f"gRPC statuses in the access log: {wrong}")
    return result


def print_soak(result: SoakResult, say: Any) -> None:
    reference = result.reference
    say(f"\n== soak: {result.duration:g} s of steady load, RSS every {result.interval:g} s")
    for name, load in result.loads.items():
        say(
            f"   {name:<8} {load.get('rps', 0):8.0f}/s  p50 {load.get('p50_ms', 0):6.2f} ms  "
            f"p99 {load.get('p99_ms', 0):7.2f} ms  ({load['load']})"
        )
    say(f"   RSS idle before the load: {result.idle_rss / MIB:.1f} MiB")
    if reference is None:
        say("   no sample after the warm-up: run longer than --soak-warmup")
    else:
        after = [rss for t, rss in result.samples if t >= result.warmup]
        deviation = result.max_deviation or 0.0
        say(
            f"   RSS after the {result.warmup:g} s warm-up: {reference[1] / MIB:.1f} MiB; "
            f"afterwards {min(after) / MIB:.1f}..{max(after) / MIB:.1f} MiB; "
            f"max deviation {deviation:+.1%} (target within +-{TOLERANCE:.0%}): {result.status}"
        )
    for problem in result.problems:
        say(f"   PROBLEM: {problem}")
