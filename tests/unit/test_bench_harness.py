"""The benchmark harness's own arithmetic (bench, run by `make bench`,
never by the suite): how it frames gRPC requests for h2load, reads h2load's
output and per-request log, turns rounds into ratios and reads py-spy's
samples. No benchmark runs here."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from usersvc_protos.v1 import user_service_pb2
from bench.calls import total_size_problem
from bench.h2load import (
    H2loadError,
    LoadShape,
    command,
    grpc_frame,
    grpc_unframe,
    parse_log,
    parse_summary,
)
from bench.profile import ProfileError, parse_raw
from bench.results import Measurement, RatioSpec, Target, cpu_per_call_us, ratio_verdict, rotated

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 1s of warm-up time and 3s of main \
duration for measurements.
Application protocol: h2c

finished in 4.00s, 3511.67 req/s, 593.00KB/s
requests: 10535 total, 10535 started, 10535 done, 10535 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 10541 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.74MB (1821712) total, 39.57KB (40515) headers (space savings 96.27%), 1.46MB data
                     min         max         mean         sd        +/- sd
time for request:      896us     18.57ms      9.10ms       940us    94.15%
"""


def test_a_grpc_frame_is_a_zero_flag_a_big_endian_length_and_the_message() -> None:
    message = user_service_pb2.GetUserRequest(id="0196a3b2-0000-7000-8000-000000000001")
    serialized = message.SerializeToString()

    body = grpc_frame(serialized)

    assert body[0] == 0
    assert struct.unpack(">I", body[1:5])[0] == len(serialized)
    assert body[5:] == serialized
    assert user_service_pb2.GetUserRequest.FromString(grpc_unframe(body)[0]) == message


def test_an_empty_message_frames_to_five_zero_bytes() -> None:
    assert grpc_frame(b"") == b"\x00\x00\x00\x00\x00"


def test_unframing_a_truncated_body_is_refused() -> None:
    with pytest.raises(ValueError, match="truncated"):
        grpc_unframe(grpc_frame(b"abcdef")[:-1])


def test_the_summary_gives_requests_per_second_and_the_counts() -> None:
    summary = parse_summary(H2LOAD_OUTPUT)

    assert summary.requests_per_second == pytest.approx(3511.67)
    assert summary.seconds == pytest.approx(4.0)
    assert (summary.done, summary.succeeded, summary.failed, summary.errored) == (
        10535,
        10535,
        0,
        0,
    )
    assert summary.clean


def test_a_run_with_an_errored_request_is_not_clean() -> None:
    output = H2LOAD_OUTPUT.replace("0 failed, 0 errored", "0 failed, 1 errored")

    assert not parse_summary(output).clean


def test_a_run_with_a_non_2xx_status_is_not_clean() -> None:
    output = H2LOAD_OUTPUT.replace("0 4xx", "3 4xx")

    assert not parse_summary(output).clean


def test_a_run_that_finished_no_request_has_no_errors_but_is_not_clean() -> None:
    output = H2LOAD_OUTPUT.replace("10535 done, 10535 succeeded", "0 done, 0 succeeded")

    summary = parse_summary(output)

    assert summary.no_errors
    assert not summary.clean


def test_output_without_a_result_line_is_an_error() -> None:
    with pytest.raises(H2loadError):
        parse_summary("starting benchmark...\nconnect error\n")


def test_log_latencies_are_read_in_milliseconds_with_nearest_rank_percentiles() -> None:
    lines = [f"{1_000_000 + i}\t200\t{(i + 1) * 1000}" for i in range(100)]

    latencies = parse_log("\n".join(lines) + "\n")

    assert latencies.count == 100
    assert latencies.percentile(0.50) == 50.0
    assert latencies.percentile(0.99) == 99.0
    assert latencies.non_2xx == 0


def test_log_lines_before_the_window_are_left_out() -> None:
    latencies = parse_log("100\t200\t5000\n200\t200\t7000\n", since_us=150)

    assert latencies.samples_ms == [7.0]


def test_a_malformed_log_line_is_an_error() -> None:
    with pytest.raises(H2loadError, match="line 2"):
        parse_log("1\t200\t5\n1\t200\n")


def test_no_samples_give_no_percentile() -> None:
    assert math.isnan(parse_log("").percentile(0.99))


def test_the_command_carries_the_grpc_headers_the_body_and_the_rate() -> None:
    shape = LoadShape(clients=4, streams=8, seconds=5, warmup_seconds=1, rps_per_client=100)

    args = command(
        "http://127.0.0.1:1/usersvc.v1.UserService/GetUser",
        Path("work/get.body"),
        shape,
        log_file=Path("work/h2load.log"),
        headers=["authorization: Bearer t"],
    )

    assert "--header=content-type: application/grpc" in args
    assert "--header=te: trailers" in args
    assert "--header=authorization: Bearer t" in args
    assert "--data=work/get.body" in args
    assert {"--clients=4", "--max-concurrent-streams=8", "--duration=5000ms", "--rps=100"} <= set(
        args
    )
    assert args[-1] == "http://127.0.0.1:1/usersvc.v1.UserService/GetUser"


