"""Log lines: JSON by default, text for people, the request id on each."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime

import pytest

from usersvc_protos.v1 import user_service_pb2
from usersvc.api.interceptors import AccessLogInterceptor
from usersvc.logging_setup import (
    JsonFormatter,
    JsonLinesHandler,
    add_static_fields,
    configure_logging,
)
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


# -- the access line's own way to the JSON handler ---------------------------------

ACCESS_KEYS = ("method", "code", "duration_ms", "peer", "principal")
AWKWARD = 'quote " back \\ tab \t nl \n nul \x00 ünï \u2028 😀 </script>'


def _json_handler(stream: io.StringIO, **static: object) -> JsonLinesHandler:
    configure_logging("json", "INFO", stream=stream)
    if static:
        add_static_fields(**static)
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h, JsonLinesHandler)]
    return handler


def _both_ways(
    handler: JsonLinesHandler, stream: io.StringIO, values: tuple[object, ...], request_id: str
) -> tuple[str, str]:
    """The line of ``values`` through a LogRecord, then through emit_fields."""
    logger = logging.getLogger("usersvc.access")
    message = f"{values[0]} {values[1]} {values[2]:.3f}ms"
    record = logger.makeRecord(
        logger.name,
        logging.INFO,
        "(test)",
        0,
        "%s %s %.3fms",
        values[:3],
        None,
        extra={**dict(zip(ACCESS_KEYS, values, strict=True)), "request_id": request_id},
    )
    handler.handle(record)
    assert handler.emit_fields(logger.name, logging.INFO, message, request_id, ACCESS_KEYS, values)
    # Lines end at "\n" only (str.splitlines would also split at U+2028).
    generic, direct, end = stream.getvalue().split("\n")
    assert end == ""
    return generic + "\n", direct + "\n"


def _without_ts(line: str) -> str:
    return line[line.index('","level":') :]


@pytest.mark.parametrize(
    ("values", "request_id"),
    [
        (("/usersvc.v1.UserService/GetUser", "OK", 0.123, "ipv4:127.0.0.1:5", "u-1"), "r-1"),
        (("/a.B/C", "NOT_FOUND", 0.0, "ipv6:%5B::1%5D:80", "anonymous"), ""),
        (("/a.B/C", "INTERNAL", 123456.789, AWKWARD, AWKWARD), AWKWARD),
        (("/a.B/C", "OK", 1e-05, "", "svc"), "x"),
    ],
)
def test_the_access_line_written_from_its_fields_is_the_records_line(
    stream: io.StringIO, values: tuple[object, ...], request_id: str
) -> None:
    handler = _json_handler(stream, worker=3, pid=77, method="shadowed", _hidden=1)

    generic, direct = _both_ways(handler, stream, values, request_id)

    assert _without_ts(direct) == _without_ts(generic)
    assert direct.endswith("}\n")
    assert json.loads(direct)["worker"] == 3
    assert re.fullmatch(r'\{"ts":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00', direct[:36])
    ts = [datetime.fromisoformat(json.loads(line)["ts"]) for line in (generic, direct)]
    assert abs((ts[1] - ts[0]).total_seconds()) < 5


def test_fields_of_other_types_are_left_to_a_record(stream: io.StringIO) -> None:
    handler = _json_handler(stream)

    declined = handler.emit_fields(
        "usersvc.access", logging.INFO, "m", "", ACCESS_KEYS, ("/a.B/C", "OK", None, "p", "x")
    )

    assert (declined, stream.getvalue()) == (False, "")


def test_a_handler_with_a_filter_it_does_not_know_leaves_the_line_to_a_record(
    stream: io.StringIO,
) -> None:
    handler = _json_handler(stream)
    values = ("/a.B/C", "OK", 0.5, "p", "x")
    assert handler.emit_fields("usersvc.access", logging.INFO, "m", "", ACCESS_KEYS, values)

    handler.addFilter(lambda record: True)
    handler.setFormatter(JsonFormatter())

    assert not handler.emit_fields("usersvc.access", logging.INFO, "m", "", ACCESS_KEYS, values)
    assert len(stream.getvalue().splitlines()) == 1


def test_the_access_interceptor_writes_its_line_without_a_record_when_it_can(
    stream: io.StringIO,
) -> None:
    # A logger of its own with one JsonLinesHandler: the interceptor's
    # record-free way; the same facts through a record filter see the other.
    logger = logging.getLogger("tests.access.direct")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = JsonLinesHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    records: list[logging.LogRecord] = []
    try:
        interceptor = AccessLogInterceptor(logger=logger)
        interceptor._log("/a.B/C", _Finished(), "ipv4:1.2.3.4:5", 0.0, None)
        handler.addFilter(lambda record: records.append(record) or True)
        interceptor._log("/a.B/C", _Finished(), "ipv4:1.2.3.4:5", 0.0, None)
    finally:
        logger.removeHandler(handler)
    direct, generic = stream.getvalue().splitlines()
    assert len(records) == 1  # only the second line was a record
    assert {**json.loads(direct), "ts": "", "duration_ms": 0, "msg": ""} == {
        **json.loads(generic),
        "ts": "",
        "duration_ms": 0,
        "msg": "",
    }
    assert list(json.loads(direct)) == list(json.loads(generic))


class _Finished:
    """The context of a call that ended OK."""

    def code(self) -> None:
        return None
