"""usersvc benchmark harness: ``make bench`` / ``python -m bench``.

Seeds its own database, starts usersvc and the two baselines side by side,
checks every call with a real gRPC client, then loads each system in turn
with h2load for R rounds of T seconds, rotating the order every round.
Ratios are medians of per-round ratios. Prints a table per scenario and
writes everything to bench-results/<timestamp>.json.

    python -m bench --scenarios getuser --rounds 3 --seconds 3
    python -m bench --soak --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import jwt

from . import h2load
from .baselines.bare import connect_kwargs
from .h2load import LoadShape
from .runner import Runner, ScenarioResult, print_result, say, system_lines
from .scenarios import (
    BUILDERS,
    COMPARED,
    OWN_DATABASE,
    SCENARIOS,
    SERVED_POOL,
    Context,
    Plan,
    login,
)
from .seed import (
    ADMIN_EMAIL,
    USER_EMAIL,
    BenchDatabase,
    hold_run_lock,
    locate_database,
    seed,
    vacuum_written,
)
from .soak import DEFAULT_RATES, parse_rates, print_soak, run_soak
from .systems import (
    BARE,
    NAIVE,
    USERSVC,
    USERSVC_BATCH,
    USERSVC_OVERRIDES,
    System,
    SystemFailure,
    baseline_system,
    seeds_system,
    usersvc_system,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="h2load warm-up per run (1)")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (4)")
    parser.add_argument("--streams", type=int, default=8, help="calls in flight per connection (8)")
    parser.add_argument(
        "--list-streams", type=int, default=4, help="ListUsers calls in flight (4, one connection)"
    )
    parser.add_argument("--rows", type=int, default=1_000_000, help="seeded users (1,000,000)")
    parser.add_argument("--workers", type=int, help="pass --workers N to usersvc serve")
    parser.add_argument(
        "--no-baselines", action="store_true", help="load usersvc only (no bare/naive servers)"
    )
    parser.add_argument("--baseline-pool", type=int, default=20, help="baseline pool size (20)")
    parser.add_argument("--flood-getuser-rps", type=float, default=400.0)
    parser.add_argument(
        "--flood-streams",
        type=int,
        default=4,
        help="logins in flight per flood account (4; 5 or more lock the account)",
    )
    parser.add_argument("--batch-tasks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--import-streams", type=int, default=2)
    parser.add_argument("--import-batch", type=int, default=1000, help="users per stream message")
    parser.add_argument(
        "--import-users", type=int, default=100_000, help="users imported per round (100,000)"
    )
    parser.add_argument(
        "--batch-writes-users", type=int, default=1000, help="users renamed per run (1000)"
    )
    parser.add_argument(
        "--events", type=int, default=20_000, help="events relayed per round (20,000)"
    )
    parser.add_argument(
        "--events-rate", type=int, default=500, help="writes/s of the lag run (500)"
    )
    parser.add_argument(
        "--events-writes", type=int, default=1000, help="writes per event-cost run (1000)"
    )
    parser.add_argument(
        "--served-pool",
        type=int,
        default=SERVED_POOL,
        help=f"database pool of each events-served server ({SERVED_POOL})",
    )
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "bench-results")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs and h2load files"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, run each usersvc run once more under py-spy (not counted) "
        "and print where its CPU goes",
    )
    soak = parser.add_argument_group("soak (item 6)")
    soak.add_argument("--soak", action="store_true", help="run the memory soak instead")
    soak.add_argument("--duration", type=float, default=600.0, help="soak seconds (600)")
    soak.add_argument("--soak-warmup", type=float, default=120.0, help="warm-up seconds (120)")
    soak.add_argument("--soak-interval", type=float, default=10.0, help="RSS sample period (10)")
    soak.add_argument(
        "--soak-rps",
        default="",
        help="rates, e.g. "
        + ",".join(f"{name}={rate:g}" for name, rate in DEFAULT_RATES.items())
        + " (the default)",
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    args.scenarios = [name for name in SCENARIOS if name in chosen]
    if args.rounds < 1 or args.seconds <= 0 or args.clients < 1 or args.streams < 1:
        parser.error("--rounds, --seconds, --clients and --streams must be positive")
    if args.soak and args.soak_warmup >= args.duration:
        # A smoke run: keep a reference point inside the run.
        args.soak_warmup = args.duration / 5
    try:
        args.soak_rates = parse_rates(args.soak_rps)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def ensure_h2load() -> str:
    """h2load's version line; installs nghttp2-client when missing and this
    process may (root with apt-get). Raises SystemExit otherwise."""
    if h2load.find_h2load() is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            say("h2load missing: apt-get install -y nghttp2-client")
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", "nghttp2-client"],
                check=False,
            )
        if h2load.find_h2load() is None:
            raise SystemExit(
                "h2load not found: install nghttp2-client (sudo apt-get install nghttp2-client)"
            )
    version = subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False)
    return version.stdout.strip().splitlines()[0] if version.stdout else "h2load"


def machine() -> dict[str, Any]:
    """nproc, CPU model, memory, kernel, load: where the numbers were taken."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def seeds_token(user_id: object, secret: str) -> str:
    """An HS256 access token for the seeds' FastAPI design, valid a day."""
    now = int(time.time())
    claims = {"sub": str(user_id), "iat": now, "exp": now + 86_400}
    return jwt.encode(claims, secret, algorithm="HS256")


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=PROJECT_ROOT,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=PROJECT_ROOT,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


