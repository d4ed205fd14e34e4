"""Runs a Plan: verify every call, then R rounds, each giving every run T
seconds in an order that rotates from round to round, so no system always
goes first (or always runs right after the heaviest one)."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import h2load, profile
from .calls import HttpCall, verify, verify_http
from .results import (
    Measurement,
    Verdict,
    absolute_verdict,
    cpu_per_call_us,
    ratio_verdict,
    rotated,
    summary,
)
from .scenarios import DriverRun, LoadRun, Plan
from .systems import System, cpu_seconds

# h2load's own timeout on top of the run's length: only a hung run hits it.
_H2LOAD_GRACE_SECONDS = 60.0
CANCELLED = "CANCELLED"
# A pause after each run, so the calls it left behind drain before the next.
_SETTLE_SECONDS = 0.5


def say(message: str = "") -> None:
    print(message, flush=True)


@dataclass
class ScenarioResult:
    plan: Plan
    rounds: list[dict[str, Measurement]] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    error: str | None = None
    # py-spy's view of the usersvc runs (--profile), by run key.
    profiles: dict[str, profile.Profile] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [run.key for run in self.plan.runs]

    def summaries(self) -> dict[str, dict[str, float]]:
        return {key: summary(self.rounds, key) for key in self.keys}

    @property
    def problems(self) -> list[str]:
        found = [f"{self.plan.name}: {self.error}"] if self.error else []
        for index, measurements in enumerate(self.rounds, start=1):
            for key, measurement in measurements.items():
                found.extend(
                    f"{self.plan.name} round {index} {key}: {problem}"
                    for problem in measurement.problems
                )
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.plan.title,
            "skipped": self.plan.skipped,
            "error": self.error,
            "notes": self.plan.notes,
            "runs": {
                run.key: {
                    "system": run.system.name,
                    "load": _describe(run),
                    "median": {
                        name: (None if math.isnan(value) else value)
                        for name, value in summary(self.rounds, run.key).items()
                    },
                    "rounds": [m[run.key].as_json() for m in self.rounds if run.key in m],
                }
                for run in self.plan.runs
            },
            "verdicts": [verdict.as_json() for verdict in self.verdicts],
            "profiles": {key: found.as_json() for key, found in self.profiles.items()},
        }


def _describe(run: LoadRun | DriverRun) -> str:
    if isinstance(run, DriverRun):
        return "Python grpc.aio client"
    text = f"h2load {run.shape.describe()}"
    for _, call, shape in run.background:
        text += f"; beside it h2load {shape.describe()} on {call.path}"
    return text


class Runner:
    def __init__(
        self,
        work_dir: Path,
        *,
        rounds: int,
        seconds: float,
        profile_systems: frozenset[str] = frozenset(),
    ) -> None:
        """``profile_systems``: names of the systems whose runs get one more,
        uncounted pass under py-spy after the rounds."""
        self.work_dir = work_dir
        self.rounds = rounds
        self.seconds = seconds
        self.profile_systems = profile_systems
        # Calls the previous run left in flight on each system: the server
        # may log their CANCELLED only after the next run's log mark.
        self._left_in_flight: dict[str, int] = {}

    async def run(self, plan: Plan) -> ScenarioResult:
        """Verify, then measure. Never raises for a failing system: the
        error is kept in the result (the other scenarios still run)."""
        result = ScenarioResult(plan)
        if plan.skipped:
            return result
        try:
            for system, label, call in plan.checks:
                if isinstance(call, HttpCall):
                    await verify_http(system.address, system.name, label, call)
                else:
                    await verify(system.address, system.name, label, call)
            if plan.checks:
                say(f"  verified {len(plan.checks)} call(s): OK and the right users")
            bodies = self._write_bodies(plan)
            for index in range(self.rounds):
                measurements: dict[str, Measurement] = {}
                for run in rotated(plan.runs, index):
                    measurements[run.key] = await self._measure(run, bodies)
                result.rounds.append(measurements)
                say(f"  round {index + 1}/{self.rounds}: {_round_line(plan, measurements)}")
            for run in plan.runs:
                if run.system.name in self.profile_systems:
                    result.profiles[run.key] = await self._profile(plan, run, bodies)
                    say(f"  profiled {run.key}: {result.profiles[run.key].samples} samples")
        except Exception as exc:  # one broken scenario must not stop the rest
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"  FAILED: {result.error}")
        finally:
            if plan.teardown is not None:
                await plan.teardown()
        result.verdicts = [ratio_verdict(spec, result.rounds) for spec in plan.ratios]
        result.verdicts += [absolute_verdict(spec, result.rounds) for spec in plan.absolutes]
        return result

    def _write_bodies(self, plan: Plan) -> dict[str, Path]:
        bodies: dict[str, Path] = {}
        for number, run in enumerate(plan.runs):
            if isinstance(run, LoadRun):
                if not isinstance(run.call, HttpCall):
                    bodies[run.key] = run.call.write_body(
                        self.work_dir / f"{plan.name}-{number}.body"
                    )
                for index, (_, call, _) in enumerate(run.background):
                    bodies[_background_key(run, index)] = call.write_body(
                        self.work_dir / f"{plan.name}-{number}-background-{index}.body"
                    )
        return bodies

    async def _profile(
        self, plan: Plan, run: LoadRun | DriverRun, bodies: Mapping[str, Path]
    ) -> profile.Profile:
        """One more run of ``run``, not counted, with py-spy sampling its
        server for the whole of it. Raises ProfileError."""
        warmup = run.shape.warmup_seconds if isinstance(run, LoadRun) else 0.0
        output = self.work_dir / f"py-spy-{plan.name}-{run.key.replace(' ', '-')}.txt"
        sampler = profile.start(run.system.pid, warmup + self.seconds, output)
        await self._measure(run, bodies)
        return await asyncio.to_thread(
            profile.finish, sampler, output, timeout=warmup + self.seconds + 60
        )

    async def _measure(self, run: LoadRun | DriverRun, bodies: Mapping[str, Path]) -> Measurement:
        loadavg = os.getloadavg()[0]
        if isinstance(run, DriverRun):
            run.system.check_alive()
            cpu_before, began = cpu_seconds(run.system.pid), time.monotonic()
            units, elapsed = await run.drive(self.seconds)
            cpu_used, wall = cpu_seconds(run.system.pid) - cpu_before, time.monotonic() - began
            run.system.check_alive()
            rps = units / elapsed
            return Measurement(
                rps=rps,
                cpu_us=cpu_per_call_us(cpu_used, wall, rps),
                requests=units,
                loadavg_1m=loadavg,
            )
        return await self._measure_load(run, bodies, loadavg)

    async def _measure_load(
        self, run: LoadRun, bodies: Mapping[str, Path], loadavg: float
    ) -> Measurement:
        shape = replace(run.shape, seconds=self.seconds)
        if run.prepare is not None:
            await run.prepare()
        run.system.check_alive()
        run.system.mark_log()
        timeout = shape.warmup_seconds + shape.seconds + _H2LOAD_GRACE_SECONDS
        backgrounds = []
        for index, (system, call, bg_shape) in enumerate(run.background):
            # Starts first and ends last, so the measured window is loaded throughout.
            bg_shape = replace(
                bg_shape, seconds=shape.warmup_seconds + shape.seconds + bg_shape.warmup_seconds
            )
            log = self.work_dir / f"h2load-background-{index}.log"
            process = h2load.start(
                h2load.command(
                    system.url(call.path),
                    bodies[_background_key(run, index)],
                    bg_shape,
                    log_file=log,
                    headers=call.h2load_headers(),
                ),
                log,
            )
            backgrounds.append((process, log))
        log = self.work_dir / "h2load.log"
        process = h2load.start(
            h2load.command(
                run.system.url(run.call.path),
                bodies.get(run.key),
                shape,
                log_file=log,
                headers=run.call.h2load_headers(),
                h1=isinstance(run.call, HttpCall) and run.call.h1,
            ),
            log,
        )
        # The server's CPU over the measured window (the run alone, not
        # the flood beside it: with a background load there is no figure).
        cpu_window = asyncio.create_task(_cpu_in_window(run.system, shape))
        main = await asyncio.to_thread(h2load.finish, process, log, timeout=timeout)
        cpu_used, wall = await cpu_window
        beside = [
            await asyncio.to_thread(h2load.finish, process, log, timeout=timeout)
            for process, log in backgrounds
        ]
        run.system.check_alive()
        codes = run.system.access_codes_since_mark()
        carried = self._left_in_flight.get(run.system.name, 0)
        self._left_in_flight[run.system.name] = shape.in_flight + sum(
            bg_shape.in_flight for _, _, bg_shape in run.background
        )
        await asyncio.sleep(_SETTLE_SECONDS)
        return Measurement(
            rps=main.summary.requests_per_second,
            p50_ms=main.p50_ms,
            p99_ms=main.p99_ms,
            cpu_us=(
                math.nan
                if run.background
                else cpu_per_call_us(cpu_used, wall, main.summary.requests_per_second)
            ),
            requests=main.summary.done,
            clean=main.summary.clean and all(result.summary.no_errors for result in beside),
            problems=tuple(_problems(run, main, beside, codes, carried)),
            codes={f"{method} {code}": count for (method, code), count in codes.items()},
            background_rps=(
                sum(result.summary.requests_per_second for result in beside) if beside else None
            ),
            loadavg_1m=loadavg,
        )


async def _cpu_in_window(system: System, shape: h2load.LoadShape) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``system`` inside h2load's measured
    window, a little in from both of its ends."""
    margin = min(0.2, shape.seconds / 10)
    await asyncio.sleep(shape.warmup_seconds + margin)
    before, began = cpu_seconds(system.pid), time.monotonic()
    await asyncio.sleep(max(0.05, shape.seconds - 2 * margin))
    return cpu_seconds(system.pid) - before, time.monotonic() - began


