"""Every call gets a request id: the caller's ``x-request-id`` when it is
safe to log, a fresh one otherwise. It is sent back in the response headers
and stamped on every log line of the call."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any

from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    WrappingInterceptor,
    wrap_with_prelude,
)
from usersvc.observability.context import set_request_id

REQUEST_ID_KEY = "x-request-id"
# Short, and no characters that could forge log fields or lines.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_from(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The caller's request id if it is 1..128 of [A-Za-z0-9._:-], else a new
    uuid4 hex. Never raises."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex


async def _begin(context: Context) -> None:
    request_id = request_id_from(context.invocation_metadata())
    set_request_id(request_id)
    # Sent before the handler runs, so the caller sees the id on failures too.
    # Handlers therefore must not send initial metadata themselves.
    await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))


class RequestIdInterceptor(WrappingInterceptor):
    """Sets the request id of each call (``usersvc.api.context``) and echoes
    it in the initial response metadata."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        return wrap_with_prelude(handler, _begin)
