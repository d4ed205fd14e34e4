"""What both baselines share: the wire form of a user row, their page
tokens, and the command line that starts them.

The baselines answer the same RPCs with the same generated messages as
usersvc, over the same table, so that a client cannot tell them apart on a
successful call; they skip everything usersvc does besides (authentication,
authorization, rate limits, logging, error details, validation beyond what
the query needs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from usersvc_protos.v1 import user_pb2

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
UPDATABLE_PATHS = frozenset({"display_name"})


def page_size_of(requested: int) -> int:
    """usersvc's rule: 0 means 50, above 1000 means 1000."""
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class PageToken:
    create_time: datetime
    id: uuid.UUID
    total_size: int


def encode_page_token(token: PageToken) -> str:
    """A keyset cursor (create_time, id) and the total of the first page.
    Raises nothing."""
    text = f"{token.create_time.isoformat()}|{token.id}|{token.total_size}"
    return base64.urlsafe_b64encode(text.encode()).decode()


def decode_page_token(text: str) -> PageToken:
    """Raises ValueError for anything ``encode_page_token`` did not make."""
    try:
        moment, row_id, total = base64.urlsafe_b64decode(text.encode()).decode().split("|")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError("malformed page token") from exc
    create_time = datetime.fromisoformat(moment)
    if create_time.tzinfo is None:
        raise ValueError("page token time without a zone")
    return PageToken(create_time, uuid.UUID(row_id), int(total))


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def user_message(
    *,
    id: uuid.UUID,
    email: str,
    display_name: str,
    roles: Sequence[str],
    labels: Mapping[str, str],
    create_time: datetime,
    update_time: datetime,
    disable_time: datetime | None,
    delete_time: datetime | None,
    version: int,
) -> user_pb2.User:
    """The User message usersvc would send for this row (same etag form).
    Raises ValueError for a naive timestamp."""
    if delete_time is not None:
        state = user_pb2.User.STATE_DELETED
    elif disable_time is not None:
        state = user_pb2.User.STATE_DISABLED
    else:
        state = user_pb2.User.STATE_ACTIVE
    message = user_pb2.User(
        id=str(id),
        email=email,
        display_name=display_name,
        roles=roles,
        state=state,
        labels=labels,
        create_time=_timestamp(create_time),
        update_time=_timestamp(update_time),
        etag=f"v{version}",
    )
    if delete_time is not None:
        message.delete_time.CopyFrom(_timestamp(delete_time))
    return message


def parse_id(text: str) -> uuid.UUID | None:
    """The UUID in ``text``, or None."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def arguments(description: str) -> argparse.Namespace:
    """--listen, --database-url, --pool-size, --no-uvloop."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--database-url", required=True, help="postgresql+asyncpg:// URL")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=20,
        help="connections at most (usersvc's default is 10 kept + 10 overflow)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="stay on asyncio's own loop")
    return parser.parse_args()


Setup = Callable[[grpc.aio.Server], Awaitable[Callable[[], Awaitable[None]]]]


def serve(listen: str, setup: Setup, *, use_uvloop: bool) -> None:
    """Run a grpc.aio server on ``listen`` until SIGTERM/SIGINT. ``setup``
    adds the servicer and returns what closes its resources. Raises
    RuntimeError when the port cannot be bound."""
    logging.basicConfig(level=logging.WARNING)
    if use_uvloop:
        # usersvc installs uvloop too: the comparison is about the code path.
        import uvloop

        uvloop.install()

    async def run() -> None:
        server = grpc.aio.server()
        close = await setup(server)
        if server.add_insecure_port(listen) == 0:
            raise RuntimeError(f"cannot listen on {listen}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.stop(1.0)
            await close()

    asyncio.run(run())