def test_an_http_1_1_get_has_no_body_and_no_grpc_headers() -> None:
    shape = LoadShape(clients=32, streams=1, seconds=5, warmup_seconds=1)

    args = command(
        "http://127.0.0.1:1/api/v1/users/x",
        None,
        shape,
        log_file=Path("work/h2load.log"),
        headers=["authorization: Bearer t"],
        h1=True,
    )

    assert "--h1" in args
    assert not [arg for arg in args if arg.startswith("--data")]
    assert "--header=content-type: application/grpc" not in args
    assert "--header=authorization: Bearer t" in args
    assert "--h1" not in command(
        "http://127.0.0.1:1/x", Path("b"), shape, log_file=Path("work/h2load.log")
    )


@pytest.mark.parametrize(
    ("reported", "actual", "allowed"),
    [
        (10_000, 10_000, True),
        (9_999, 10_000, False),
        (1_000_006, 1_000_006, True),
        (1_000_000, 1_000_006, True),
        (1_099_000, 1_000_006, True),
        (1_101_000, 1_000_006, False),
        (899_000, 1_000_006, False),
    ],
)
def test_a_first_page_total_is_exact_up_to_10000_and_within_10_percent_beyond(
    reported: int, actual: int, allowed: bool
) -> None:
    assert (total_size_problem(reported, actual) is None) is allowed


def test_a_ratio_is_the_median_of_the_per_round_ratios() -> None:
    rounds = [
        {"a": Measurement(rps=90.0), "b": Measurement(rps=100.0)},
        {"a": Measurement(rps=40.0), "b": Measurement(rps=100.0)},
        {"a": Measurement(rps=300.0), "b": Measurement(rps=200.0)},
    ]
    spec = RatioSpec("a / b", ("a", "rps"), ("b", "rps"), Target(">=", 0.85))

    verdict = ratio_verdict(spec, rounds)

    assert verdict.per_round == pytest.approx((0.9, 0.4, 1.5))
    assert verdict.value == pytest.approx(0.9)
    assert verdict.status == "PASS"


def test_each_round_starts_the_order_one_place_later() -> None:
    order = ["usersvc", "bare", "naive"]

    assert [rotated(order, index)[0] for index in range(4)] == [
        "usersvc",
        "bare",
        "naive",
        "usersvc",
    ]


def test_cpu_per_call_is_the_cpu_rate_over_the_call_rate() -> None:
    # Half a core for 2 s while serving 1,000 calls/s: 500 us per call.
    assert cpu_per_call_us(1.0, 2.0, 1000.0) == pytest.approx(500.0)
    assert math.isnan(cpu_per_call_us(1.0, 2.0, 0.0))
    assert math.isnan(cpu_per_call_us(1.0, 0.0, 1000.0))


def test_py_spy_raw_stacks_give_self_and_inclusive_shares() -> None:
    raw = (
        'process 7:"python -m usersvc serve";<module> (usersvc/cli.py);serve (usersvc/server.py);'
        "execute (asyncpg/connection.py) 6\n"
        "<module> (usersvc/cli.py);serve (usersvc/server.py) 2\n"
        "<module> (usersvc/cli.py);log (logging/__init__.py:10) 2\n"
    )

    found = parse_raw(raw)

    assert found.samples == 10
    assert found.top_self(1) == [("execute (asyncpg/connection.py)", 0.6)]
    # The entry point is under every sample and says nothing: left out.
    assert dict(found.top_own_inclusive(5)) == {"serve (usersvc/server.py)": 0.8}


def test_a_raw_line_without_a_count_is_an_error() -> None:
    with pytest.raises(ProfileError):
        parse_raw("<module> (usersvc/cli.py)\n")


def test_every_scenario_has_a_builder_and_the_default_run_includes_events_and_batch_writes() -> (
    None
):
    from bench.__main__ import parse_args
    from bench.scenarios import BUILDERS, SCENARIOS

    assert set(BUILDERS) == set(SCENARIOS)
    assert {"events", "batch-writes"} <= set(parse_args([]).scenarios)
    assert parse_args(["--scenarios", "events,batch-writes"]).scenarios == [
        "batch-writes",
        "events",
    ]


def test_an_unknown_scenario_is_refused() -> None:
    from bench.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "events,bench_batch_writes"])


def test_perf_samples_are_counted_by_process_and_postgres_function() -> None:
    from bench.perf_served import Tally, count_samples

    script = (
        "postgres  2240 \n"
        "\tffffffff82251fb9 _raw_spin_unlock_irqrestore\n"
        "\t          4803ef standard_ExecutorFinish\n"
        "\t          4803ef heap_insert\n"
        "\t          4803ef standard_ExecutorFinish\n"
        "\t          47dabf PostgresMain\n"
        "\n"
        "python 4242 \n"
        "\t          123456 _PyEval_EvalFrameDefault\n"
        "\n"
        "event_engine 4242 \n"
        "\t          123456 [unknown]\n"
        "\n"
        "swapper     0 \n"
        "\n"
        "python 77 \n"
        "\t          123456 _PyEval_EvalFrameDefault\n"
    )
    tally = Tally(calls=1000)
    count_samples(script, tally, {4242: "the server"})
    assert tally.by_process == {"PostgreSQL": 1, "the server": 2, "idle": 1, "python": 1}
    # Inclusive and once per sample, however often a function is on the stack.
    assert tally.postgres == {"standard_ExecutorFinish": 1, "heap_insert": 1}
    # A sample is 1/999 s of a CPU: 999 samples over 1,000 calls are 1 ms a call.
    assert tally.per_call(999) == pytest.approx(1000.0)