def _background_key(run: LoadRun, index: int) -> str:
    return f"{run.key} (background {index})"


def _problems(
    run: LoadRun,
    main: h2load.RunResult,
    beside: Sequence[h2load.RunResult],
    codes: Mapping[tuple[str, str], int],
    carried: int,
) -> list[str]:
    found = []
    for what, result in [("h2load", main)] + [("h2load beside it", r) for r in beside]:
        summary = result.summary
        if not (summary.clean if result is main else summary.no_errors):
            found.append(
                f"{what}: {summary.done} done, {summary.succeeded} succeeded, "
                f"{summary.failed} failed, {summary.errored} errored, {summary.timeout} "
                f"timeout, {summary.status_other} non-2xx"
            )
    loads = [(run.call.path, run.shape.in_flight)]
    loads += [(call.path, shape.in_flight) for _, call, shape in run.background]
    in_flight: dict[str, int] = {}
    for path, calls in loads:
        in_flight[path] = in_flight.get(path, 0) + calls
    for method, calls in in_flight.items():
        wrong = {code: n for (name, code), n in codes.items() if name == method and code != "OK"}
        # h2load resets the streams still in flight when its time is up; the
        # server logs those as CANCELLED, some after the next run has begun.
        # More than this run and the one before left in flight is a problem.
        cancelled = wrong.pop(CANCELLED, 0)
        if cancelled > calls + carried:
            wrong[CANCELLED] = cancelled
        if wrong:
            found.append(f"gRPC statuses of {method} in the access log: {wrong}")
    method = run.call.path
    if codes and codes.get((method, "OK"), 0) < main.summary.done:
        found.append(
            f"the access log shows {codes.get((method, 'OK'), 0)} OK calls of {method}, "
            f"h2load {main.summary.done}"
        )
    return found


