"""The ``usersvc`` command: serve | migrate | create-admin | healthcheck | keys."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from usersvc.config import Settings, SettingsError

if TYPE_CHECKING:
    from usersvc.bootstrap import Observability

logger = logging.getLogger("usersvc.cli")

# create-admin acts with admin rights on behalf of the operator at the console.
_OPERATOR = "cli:create-admin"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usersvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve gRPC until SIGTERM/SIGINT")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the port (SO_REUSEPORT), each with its own "
        "connection pool (default: USERSVC_WORKERS, else 1)",
    )
    # Internal: how the supervisor starts worker number N (usersvc.supervisor).
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--parent-fd", type=int, help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="upgrade the database schema to the newest revision")
    admin = commands.add_parser(
        "create-admin",
        help="create an admin user (or grant admin to an existing one); "
        "password from USERSVC_ADMIN_PASSWORD or a prompt",
    )
    admin.add_argument("--email", required=True)
    admin.add_argument("--display-name", default="")
    check = commands.add_parser(
        "healthcheck", help="exit 0 when the server at USERSVC_LISTEN_ADDR is SERVING"
    )
    check.add_argument("--timeout", type=float, default=3.0)
    check.add_argument(
        "--ca-file",
        type=Path,
        help="with TLS: CA certificates to trust (default: USERSVC_TLS_CERT_FILE itself)",
    )
    check.add_argument(
        "--server-name",
        help="with TLS: the name to verify (default: the first DNS name of the certificate)",
    )
    check.add_argument("--client-cert", type=Path, help="with mTLS on the port: PEM chain")
    check.add_argument("--client-key", type=Path, help="with mTLS on the port: PEM key")
    keys = commands.add_parser("keys", help="token signing keys").add_subparsers(
        dest="keys_command", required=True
    )
    generate = keys.add_parser(
        "generate",
        help="write a new Ed25519 signing key (PKCS#8 PEM, mode 0600) and print its kid",
    )
    generate.add_argument("--out", type=Path, required=True, help="file to create")
    args = parser.parse_args(argv)

    if args.command == "keys":
        # Needs no settings: keys are made before a deployment is configured.
        return _generate_key(args.out)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"usersvc: {exc}", file=sys.stderr)
        return 2

    from usersvc.logging_setup import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        # A crash in native code (grpc's core, the driver, uvloop) otherwise
        # ends the process with no word in the log; with this, every thread's
        # Python stack goes to stderr first. It costs nothing until then.
        faulthandler.enable()
        if args.worker is not None:
            return _serve_worker(settings, args.worker, args.parent_fd)
        workers = settings.workers if args.workers is None else args.workers
        problems = settings.worker_checks(workers) if workers >= 1 else ["--workers must be >= 1"]
        problems += _tracing_problems()
        if not problems:
            from usersvc.adapters.keys import check_key_file_modes

            problems += check_key_file_modes(settings, logger)
        if problems:
            print("usersvc: " + "; ".join(problems), file=sys.stderr)
            return 2
        if workers > 1:
            # No grpc in this process: see usersvc.supervisor.
            from usersvc.supervisor import supervise

            return supervise(settings, workers)
        return _serve(settings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "create-admin":
        return _create_admin(settings, args.email, args.display_name)
    return _healthcheck(settings, args)


def _install_uvloop() -> None:
    # uvloop is an optional speed-up (the "speed" extra); asyncio works without it.
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _migration_url(settings: Settings) -> tuple[str, bool]:
    from usersvc.bootstrap import resolve_database_url

    if settings.migration_database_url is not None:
        return settings.migration_database_url, False
    return resolve_database_url(settings)


def _tracing_problems() -> list[str]:
    # OTEL_* variables are read by the OpenTelemetry SDK itself, not
    # Settings; checked before anything starts (imports nothing).
    from usersvc.observability.tracing import TracingConfigError, check_tracing_environment

    try:
        check_tracing_environment(os.environ)
    except TracingConfigError as exc:
        return [str(exc)]
    return []


def _serve(settings: Settings) -> int:
    from usersvc.bootstrap import build_observability, prepare_serving_database

    url = prepare_serving_database(settings)
    try:
        observability = build_observability(settings)
    except OSError as exc:
        logger.error("cannot serve metrics on %s: %s", settings.metrics_addr, exc)
        return 1
    return _run_server(settings, url, observability)


def _serve_worker(settings: Settings, index: int, parent_fd: int | None) -> int:
    """One worker of ``serve --workers N``: the supervisor prepared the
    database and passes its URL; metrics go to the supervisor's multiprocess
    directory, which the supervisor serves."""
    from usersvc.bootstrap import build_observability
    from usersvc.logging_setup import add_static_fields

    add_static_fields(worker=index, pid=os.getpid())
    if settings.database_url is None:
        logger.error("a worker needs USERSVC_DATABASE_URL from its supervisor")
        return 2
    return _run_server(
        settings,
        settings.database_url,
        build_observability(settings, worker=True),
        reuse_port=True,
        parent_fd=parent_fd,
    )


def _run_server(
    settings: Settings,
    url: str,
    observability: Observability,
    *,
    reuse_port: bool = False,
    parent_fd: int | None = None,
) -> int:
    from usersvc.bootstrap import bootstrap
    from usersvc.domain.keys import KeyConfigError
    from usersvc.server import run_until_signalled

    async def run() -> None:
        container = bootstrap(
            settings,
            database_url=url,
            metrics=observability.metrics,
            tracing=observability.tracing,
        )
        await run_until_signalled(container, reuse_port=reuse_port, parent_fd=parent_fd)

    _install_uvloop()
    try:
        asyncio.run(run())
    except (RuntimeError, KeyConfigError) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    finally:
        observability.close()
    return 0


def _generate_key(path: Path) -> int:
    from usersvc.adapters.keys import generate_key_file

    try:
        kid = generate_key_file(path)
    except FileExistsError:
        print(f"usersvc: {path} exists; not overwriting a key", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"usersvc: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"usersvc: wrote an Ed25519 signing key to {path}", file=sys.stderr)
    # Only the kid on stdout, so scripts can capture it.
    print(kid)
    return 0


def _migrate(settings: Settings) -> int:
    from usersvc.adapters.migrations import upgrade

    url, _ = _migration_url(settings)
    upgrade(url)
    logger.info("schema upgraded to head")
    return 0


def _read_admin_password() -> str | None:
    password = os.environ.get("USERSVC_ADMIN_PASSWORD")
    if password:
        return password
    if not sys.stdin.isatty():
        print("usersvc: set USERSVC_ADMIN_PASSWORD or run in a terminal", file=sys.stderr)
        return None
    first = getpass.getpass("Password for the admin: ")
    if first != getpass.getpass("Repeat the password: "):
        print("usersvc: the passwords differ", file=sys.stderr)
        return None
    return first


def _create_admin(settings: Settings, email: str, display_name: str) -> int:
    from usersvc.bootstrap import bootstrap, resolve_database_url
    from usersvc.domain.errors import DomainError
    from usersvc.domain.models import ROLE_ADMIN, Principal, PrincipalKind

    password = _read_admin_password()
    if password is None:
        return 2
    url, _ = resolve_database_url(settings)
    operator = Principal(
        kind=PrincipalKind.SERVICE, subject=_OPERATOR, roles=frozenset({ROLE_ADMIN})
    )

    async def run() -> str:
        # Serves nothing, so reads no TLS files (a job running it may not
        # have them).
        container = bootstrap(settings, database_url=url, serving=False)
        try:
            user, created = await container.user_service.create_or_promote_admin(
                principal=operator, email=email, password=password, display_name=display_name
            )
        finally:
            await container.aclose()
        if created:
            return f"created admin {user.email} ({user.id})"
        return f"granted admin to existing user {user.email} ({user.id})"

    try:
        print(asyncio.run(run()))
    except DomainError as exc:
        print(f"usersvc: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _healthcheck(settings: Settings, args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host, _, port = settings.listen_addr.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # noqa: S104 - we connect, not bind
        host = "127.0.0.1"
    from usersvc.adapters.tls import probe_channel

    try:
        channel = probe_channel(
            settings,
            f"{host}:{port}",
            ca_file=args.ca_file,
            server_name=args.server_name,
            client_cert=args.client_cert,
            client_key=args.client_key,
        )
    except (OSError, ValueError) as exc:
        print(f"usersvc: cannot set up TLS for the check: {exc}", file=sys.stderr)
        return 1
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"usersvc: not healthy: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
