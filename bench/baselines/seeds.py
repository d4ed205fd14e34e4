"""The seeds' design, what a team would pick instead of usersvc: FastAPI and
the SQLAlchemy ORM under uvicorn, JSON over HTTP/1.1, shaped like the
fastapi full-stack template's users API (a JWT bearer dependency that loads
the current user with ``session.get``, an AsyncSession per request, a
Pydantic response model).

    BENCH_SEEDS_SECRET=... python -m bench.baselines.seeds --listen 127.0.0.1:8061 \\
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/usersvc_bench

Serves ``GET /api/v1/users/{user_id}``: the caller itself (or anyone, for a
caller with role admin), like GetUser. Tokens are HS256 JWTs with the user
id in ``sub``, signed with BENCH_SEEDS_SECRET. Given its best chance: uvloop
and httptools, no access log, the async ORM on asyncpg (the template's is
synchronous, on a thread pool), the same pool size as the other baselines.
Needs the ``bench`` extra (fastapi, uvicorn, httptools).
"""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import jwt
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from usersvc.adapters.orm import UserRow

SECRET_ENV = "BENCH_SEEDS_SECRET"
USERS_PATH = "/api/v1/users/"


class UserPublic(BaseModel):
    id: uuid.UUID
    email: str
    display_name: str
    roles: list[str]
    state: str
    labels: dict[str, str]
    create_time: datetime
    update_time: datetime
    etag: str

    @classmethod
    def of(cls, row: UserRow) -> UserPublic:
        if row.delete_time is not None:
            state = "STATE_DELETED"
        elif row.disable_time is not None:
            state = "STATE_DISABLED"
        else:
            state = "STATE_ACTIVE"
        return cls(
            id=row.id,
            email=row.email,
            display_name=row.display_name,
            roles=row.roles,
            state=state,
            labels=row.labels,
            create_time=row.create_time,
            update_time=row.update_time,
            etag=f"v{row.version}",
        )


async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


reusable_oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/login/access-token")
SessionDep = Annotated[AsyncSession, Depends(get_db)]
TokenDep = Annotated[str, Depends(reusable_oauth2)]


async def get_current_user(request: Request, session: SessionDep, token: TokenDep) -> UserRow:
    try:
        payload = jwt.decode(token, request.app.state.secret, algorithms=["HS256"])
        user_id = uuid.UUID(str(payload["sub"]))
    except (jwt.InvalidTokenError, KeyError, ValueError):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN, detail="Could not validate credentials"
        ) from None
    user = await session.get(UserRow, user_id)
    if user is None or user.delete_time is not None:
        raise HTTPException(status_code=404, detail="User not found")
    if user.disable_time is not None:
        raise HTTPException(status_code=400, detail="Inactive user")
    return user


CurrentUser = Annotated[UserRow, Depends(get_current_user)]


async def read_user_by_id(
    user_id: uuid.UUID, session: SessionDep, current_user: CurrentUser
) -> UserPublic:
    if user_id == current_user.id:
        return UserPublic.of(current_user)
    if "admin" not in current_user.roles:
        raise HTTPException(status_code=403, detail="The user doesn't have enough privileges")
    user = await session.get(UserRow, user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="User not found")
    return UserPublic.of(user)


def create_app(*, database_url: str, secret: str, pool_size: int) -> FastAPI:
    """The application; its engine is made at start-up, not here."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        kept = pool_size // 2
        engine = create_async_engine(database_url, pool_size=kept, max_overflow=pool_size - kept)
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.secret = secret
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)
    app.get(USERS_PATH + "{user_id}", response_model=UserPublic)(read_user_by_id)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--database-url", required=True, help="postgresql+asyncpg:// URL")
    parser.add_argument("--pool-size", type=int, default=20, help="connections at most")
    args = parser.parse_args()
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 32:
        raise SystemExit(f"{SECRET_ENV} must hold at least 32 characters")
    host, _, port = args.listen.rpartition(":")
    app = create_app(database_url=args.database_url, secret=secret, pool_size=args.pool_size)
    config: dict[str, Any] = {
        "host": host,
        "port": int(port),
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "log_level": "warning",
    }
    uvicorn.run(app, **config)


if __name__ == "__main__":
    main()
