"""Measurements, ratios and targets: the arithmetic of the report, kept
apart from the processes that produce the numbers.

Every ratio is computed per round (both sides measured in the same round,
moments apart) and the reported value is the median of those per-round
ratios: this machine's speed drifts by a third between neighbouring runs,
which a ratio of two medians taken at different times would absorb.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us")
# Metrics a verdict may use besides METRICS.
_OTHER_METRICS = ("background_rps",)
T = TypeVar("T")


@dataclass(frozen=True)
class Measurement:
    """One system under one load for one round. ``rps`` is calls per second
    for h2load runs and units (users) per second for the Python drivers."""

    rps: float
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    # The server's CPU time (its process and children, user + system) per
    # call in the loaded window, in microseconds: its CPU rate over rps.
    cpu_us: float = math.nan
    requests: int = 0
    clean: bool = True
    problems: tuple[str, ...] = ()
    # gRPC status codes from usersvc's access log, "method code" -> count.
    codes: Mapping[str, int] = field(default_factory=dict)
    # What ran beside it (the Login flood): its calls per second.
    background_rps: float | None = None
    loadavg_1m: float = math.nan

    def metric(self, name: str) -> float:
        """A metric by name; NaN when this run has none. Raises KeyError
        for an unknown name."""
        if name not in METRICS and name not in _OTHER_METRICS:
            raise KeyError(name)
        value = getattr(self, name)
        return math.nan if value is None else float(value)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["codes"] = dict(self.codes)
        data["problems"] = list(self.problems)
        return {key: _json_number(value) for key, value in data.items()}


def _json_number(value: Any) -> Any:
    # JSON has no NaN: absent latencies (the Python drivers) become null.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass(frozen=True)
class Target:
    op: str  # ">=" or "<="
    value: float

    def met(self, measured: float) -> bool:
        if math.isnan(measured):
            return False
        return measured >= self.value if self.op == ">=" else measured <= self.value

    def text(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass(frozen=True)
class RatioSpec:
    """numerator / denominator, each (run key, metric)."""

    label: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    target: Target | None = None


@dataclass(frozen=True)
class AbsoluteSpec:
    """A run's metric against a fixed target (ImportUsers users/s)."""

    label: str
    run: str
    metric: str
    target: Target | None = None
    unit: str = ""


@dataclass(frozen=True)
class Verdict:
    label: str
    per_round: tuple[float, ...]
    value: float
    target: Target | None
    unit: str = ""

    @property
    def status(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.met(self.value) else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "per_round": [_json_number(v) for v in self.per_round],
            "median": _json_number(self.value),
            "target": None if self.target is None else self.target.text(),
            "status": self.status or None,
            "unit": self.unit,
        }


def rotated(items: Sequence[T], round_index: int) -> list[T]:
    """``items`` starting at position ``round_index`` (mod len), wrapping:
    round after round every run takes every place in the order, so none
    always goes first or always follows the heaviest one."""
    if not items:
        return []
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def median(values: Sequence[float]) -> float:
    """The median of the values that are numbers; NaN when none is."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def _divide(numerator: float, denominator: float) -> float:
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def ratio_verdict(spec: RatioSpec, rounds: Sequence[Mapping[str, Measurement]]) -> Verdict:
    """The median over rounds of the per-round ratio. Rounds missing either
    side are skipped."""
    per_round: list[float] = []
    for measurements in rounds:
        top_key, top_metric = spec.numerator
        bottom_key, bottom_metric = spec.denominator
        if top_key in measurements and bottom_key in measurements:
            per_round.append(
                _divide(
                    measurements[top_key].metric(top_metric),
                    measurements[bottom_key].metric(bottom_metric),
                )
            )
    return Verdict(spec.label, tuple(per_round), median(per_round), spec.target)


def absolute_verdict(spec: AbsoluteSpec, rounds: Sequence[Mapping[str, Measurement]]) -> Verdict:
    per_round = [m[spec.run].metric(spec.metric) for m in rounds if spec.run in m]
    return Verdict(spec.label, tuple(per_round), median(per_round), spec.target, spec.unit)


def cpu_per_call_us(cpu_seconds: float, wall_seconds: float, rps: float) -> float:
    """Microseconds of server CPU per call: the CPU rate over the window
    divided by the calls per second; NaN without calls or time."""
    if wall_seconds <= 0 or rps <= 0 or math.isnan(rps):
        return math.nan
    return cpu_seconds / wall_seconds / rps * 1e6


def summary(rounds: Sequence[Mapping[str, Measurement]], key: str) -> dict[str, float]:
    """Median of each metric of one run over the rounds."""
    return {name: median([m[key].metric(name) for m in rounds if key in m]) for name in METRICS}
