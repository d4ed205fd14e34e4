"""py-spy on a server under load: where its CPU goes, per function.

``python -m bench --profile`` runs each usersvc run once more after the
measured rounds (not counted) with py-spy sampling the server, and reports
the functions that hold the most samples: on their own (self) and with
what they call (inclusive, usersvc's own functions only). Only samples of
a thread holding the GIL count, so the shares are of the Python-level work
(grpc's core and the kernel working without the GIL are not in them). py-spy is pinned
in the ``bench`` extra; it reads the process from outside (ptrace), so the
harness needs the right to trace its own children (root, or
kernel.yama.ptrace_scope 0).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SAMPLES_PER_SECOND = 100
# A frame of py-spy's raw (collapsed) format: "function (file)" or
# "function (file:line)".
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]*)(?::\d+)?\)$")
OWN_CODE = "usersvc/"
# Under every sample of the server: they say nothing about the calls.
_ENTRY_POINTS = ("(usersvc/__main__.py)", "(usersvc/cli.py)", "(usersvc/supervisor.py)")


class ProfileError(RuntimeError):
    """py-spy is missing, failed, or wrote nothing readable."""


@dataclass(frozen=True)
class Profile:
    """Sample counts by function ("function (file)") of one run."""

    samples: int
    self_samples: Counter[str]
    inclusive_samples: Counter[str]

    def top_self(self, count: int) -> list[tuple[str, float]]:
        """The functions holding most samples themselves, with their share."""
        return [(name, n / self.samples) for name, n in self.self_samples.most_common(count)]

    def top_own_inclusive(self, count: int) -> list[tuple[str, float]]:
        """usersvc's functions by the share of samples they are on the stack of."""
        own = Counter(
            {
                name: n
                for name, n in self.inclusive_samples.items()
                if OWN_CODE in name and not any(entry in name for entry in _ENTRY_POINTS)
            }
        )
        return [(name, n / self.samples) for name, n in own.most_common(count)]

    def as_json(self, count: int = 15) -> dict[str, object]:
        return {
            "samples": self.samples,
            "top_self": [[name, round(share, 4)] for name, share in self.top_self(count)],
            "top_usersvc_inclusive": [
                [name, round(share, 4)] for name, share in self.top_own_inclusive(count)
            ],
        }


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['function']} ({match['file']})"


def parse_raw(text: str) -> Profile:
    """Read py-spy's raw format: one line per distinct stack, frames from
    the outermost, separated by ";", then a space and the sample count.
    Raises ProfileError for a line without a count."""
    self_samples: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            raise ProfileError(f"py-spy raw line {number}: no sample count: {line[:200]!r}")
        count = int(count_text)
        # With --subprocesses each stack starts with a "process N:..." frame.
        frames = [
            _frame_name(frame)
            for frame in stack.split(";")
            if frame.strip() and not frame.startswith("process ")
        ]
        if not frames:
            continue
        total += count
        self_samples[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return Profile(total, self_samples, inclusive)


def py_spy() -> str:
    """The py-spy executable: beside this Python, else on PATH. Raises
    ProfileError when there is none."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfileError("py-spy not found: install the bench extra (make bench does)")
    return found


def start(pid: int, seconds: float, output: Path) -> subprocess.Popen[str]:
    """Sample ``pid`` (and its children) for ``seconds`` into ``output``
    (raw format). Raises ProfileError without py-spy, OSError."""
    output.unlink(missing_ok=True)
    return subprocess.Popen(
        [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(SAMPLES_PER_SECOND),
            # Only threads holding the GIL: a thread parked on a queue or in
            # epoll would otherwise count as busy in the frame it waits in.
            "--gil",
            "--format",
            "raw",
            "--nolineno",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], output: Path, *, timeout: float) -> Profile:
    """Wait for a started py-spy and read its samples. Raises ProfileError
    when it failed or wrote nothing."""
    printed, _ = process.communicate(timeout=timeout)
    if process.returncode != 0 or not output.exists():
        raise ProfileError(f"py-spy exited with {process.returncode}: {printed[-1000:]}")
    return parse_raw(output.read_text(errors="replace"))
