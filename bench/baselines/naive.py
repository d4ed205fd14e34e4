"""The design usersvc should beat: grpc.aio with an SQLAlchemy ORM session
per call, written the way tutorials write it (``select(UserRow)``, ORM
objects, ``commit`` then ``refresh``). No authentication, no interceptors.

    python -m bench.baselines.naive --listen 127.0.0.1:50062 \\
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/usersvc_bench

Serves the same four calls as bench/baselines/bare.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from sqlalchemy import func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from usersvc_protos.v1 import user_service_pb2 as pb
from usersvc_protos.v1 import user_service_pb2_grpc
from usersvc.adapters.orm import UserRow

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


def _message(row: UserRow) -> Any:
    return user_message(
        id=row.id,
        email=row.email,
        display_name=row.display_name,
        roles=row.roles,
        labels=row.labels,
        create_time=row.create_time,
        update_time=row.update_time,
        disable_time=row.disable_time,
        delete_time=row.delete_time,
        version=row.version,
    )


class NaiveUserService(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def GetUser(self, request: pb.GetUserRequest, context: Any) -> pb.GetUserResponse:
        user_id = parse_id(request.id)
        if user_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id is not a UUID")
        async with self._sessions() as session:
            row = await session.scalar(select(UserRow).where(UserRow.id == user_id))
            if row is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
            return pb.GetUserResponse(user=_message(row))

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: Any
    ) -> pb.LookupUserResponse:
        async with self._sessions() as session:
            row = await session.scalar(
                select(UserRow).where(func.lower(UserRow.email) == func.lower(request.email))
            )
            if row is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
            return pb.LookupUserResponse(user=_message(row))

    async def ListUsers(self, request: pb.ListUsersRequest, context: Any) -> pb.ListUsersResponse:
        if request.filter or request.order_by or request.show_deleted:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline: no filter or order")
        size = page_size_of(request.page_size)
        stmt = select(UserRow).where(UserRow.delete_time.is_(None))
        async with self._sessions() as session:
            if request.page_token:
                try:
                    token = decode_page_token(request.page_token)
                except ValueError:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
                total = token.total_size
                stmt = stmt.where(
                    tuple_(UserRow.create_time, UserRow.id) > tuple_(token.create_time, token.id)
                )
            else:
                total = await session.scalar(
                    select(func.count()).select_from(UserRow).where(UserRow.delete_time.is_(None))
                )
            rows = (
                await session.scalars(
                    stmt.order_by(UserRow.create_time, UserRow.id).limit(size + 1)
                )
            ).all()
            next_token = ""
            if len(rows) > size:
                last = rows[size - 1]
                next_token = encode_page_token(PageToken(last.create_time, last.id, total or 0))
            return pb.ListUsersResponse(
                users=[_message(row) for row in rows[:size]],
                next_page_token=next_token,
                total_size=total or 0,
            )

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Any
    ) -> pb.UpdateUserResponse:
        if set(request.update_mask.paths) != UPDATABLE_PATHS:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "baseline: display_name only")
        user_id = parse_id(request.user.id)
        if user_id is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "id is not a UUID")
        async with self._sessions() as session:
            row = await session.get(UserRow, user_id)
            if row is None or row.delete_time is not None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
            row.display_name = request.user.display_name
            row.version = row.version + 1
            row.update_time = func.now()
            await session.commit()
            await session.refresh(row)
            return pb.UpdateUserResponse(user=_message(row))


def main() -> None:
    args = arguments(__doc__ or "")

    async def setup(server: grpc.aio.Server) -> Callable[[], Awaitable[None]]:
        kept = args.pool_size // 2
        engine = create_async_engine(
            args.database_url,
            pool_size=kept,
            max_overflow=args.pool_size - kept,
            pool_pre_ping=True,
        )
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        user_service_pb2_grpc.add_UserServiceServicer_to_server(NaiveUserService(sessions), server)
        return engine.dispose

    serve(args.listen, setup, use_uvloop=not args.no_uvloop)


if __name__ == "__main__":
    main()
