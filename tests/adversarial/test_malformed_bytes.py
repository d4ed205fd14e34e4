"""Request bodies that are not valid protobuf, sent as raw bytes to every
method: a body the service cannot decode is INVALID_ARGUMENT with a usersvc
ErrorInfo (never grpc's UNKNOWN "Unexpected DecodeError"), a body that
happens to decode gets an ordinary answer, and the server stays up.

Whether a body decodes is decided by parsing it here with the same protobuf
runtime the server uses, so the oracle is exact.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from .rpcs import RPCS, Outcome, Rpc, call_raw, well_formed_problems
from .support import (
    Bridge,
    Cast,
    assert_consistent,
    assert_serving,
    count,
    fuzz_settings,
    run_property,
)

_F = FieldDescriptor
WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_SGROUP, WIRE_EGROUP, WIRE_I32 = 0, 1, 2, 3, 4, 5
_WIRE_OF_TYPE = {
    _F.TYPE_STRING: WIRE_LEN,
    _F.TYPE_BYTES: WIRE_LEN,
    _F.TYPE_MESSAGE: WIRE_LEN,
    _F.TYPE_DOUBLE: WIRE_I64,
    _F.TYPE_FIXED64: WIRE_I64,
    _F.TYPE_SFIXED64: WIRE_I64,
    _F.TYPE_FLOAT: WIRE_I32,
    _F.TYPE_FIXED32: WIRE_I32,
    _F.TYPE_SFIXED32: WIRE_I32,
}
INVALID_UTF8 = (
    b"\xff",
    b"\xc3\x28",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"a\xe2\x82",
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, WIRE_LEN) + varint(len(payload)) + payload


def sample_body(rpc: Rpc) -> bytes:
    """A valid request with every field set, to cut short."""
    message = rpc.request_class()()
    for fd in message.DESCRIPTOR.fields:
        if fd.type == _F.TYPE_STRING:
            value = "x" * 20
            if fd.is_repeated:
                getattr(message, fd.name).extend([value, value])
            else:
                setattr(message, fd.name, value)
        elif fd.type == _F.TYPE_MESSAGE and not fd.is_repeated:
            getattr(message, fd.name).SetInParent()
        elif fd.type in (_F.TYPE_INT32, _F.TYPE_INT64) and not fd.is_repeated:
            setattr(message, fd.name, 300)
        elif fd.type == _F.TYPE_BOOL and not fd.is_repeated:
            setattr(message, fd.name, True)
    return message.SerializeToString()


def malformed_bodies(rpc: Rpc) -> dict[str, bytes]:
    """Hand-made bad bodies for ``rpc``: for every field, the wrong wire
    type, a length far beyond the body, invalid UTF-8; and for the message
    as a whole, truncations, broken varints and tags, unbalanced and deeply
    nested groups."""
    bodies: dict[str, bytes] = {
        "a lone continuation byte": b"\x80",
        "an 11-byte varint": tag(1, WIRE_VARINT) + b"\xff" * 10 + b"\x01",
        "field number zero": b"\x00\x01",
        "wire type 6": tag(1, 6) + b"\x00",
        "wire type 7": tag(1, 7) + b"\x00",
        "an end-group without a start": tag(9, WIRE_EGROUP),
        "a start-group without an end": tag(9, WIRE_SGROUP) + b"\x08\x01",
        "groups nested 10000 deep": tag(99, WIRE_SGROUP) * 10_000 + tag(99, WIRE_EGROUP) * 10_000,
        "a length of 2**31 on an unknown field": tag(99, WIRE_LEN) + varint(2**31) + b"x",
        "a length of 2**64-1 on an unknown field": tag(99, WIRE_LEN) + varint(2**64 - 1),
        "a truncated fixed64": tag(99, WIRE_I64) + b"\x01\x02",
        "random-looking bytes": bytes(range(256)),
    }
    valid = sample_body(rpc)
    for cut in sorted({1, 2, 3, len(valid) // 2, len(valid) - 1}):
        if 0 < cut < len(valid):
            bodies[f"the valid body cut to {cut} bytes"] = valid[:cut]
    for fd in rpc.input.fields:
        number = fd.number
        right = _WIRE_OF_TYPE.get(fd.type, WIRE_VARINT)
        for wrong in (WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32):
            if wrong != right:
                payload = {
                    WIRE_VARINT: varint(1),
                    WIRE_I64: b"\x00" * 8,
                    WIRE_LEN: varint(1) + b"x",
                    WIRE_I32: b"\x00" * 4,
                }[wrong]
                bodies[f"{fd.name} with wire type {wrong}"] = tag(number, wrong) + payload
        for huge in (2**31 - 1, 2**32, 2**63):
            bodies[f"{fd.name} claiming {huge} bytes"] = tag(number, WIRE_LEN) + varint(huge) + b"x"
        if fd.type == _F.TYPE_STRING:
            for index, bad in enumerate(INVALID_UTF8):
                bodies[f"{fd.name} with invalid UTF-8 #{index}"] = length_delimited(number, bad)
        if fd.type == _F.TYPE_MESSAGE:
            inner_string = next(
                (f for f in fd.message_type.fields if f.type == _F.TYPE_STRING), None
            )
            if inner_string is not None:
                inner = length_delimited(inner_string.number, b"\xc3\x28")
                bodies[f"{fd.name}.{inner_string.name} with invalid UTF-8"] = length_delimited(
                    number, inner
                )
            bodies[f"{fd.name} holding a truncated message"] = length_delimited(
                number, b"\x0a\x05ab"
            )
            bodies[f"{fd.name} nested 200 deep"] = _nested(number, 200)
    return bodies


def _nested(number: int, depth: int) -> bytes:
    body = b""
    for _ in range(depth):
        body = length_delimited(number, body)
    return body


def decodes(rpc: Rpc, body: bytes) -> bool:
    try:
        rpc.request_class().FromString(body)
    except DecodeError:
        return False
    return True


def judge(rpc: Rpc, body: bytes, outcome: Outcome) -> list[str]:
    problems = well_formed_problems(outcome)
    refused_before_reading = rpc.client_streaming and outcome.code in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    if (
        not decodes(rpc, body)
        and not refused_before_reading
        and (
            outcome.code is not grpc.StatusCode.INVALID_ARGUMENT
            or outcome.reason != "INVALID_ARGUMENT"
        )
    ):
        problems.append(f"undecodable body answered with {outcome.describe()}")
    return problems


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_hand_made_malformed_bodies_are_invalid_argument(rpc: Rpc, cast: Cast) -> None:
    bodies = malformed_bodies(rpc)
    problems: dict[str, list[str]] = {}
    for caller in ("anonymous", "admin"):
        for name, body in bodies.items():
            outcome = await call_raw(cast.channel, rpc, body, metadata=cast.metadata(caller))
            count("malformed bodies", outcome)
            found = judge(rpc, body, outcome)
            if found:
                problems[f"{caller}: {name}"] = found
            await cast.after(outcome)

    assert not problems, problems
    await assert_serving(cast.channel)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_random_and_mutated_bodies_never_get_internal_or_unknown(
    rpc: Rpc, cast: Cast, engine: AsyncEngine
) -> None:
    valid = sample_body(rpc)
    mutated = st.builds(
        _mutate,
        st.just(valid),
        st.lists(
            st.tuples(st.integers(0, max(0, len(valid) - 1)), st.integers(0, 255)), max_size=4
        ),
    )
    bodies = st.one_of(st.binary(max_size=200), mutated)

    def prop(bridge: Bridge) -> None:
        @fuzz_settings(max_examples=25)
        @given(body=bodies, caller=st.sampled_from(("anonymous", "admin")))
        def answered(body: bytes, caller: str) -> None:
            outcome = bridge.run(call_raw(cast.channel, rpc, body, metadata=cast.metadata(caller)))
            count("random bodies", outcome)
            problems = judge(rpc, body, outcome)
            assert not problems, problems
            bridge.run(cast.after(outcome))

        answered()

    await run_property(prop)

    await assert_serving(cast.channel)
    await assert_consistent(engine)


def _mutate(body: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(body)
    for position, value in edits:
        if position < len(data):
            data[position] = value
    return bytes(data)


async def test_a_body_over_the_message_limit_is_refused_and_the_server_stays_up(
    cast: Cast,
) -> None:
    rpc = next(r for r in RPCS if r.name == "CreateUser")
    body = length_delimited(3, b"x" * (cast.server.max_message_bytes + 1))

    outcome = await call_raw(cast.channel, rpc, body)

    assert outcome.code is grpc.StatusCode.RESOURCE_EXHAUSTED, outcome.describe()
    await assert_serving(cast.channel)
