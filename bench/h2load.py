"""h2load as a gRPC load generator: request bodies, the command line, and
reading its results.

gRPC over HTTP/2 is a POST whose body is a sequence of length-prefixed
messages (one byte "compressed" flag, a four-byte big-endian length, the
serialized message), so h2load can replay one unary call with ``-d``. It
counts HTTP statuses only: a gRPC error is still HTTP 200 with grpc-status in
the trailers, which is why the harness checks every answer with a real gRPC
client before it measures (bench/checks.py).

Standard library only, so the unit suite can import it cheaply.
"""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
_PREFIX = struct.Struct(">BI")
MAX_MESSAGE_BYTES = 2**32 - 1


class H2loadError(RuntimeError):
    """h2load failed, or its output is not what this module understands."""


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message. Raises ValueError for a
    message longer than a four-byte length can say."""
    if len(message) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(message)} bytes does not fit a gRPC frame")
    return _PREFIX.pack(0, len(message)) + message


def grpc_unframe(body: bytes) -> list[bytes]:
    """The messages of a gRPC body (the inverse of ``grpc_frame`` applied to
    each). Raises ValueError for a truncated body or a compressed message."""
    messages: list[bytes] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < _PREFIX.size:
            raise ValueError("truncated gRPC message prefix")
        compressed, length = _PREFIX.unpack_from(body, offset)
        if compressed:
            raise ValueError("compressed gRPC messages are not supported")
        offset += _PREFIX.size
        if len(body) - offset < length:
            raise ValueError("truncated gRPC message")
        messages.append(body[offset : offset + length])
        offset += length
    return messages


@dataclass(frozen=True)
class LoadShape:
    """How h2load loads a server: ``clients`` connections with up to
    ``streams`` calls in flight on each, for ``seconds`` after a warm-up;
    ``rps_per_client`` turns the closed loop into a fixed rate."""

    clients: int
    streams: int
    seconds: float
    warmup_seconds: float = 1.0
    rps_per_client: float | None = None

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams

    def describe(self) -> str:
        text = f"-c {self.clients} -m {self.streams} (up to {self.in_flight} calls in flight)"
        if self.rps_per_client is not None:
            total = self.rps_per_client * self.clients
            text += f", --rps {self.rps_per_client:g} per client ({total:g}/s)"
        return text


def command(
    url: str,
    body_file: Path | None,
    shape: LoadShape,
    *,
    log_file: Path,
    headers: Sequence[str] = (),
    h1: bool = False,
    h2load: str = "h2load",
) -> list[str]:
    """The h2load command line for one measured run of a unary gRPC call at
    ``url`` (http://host:port/package.Service/Method) whose framed request
    is ``body_file``; with no body file, a plain GET of ``url`` (the HTTP
    comparison). ``h1`` speaks HTTP/1.1 instead of HTTP/2. Raises nothing."""
    args = [
        h2load,
        "--threads=1",
        f"--clients={shape.clients}",
        f"--max-concurrent-streams={shape.streams}",
        f"--duration={_seconds(shape.seconds)}",
        f"--warm-up-time={_seconds(shape.warmup_seconds)}",
        f"--log-file={log_file}",
    ]
    if body_file is not None:
        args.append(f"--data={body_file}")
    if h1:
        args.append("--h1")
    if shape.rps_per_client is not None:
        args.append(f"--rps={shape.rps_per_client:g}")
    protocol_headers = GRPC_HEADERS if body_file is not None else ()
    for header in (*protocol_headers, *headers):
        args.append(f"--header={header}")
    args.append(url)
    return args


def _seconds(value: float) -> str:
    # h2load takes a unit suffix; milliseconds keep fractional settings exact.
    return f"{round(value * 1000)}ms"


@dataclass(frozen=True)
class Summary:
    """What h2load printed about a run."""

    seconds: float
    requests_per_second: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    status_other: int

    @property
    def no_errors(self) -> bool:
        """Nothing failed, errored or timed out, and no HTTP status but 2xx
        (a load beside the measured one may finish no call at all when each
        takes longer than the run: the Login flood on a busy machine)."""
        return (
            self.failed == 0 and self.errored == 0 and self.timeout == 0 and self.status_other == 0
        )

    @property
    def clean(self) -> bool:
        """Requests finished, none failed, errored or timed out, no HTTP
        status but 2xx (gRPC statuses are checked elsewhere). The status
        counts are not taken over exactly the measured window (they can
        differ from ``done`` by the calls in flight at its edges), so they
        are not compared with it."""
        return self.no_errors and self.done > 0 and self.succeeded == self.done


_FINISHED = re.compile(r"^finished in ([0-9.]+)(us|ms|s|m|h), ([0-9.]+) req/s", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
    r"(\d+) failed, (\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_summary(output: str) -> Summary:
    """Read the "finished in", "requests:" and "status codes:" lines of
    h2load's standard output. Raises H2loadError when one is missing."""
    finished = _FINISHED.search(output)
    requests = _REQUESTS.search(output)
    status = _STATUS.search(output)
    if finished is None or requests is None or status is None:
        raise H2loadError(f"unexpected h2load output:\n{output[-2000:]}")
    counts = [int(value) for value in requests.groups()]
    return Summary(
        seconds=float(finished.group(1)) * _UNITS[finished.group(2)],
        requests_per_second=float(finished.group(3)),
        total=counts[0],
        started=counts[1],
        done=counts[2],
        succeeded=counts[3],
        failed=counts[4],
        errored=counts[5],
        timeout=counts[6],
        status_2xx=int(status.group(1)),
        status_other=sum(int(value) for value in status.groups()[1:]),
    )


@dataclass(frozen=True)
class Latencies:
    """Per-request latencies from h2load's --log-file, in milliseconds."""

    samples_ms: list[float] = field(repr=False)
    non_2xx: int = 0

    @property
    def count(self) -> int:
        return len(self.samples_ms)

    def percentile(self, fraction: float) -> float:
        """The nearest-rank percentile (0 < fraction <= 1); NaN without samples."""
        if not self.samples_ms:
            return math.nan
        ordered = sorted(self.samples_ms)
        rank = max(1, math.ceil(fraction * len(ordered)))
        return ordered[rank - 1]


def parse_log(text: str, *, since_us: int = 0) -> Latencies:
    """Latencies of the requests in h2load's log (tab-separated: start time
    in microseconds since the epoch, HTTP status, microseconds to the end of
    the response) that started at or after ``since_us``. Raises
    H2loadError for a malformed line."""
    samples: list[float] = []
    non_2xx = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise H2loadError(f"log line {number}: expected 3 columns, got {line!r}")
        try:
            start_us, status, duration_us = (int(part) for part in parts)
        except ValueError:
            raise H2loadError(f"log line {number}: not numbers: {line!r}") from None
        if start_us < since_us:
            continue
        if not 200 <= status < 300:
            non_2xx += 1
        samples.append(duration_us / 1000.0)
    return Latencies(samples, non_2xx)


@dataclass(frozen=True)
class RunResult:
    summary: Summary
    latencies: Latencies

    @property
    def p50_ms(self) -> float:
        return self.latencies.percentile(0.50)

    @property
    def p99_ms(self) -> float:
        return self.latencies.percentile(0.99)


def find_h2load() -> str | None:
    """The h2load executable on PATH, or None."""
    return shutil.which("h2load")


def start(args: Sequence[str], log_file: Path) -> subprocess.Popen[str]:
    """Start h2load; pair with ``finish``. ``log_file`` (the --log-file of
    ``args``) is removed first: h2load appends to it, and the percentiles
    must come from this run alone. Raises OSError when h2load cannot run."""
    log_file.unlink(missing_ok=True)
    return subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen[str], log_file: Path, *, timeout: float) -> RunResult:
    """Wait for a started h2load and read its results. Raises H2loadError
    when it exits non-zero or prints something unexpected;
    subprocess.TimeoutExpired after ``timeout`` seconds."""
    output, _ = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise H2loadError(f"h2load exited with {process.returncode}:\n{output[-2000:]}")
    summary = parse_summary(output)
    return RunResult(summary, parse_log(log_file.read_text()))
