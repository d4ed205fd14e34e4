"""The ``usersvc`` command: serve | migrate | create-admin | healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Sequence

from usersvc.config import Settings, SettingsError

logger = logging.getLogger("usersvc.cli")

# create-admin acts with admin rights on behalf of the operator at the console.
_OPERATOR = "cli:create-admin"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="usersvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve gRPC until SIGTERM/SIGINT")
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
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"usersvc: {exc}", file=sys.stderr)
        return 2

    from usersvc.logging_setup import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    if args.command == "serve":
        return _serve(settings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "create-admin":
        return _create_admin(settings, args.email, args.display_name)
    return _healthcheck(settings, args.timeout)


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


def _serve(settings: Settings) -> int:
    from usersvc.bootstrap import bootstrap, resolve_database_url
    from usersvc.server import run_until_signalled

    url, embedded = resolve_database_url(settings)
    if embedded:
        # We own the embedded database, so keeping its schema current is our job.
        from usersvc.adapters.migrations import upgrade

        upgrade(url)

    async def run() -> None:
        await run_until_signalled(bootstrap(settings, database_url=url))

    _install_uvloop()
    try:
        asyncio.run(run())
    except RuntimeError as exc:
        logger.error("cannot start: %s", exc)
        return 1
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
    from usersvc.domain.models import ROLE_ADMIN, ROLE_USER, Principal, PrincipalKind, UserPatch
    from usersvc.services.inputs import CreateUserInput, UpdateUserInput

    password = _read_admin_password()
    if password is None:
        return 2
    url, _ = resolve_database_url(settings)
    operator = Principal(
        kind=PrincipalKind.SERVICE, subject=_OPERATOR, roles=frozenset({ROLE_ADMIN})
    )

    async def run() -> str:
        container = bootstrap(settings, database_url=url)
        users = container.user_service
        try:
            try:
                existing = await users.lookup_user(principal=operator, email=email)
            except DomainError as exc:
                if exc.reason != "USER_NOT_FOUND":
                    raise
                created = await users.create_user(
                    principal=operator,
                    request=CreateUserInput(
                        email=email,
                        password=password,
                        display_name=display_name,
                        roles=(ROLE_USER, ROLE_ADMIN),
                    ),
                )
                return f"created admin {created.email} ({created.id})"
            roles = tuple(dict.fromkeys((*existing.roles, ROLE_ADMIN)))
            await users.update_user(
                principal=operator,
                request=UpdateUserInput(
                    user_id=str(existing.id), etag="", patch=UserPatch(roles=roles)
                ),
            )
            return f"granted admin to existing user {existing.email} ({existing.id})"
        finally:
            await container.aclose()

    try:
        print(asyncio.run(run()))
    except DomainError as exc:
        print(f"usersvc: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _healthcheck(settings: Settings, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host, _, port = settings.listen_addr.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):  # noqa: S104 - we connect, not bind
        host = "127.0.0.1"
    try:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"usersvc: not healthy: {exc.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
