"""Every call gets a request id: the caller's ``x-request-id`` when it is
safe to log, a fresh one otherwise. It is echoed in the response trailers
and stamped on every log line of the call.

Trailers, not headers: grpc.aio sends handler initial metadata as a write of
its own (its own batch and completion), which cost a GetUser about 0.15 ms
(docs/performance.md). Trailing metadata goes out with the status in one
batch. A status raised with ``context.abort`` replaces the trailers set
here, so ErrorMappingInterceptor adds them back to every status it sends.
"""

from __future__ import annotations

import os
import re
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
    return new_request_id()


def new_request_id() -> str:
    """A random (version 4) UUID as 32 hex digits: ``uuid.uuid4().hex``
    without building a UUID object, for every call that brings no id of its
    own. Never raises."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


def _begin(context: Context) -> None:
    request_id = request_id_from(context.invocation_metadata())
    set_request_id(request_id)
    # Set before the handler runs, so every status of the call carries it:
    # the handler's OK, grpc's own, and (re-added by ErrorMapping) aborts.
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))


class RequestIdInterceptor(WrappingInterceptor):
    """Sets the request id of each call (``usersvc.api.context``) and echoes
    it in the response trailers."""

    def wrap(self, handler: Handler, method: str) -> Handler:
        return wrap_with_prelude(handler, _begin)
