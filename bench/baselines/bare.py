"""The ceilings: grpc.aio and a raw asyncpg pool, the leanest correct code
for each call, one statement per call, no authentication, no interceptors,
no ORM.

    python -m bench.baselines.bare --listen 127.0.0.1:50061 \\
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/usersvc_bench

Serves UserService with one statement per call:

- GetUser, LookupUser: one ``SELECT ... WHERE``;
- ListUsers (no filter, create_time order): one keyset ``SELECT ... LIMIT``
  for every page. The first page's total_size comes from the planner's row
  count (``pg_class.reltuples``) inside that same statement: the estimate
  that docs/api.md allows beyond 10,000 matches (the bench's table has 1M);
- UpdateUser (display_name only): one ``UPDATE ... RETURNING``, with
  ``AND version = $n`` when an etag is given; only a write that matched no
  row takes a second look, to tell NOT_FOUND from ABORTED;
- CreateUser: one ``INSERT ... RETURNING`` with a hash computed once at
  start-up (the ceiling of the work around the bcrypt hash);

everything else is UNIMPLEMENTED.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import bcrypt
import grpc
from sqlalchemy.engine import make_url

from usersvc_protos.v1 import user_service_pb2 as pb
from usersvc_protos.v1 import user_service_pb2_grpc

from .common import (
    UPDATABLE_PATHS,
    PageToken,
    arguments,
    decode_page_token,
    encode_page_token,
    page_size_of,
    parse_id,
    serve,
    user_message,
)

_COLUMNS = (
    "id, email, display_name, roles, labels, create_time, update_time, "
    "disable_time, delete_time, version"
)
_GET_BY_ID = f"SELECT {_COLUMNS} FROM users WHERE id = $1"
_GET_BY_EMAIL = f"SELECT {_COLUMNS} FROM users WHERE lower(email) = lower($1)"
_FIRST_PAGE = (
    f"SELECT {_COLUMNS}, "
    "(SELECT reltuples::bigint FROM pg_class WHERE oid = 'users'::regclass) AS estimate "
    "FROM users WHERE delete_time IS NULL ORDER BY create_time, id LIMIT $1"
)
_NEXT_PAGE = (
    f"SELECT {_COLUMNS} FROM users WHERE delete_time IS NULL "
    "AND (create_time, id) > ($2, $3) ORDER BY create_time, id LIMIT $1"
)
_UPDATE_DISPLAY_NAME = (
    "UPDATE users SET display_name = $2, version = version + 1, update_time = now() "
    f"WHERE id = $1 AND delete_time IS NULL RETURNING {_COLUMNS}"
)
_UPDATE_DISPLAY_NAME_AT = (
    "UPDATE users SET display_name = $2, version = version + 1, update_time = now() "
    f"WHERE id = $1 AND version = $3 AND delete_time IS NULL RETURNING {_COLUMNS}"
)
_IS_LIVE = "SELECT true FROM users WHERE id = $1 AND delete_time IS NULL"
_INSERT = (
    "INSERT INTO users (id, email, password_hash, display_name, roles, labels, "
    "create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6, now(), now()) "
    f"RETURNING {_COLUMNS}"
)
_DEFAULT_ROLES = ["user"]


def uuid7() -> uuid.UUID:
    """A version 7 UUID (48-bit Unix milliseconds, then random bits), the
    form usersvc gives ids, so the primary key index grows the same way."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def version_of(etag: str) -> int | None:
    """The row version in a usersvc etag (``v<version>``), or None."""
    if etag.startswith("v") and etag[1:].isdigit():
        return int(etag[1:])
    return None


def connect_kwargs(url: str) -> dict[str, Any]:
    """asyncpg.connect arguments for a postgresql+asyncpg:// URL, including
    the embedded server's ``?host=<socket dir>&port=N`` form. Raises
    sqlalchemy.exc.ArgumentError for a malformed URL."""
    parsed = make_url(url)
    query = dict(parsed.query)
    host = query.pop("host", None) or parsed.host
    port = query.pop("port", None) or parsed.port
    kwargs: dict[str, Any] = {
        "host": host,
        "port": int(port) if port is not None else None,
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
    }
    return {key: value for key, value in kwargs.items() if value is not None}


