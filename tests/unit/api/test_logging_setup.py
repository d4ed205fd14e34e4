"""Log lines: JSON by default, text for people, the request id on each."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from usersvc_protos.v1 import user_service_pb2
from usersvc.logging_setup import configure_logging
from usersvc.observability.context import set_request_id

from .support import RunningServer, bearer


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A stream configure_logging may write to; the root logger is restored
    afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield io.StringIO()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_and_message(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("usersvc.test").info("hello %s", "world")
    [line] = _lines(stream)
    assert {k: line[k] for k in ("level", "logger", "msg")} == {
        "level": "INFO",
        "logger": "usersvc.test",
        "msg": "hello world",
    }


def test_json_lines_carry_an_utc_timestamp(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("usersvc.test").info("x")
    [line] = _lines(stream)
    assert str(line["ts"]).endswith("+00:00")


def test_json_lines_carry_extra_fields_at_the_top_level(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("usersvc.test").info("x", extra={"method": "/a.B/C", "duration_ms": 1.5})
    [line] = _lines(stream)
    assert (line["method"], line["duration_ms"]) == ("/a.B/C", 1.5)


def test_json_lines_carry_the_request_id_of_the_context(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    token = set_request_id("rid-7")
    try:
        logging.getLogger("usersvc.test").info("x")
    finally:
        token.var.reset(token)
    [line] = _lines(stream)
    assert line["request_id"] == "rid-7"


def test_json_lines_carry_the_traceback_of_a_logged_exception(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    try:
        raise ValueError("kaput")
    except ValueError:
        logging.getLogger("usersvc.test").exception("failed")
    [line] = _lines(stream)
    assert "ValueError: kaput" in str(line["exc"])


def test_records_below_the_level_are_dropped(stream: io.StringIO) -> None:
    configure_logging("json", "WARNING", stream=stream)
    logging.getLogger("usersvc.test").info("quiet")
    assert stream.getvalue() == ""


def test_text_lines_show_the_request_id_message_and_fields(stream: io.StringIO) -> None:
    configure_logging("text", "INFO", stream=stream)
    token = set_request_id("rid-8")
    try:
        logging.getLogger("usersvc.test").info("hello", extra={"code": "OK"})
    finally:
        token.var.reset(token)
    assert stream.getvalue().rstrip().endswith("INFO usersvc.test [rid-8] hello code=OK")


def test_configuring_twice_leaves_one_handler(stream: io.StringIO) -> None:
    configure_logging("json", "INFO", stream=stream)
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("usersvc.test").info("once")
    assert len(_lines(stream)) == 1


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml", "INFO")


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "LOUD")


async def test_every_line_of_a_call_carries_its_request_id(
    served: RunningServer, stream: io.StringIO
) -> None:
    configure_logging("json", "INFO", stream=stream)
    await served.user_stub.GetUser(
        user_service_pb2.GetUserRequest(id="me"), metadata=(*bearer(), ("x-request-id", "call-9"))
    )
    # The server (same event loop) writes the access line just after the
    # status went out: let it run until the line is there.
    for _ in range(1000):
        lines = _lines(stream)
        if any(line["logger"] == "usersvc.access" for line in lines):
            break
        await asyncio.sleep(0)
    # asyncio may report an unrelated task of an earlier test being garbage
    # collected at any moment; only this call's own lines matter here.
    lines = [line for line in lines if line["logger"] != "asyncio"]
    assert [(line["logger"], line["request_id"]) for line in lines] == [
        ("tests.fake_user_service", "call-9"),
        ("usersvc.access", "call-9"),
    ]


HASH = "$2b$04$" + "abcdefghijklmnopqrstuv" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ01234"
JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLWJ5dGVz"
REFRESH = "rt_" + "A" * 43
DRIVER_ERROR = (
    'new row for relation "users" violates check constraint "ck_users_email"\n'
    f"DETAIL:  Failing row contains (0190, x@example.com, {HASH}, Ada, {{user}})."
)


def _raise_and_log(message: str) -> None:
    try:
        raise RuntimeError(DRIVER_ERROR)
    except RuntimeError:
        logging.getLogger("usersvc.test").exception(message)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_tracebacks_lose_hashes_and_failing_rows(stream: io.StringIO, fmt: str) -> None:
    configure_logging(fmt, "INFO", stream=stream)
    _raise_and_log("unexpected error")
    out = stream.getvalue()
    assert ("ck_users_email" in out, HASH in out, "x@example.com" in out) == (True, False, False)
    assert "Failing row contains ([redacted])" in out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_warnings_lose_tokens_in_the_message_and_extra_fields(
    stream: io.StringIO, fmt: str
) -> None:
    configure_logging(fmt, "INFO", stream=stream)
    logging.getLogger("usersvc.test").warning(
        "refused %s", f"Bearer {JWT}", extra={"presented": REFRESH}
    )
    out = stream.getvalue()
    assert (JWT in out, REFRESH in out, "refused Bearer [redacted]" in out) == (False, False, True)
    assert "[redacted refresh token]" in out


def test_info_lines_are_left_as_they_are(stream: io.StringIO) -> None:
    # The access log is INFO and built from chosen fields: no search there.
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("usersvc.test").info("a bcrypt-shaped method name %s", HASH)
    [line] = _lines(stream)
    assert line["msg"] == f"a bcrypt-shaped method name {HASH}"