async def postgres_version(url: str) -> str:
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


async def main_async(args: argparse.Namespace) -> int:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    work_dir = args.results_dir / f"run-{stamp}"
    work_dir.mkdir()
    report: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
        "started": stamp,
        "git": git_revision(),
        "machine": machine(),
        "h2load": ensure_h2load(),
    }
    say(f"usersvc benchmark {stamp} (git {report['git']})")
    info = report["machine"]
    say(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, "
        f"{(info['memory_bytes'] or 0) / 2**30:.1f} GiB; load average "
        + " ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    )

    database = await asyncio.to_thread(locate_database)
    run_lock = await hold_run_lock(database.url)
    try:
        return await _run(args, report, database, stamp, work_dir)
    finally:
        await run_lock.close()


async def _run(
    args: argparse.Namespace,
    report: dict[str, Any],
    database: BenchDatabase,
    stamp: str,
    work_dir: Path,
) -> int:
    seeded = await seed(database.url, args.rows)
    report["database"] = {
        "where": database.description,
        "postgres": await postgres_version(database.url),
        "rows": seeded.rows,
        "reused_seed": seeded.reused,
        "seed_seconds": round(seeded.seconds, 1),
    }
    say(
        f"database: {database.description}, PostgreSQL {report['database']['postgres']}, "
        f"{seeded.rows:,} users ({'reused' if seeded.reused else 'seeded'} in "
        f"{seeded.seconds:.1f} s)"
    )

    usersvc = usersvc_system(
        name=USERSVC, database_url=database.url, work_dir=work_dir, workers=args.workers
    )
    baselines: list[System] = []
    if not args.soak and not args.no_baselines and COMPARED & set(args.scenarios):
        baselines = [
            baseline_system(
                kind, database_url=database.url, work_dir=work_dir, pool_size=args.baseline_pool
            )
            for kind in (BARE, NAIVE)
        ]
    seeds: System | None = None
    seeds_secret = secrets.token_urlsafe(32)
    if baselines and "getuser" in args.scenarios:
        seeds = seeds_system(
            database_url=database.url,
            work_dir=work_dir,
            pool_size=args.baseline_pool,
            secret=seeds_secret,
        )
    systems = [usersvc, *baselines, *([seeds] if seeds is not None else [])]
    shape = LoadShape(args.clients, args.streams, args.seconds, args.warmup)
    failed = False
    try:
        for system in systems:
            system.start()
        for system in systems:
            await system.wait_ready(90.0, health=system is usersvc)
        user_token = await login(usersvc.address, USER_EMAIL, seeded.user.password)
        admin_token = await login(usersvc.address, ADMIN_EMAIL, seeded.admin.password)
        report["systems"] = {s.name: s.description for s in systems}
        report["usersvc_overrides"] = USERSVC_OVERRIDES
        say("systems (side by side, nothing pinned):")
        for line in system_lines(systems):
            say(f"  {line}")
        say(
            "usersvc differs from production defaults only in: "
            + ", ".join(f"{k}={v}" for k, v in USERSVC_OVERRIDES.items())
            + " (rate limits raised so one h2load caller is not throttled; tokens outlive the run)"
        )
        ctx = Context(
            usersvc=usersvc,
            baselines=baselines,
            seeded=seeded,
            database_url=database.url,
            work_dir=work_dir,
            shape=shape,
            list_shape=LoadShape(1, args.list_streams, args.seconds, args.warmup),
            user_token=user_token,
            admin_token=admin_token,
            flood_getuser_rps=args.flood_getuser_rps,
            flood_streams=args.flood_streams,
            batch_tasks=args.batch_tasks,
            batch_size=args.batch_size,
            import_streams=args.import_streams,
            import_batch=args.import_batch,
            import_users=args.import_users,
            workers=args.workers,
            seeds=seeds,
            seeds_token=seeds_token(seeded.user.id, seeds_secret),
            warmup=args.warmup,
            batch_writes_users=args.batch_writes_users,
            events_count=args.events,
            events_rate=args.events_rate,
            events_writes=args.events_writes,
            served_pool=args.served_pool,
        )
        if args.soak:
            failed = await soak(args, ctx, report)
        else:
            failed = await scenarios(args, ctx, report)
    except SystemFailure as exc:
        say(f"FAILED: {exc}")
        failed = True
    finally:
        for system in systems:
            code = await asyncio.to_thread(system.stop)
            if code not in (0, None):
                say(f"{system.name} exited with {code}; log: {system.log}")
        report["loadavg_at_end"] = os.getloadavg()
        path = args.results_dir / f"{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"\nresults: {path}")
        if args.keep_logs or failed:
            say(f"logs: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


async def scenarios(args: argparse.Namespace, ctx: Context, report: dict[str, Any]) -> bool:
    runner = Runner(
        ctx.work_dir,
        rounds=args.rounds,
        seconds=args.seconds,
        profile_systems=frozenset({USERSVC, USERSVC_BATCH}) if args.profile else frozenset(),
    )
    say(
        f"load: h2load {ctx.shape.describe()}, {args.rounds} rounds x {args.seconds:g} s per "
        f"system (+{args.warmup:g} s warm-up), order rotating each round; "
        "ratios are medians of per-round ratios"
    )
    report["settings"] = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "load": ctx.shape.describe(),
        "list_load": ctx.list_shape.describe(),
    }
    results: list[ScenarioResult] = []
    report["scenarios"] = {}
    for name in args.scenarios:
        say(f"\n-- {name}")
        vacuumed: float | None = None
        if name not in OWN_DATABASE:
            # Not timed: every scenario on the bench database starts from
            # tables without the dead row versions the ones before it left.
            vacuumed = await vacuum_written(ctx.database_url)
            say(f"  users and events vacuumed ({vacuumed:.1f} s, not timed)")
        began = time.monotonic()
        try:
            built = BUILDERS[name](ctx)
            plan = await built if inspect.isawaitable(built) else built
        except SystemFailure:
            raise
        except Exception as exc:  # a scenario that cannot be set up is reported, not fatal
            say(f"  cannot set up {name}: {type(exc).__name__}: {exc}")
            report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            results.append(ScenarioResult(Plan(name, name), error=f"cannot set up: {exc}"))
            continue
        result = await runner.run(plan)
        results.append(result)
        report["scenarios"][name] = result.as_json()
        report["scenarios"][name]["seconds_taken"] = round(time.monotonic() - began, 1)
        if vacuumed is not None:
            report["scenarios"][name]["vacuum_seconds"] = round(vacuumed, 1)
        print_result(result)
    say("\n======== summary")
    for result in results:
        print_result(result)
    targets = [v for r in results for v in r.verdicts if v.target is not None]
    if targets:
        say("\n   targets:")
    for verdict in targets:
        unit = f" {verdict.unit}" if verdict.unit else ""
        target = verdict.target.text() if verdict.target else ""
        say(f"   {verdict.status:<5} {verdict.label}: {verdict.value:,.2f}{unit} (target {target})")
    problems = [p for r in results for p in r.problems]
    return bool(problems)


async def soak(args: argparse.Namespace, ctx: Context, report: dict[str, Any]) -> bool:
    say(
        f"\n-- soak: {args.duration:g} s, warm-up {args.soak_warmup:g} s, RSS every "
        f"{args.soak_interval:g} s, rates {args.soak_rates}"
    )
    result = await run_soak(
        ctx,
        duration=args.duration,
        warmup=args.soak_warmup,
        interval=args.soak_interval,
        rates=args.soak_rates,
        say=say,
    )
    report["soak"] = result.as_json()
    print_soak(result, say)
    return bool(result.problems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