async def _init_connection(connection: asyncpg.Connection) -> None:
    # asyncpg hands jsonb over as text unless told how to decode it.
    await connection.set_type_codec(
        "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
    )


def _message(row: asyncpg.Record) -> Any:
    return user_message(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        roles=row["roles"],
        labels=row["labels"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        disable_time=row["disable_time"],
        delete_time=row["delete_time"],
        version=row["version"],
    )


class BareUserService(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Once, at cost 4: the ceiling of CreateUser leaves the hash out.
        self._password_hash = bcrypt.hashpw(b"bench ceiling password", bcrypt.gensalt(4)).decode()

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        user_id = parse_id(request.id)
        if user_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id is not a UUID")
        row = await self._pool.fetchrow(_GET_BY_ID, user_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return pb.GetUserResponse(user=_message(row))

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: Any
    ) -> pb.LookupUserResponse:
        row = await self._pool.fetchrow(_GET_BY_EMAIL, request.email)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return pb.LookupUserResponse(user=_message(row))

    async def ListUsers(self, request: pb.ListUsersRequest, context: Any) -> pb.ListUsersResponse:
        if request.filter or request.order_by or request.show_deleted:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline: no filter or order")
        size = page_size_of(request.page_size)
        if request.page_token:
            try:
                token = decode_page_token(request.page_token)
            except ValueError:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
            total = token.total_size
            rows = await self._pool.fetch(_NEXT_PAGE, size + 1, token.create_time, token.id)
        else:
            rows = await self._pool.fetch(_FIRST_PAGE, size + 1)
            total = rows[0]["estimate"] if rows else 0
        next_token = ""
        if len(rows) > size:
            last = rows[size - 1]
            next_token = encode_page_token(PageToken(last["create_time"], last["id"], total))
        return pb.ListUsersResponse(
            users=[_message(row) for row in rows[:size]],
            next_page_token=next_token,
            total_size=total,
        )

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Any
    ) -> pb.UpdateUserResponse:
        if set(request.update_mask.paths) != UPDATABLE_PATHS:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline: display_name only")
        user_id = parse_id(request.user.id)
        if user_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id is not a UUID")
        name = request.user.display_name
        if request.user.etag:
            version = version_of(request.user.etag)
            if version is None:
                await context.abort(grpc.StatusCode.ABORTED, "stale etag")
            row = await self._pool.fetchrow(_UPDATE_DISPLAY_NAME_AT, user_id, name, version)
        else:
            row = await self._pool.fetchrow(_UPDATE_DISPLAY_NAME, user_id, name)
        if row is None:
            # Only now a second look: which rule refused the write.
            if request.user.etag and await self._pool.fetchval(_IS_LIVE, user_id):
                await context.abort(grpc.StatusCode.ABORTED, "stale etag")
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return pb.UpdateUserResponse(user=_message(row))

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Any
    ) -> pb.CreateUserResponse:
        if not request.email or "@" not in request.email:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "email")
        try:
            row = await self._pool.fetchrow(
                _INSERT,
                uuid7(),
                request.email.lower(),
                self._password_hash,
                request.display_name,
                list(request.roles) or _DEFAULT_ROLES,
                dict(request.labels),
            )
        except asyncpg.UniqueViolationError:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "email taken")
        return pb.CreateUserResponse(user=_message(row))


def main() -> None:
    args = arguments(__doc__ or "")

    async def setup(server: grpc.aio.Server) -> Callable[[], Awaitable[None]]:
        # Like usersvc's pool (10 kept, 10 more under bursts): connections
        # above the kept half close soon after the burst.
        pool = await asyncpg.create_pool(
            min_size=args.pool_size // 2,
            max_size=args.pool_size,
            max_inactive_connection_lifetime=10.0,
            init=_init_connection,
            **connect_kwargs(args.database_url),
        )
        user_service_pb2_grpc.add_UserServiceServicer_to_server(BareUserService(pool), server)
        return pool.close

    serve(args.listen, setup, use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