def _round_line(plan: Plan, measurements: Mapping[str, Measurement]) -> str:
    parts = []
    for run in plan.runs:
        m = measurements[run.key]
        text = f"{run.key} {m.rps:,.0f}/s"
        if not math.isnan(m.p99_ms):
            text += f" p99 {m.p99_ms:.1f}ms"
        if m.background_rps is not None:
            text += f" ({m.background_rps:.1f} logins/s)"
        if m.problems:
            text += " [PROBLEM]"
        parts.append(text)
    return " | ".join(parts)


def print_result(result: ScenarioResult, out: Any = sys.stdout) -> None:
    """The scenario's table: per run the medians over the rounds, then the
    ratios with their targets."""
    plan = result.plan
    print(f"\n== {plan.name}: {plan.title}", file=out)
    if plan.skipped:
        print(f"   SKIPPED: {plan.skipped}", file=out)
        return
    if result.error:
        print(f"   ERROR: {result.error}", file=out)
    if not result.rounds:
        return
    print(
        f"   {'run':<28} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'CPU us/call':>12}",
        file=out,
    )
    for key, values in result.summaries().items():
        print(
            f"   {key:<28} {_num(values['rps'], 0):>10} {_num(values['p50_ms'], 2):>9} "
            f"{_num(values['p99_ms'], 2):>9} {_num(values['cpu_us'], 0):>12}",
            file=out,
        )
    for verdict in result.verdicts:
        target = f"target {verdict.target.text()}: {verdict.status}" if verdict.target else ""
        rounds = " ".join(_num(value, 2) for value in verdict.per_round)
        unit = f" {verdict.unit}" if verdict.unit else ""
        print(
            f"   {verdict.label:<46} {_num(verdict.value, 2):>9}{unit}  {target:<22} "
            f"rounds: {rounds}",
            file=out,
        )
    loads = [m.loadavg_1m for m in (m for r in result.rounds for m in r.values())]
    loads = [value for value in loads if not math.isnan(value)]
    if loads:
        print(
            f"   machine load average (1 min) at the runs' starts: {min(loads):.2f}..."
            f"{max(loads):.2f}",
            file=out,
        )
    for key, found in result.profiles.items():
        print(f"   profile of {key} (py-spy, {found.samples} samples), self:", file=out)
        for name, share in found.top_self(8):
            print(f"     {share:6.1%}  {name}", file=out)
        print("     usersvc's functions, inclusive:", file=out)
        for name, share in found.top_own_inclusive(8):
            print(f"     {share:6.1%}  {name}", file=out)
    for note in plan.notes:
        print(f"   note: {note}", file=out)
    for problem in result.problems:
        print(f"   PROBLEM: {problem}", file=out)


def _num(value: float, decimals: int) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{decimals}f}"


def system_lines(systems: Sequence[System]) -> list[str]:
    return [f"{system.name:<16} {system.description} on {system.address}" for system in systems]
