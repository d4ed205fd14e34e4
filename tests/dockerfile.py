"""Just enough of a Dockerfile parser for the tests that check what the
image does: instructions per stage, with continuation lines joined, and the
exec-form (JSON) arguments of ENTRYPOINT / CMD / HEALTHCHECK."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kind, args in self.instructions if kind == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs, in order (later ones win)."""
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV in the legacy 'key value' form: {args!r}"
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        """The JSON argument list of the last ``keyword`` (ENTRYPOINT, CMD)."""
        args = json.loads(self.last(keyword))
        assert isinstance(args, list)
        return [str(arg) for arg in args]

    def healthcheck(self) -> list[str]:
        """The exec-form command of HEALTHCHECK, without its options."""
        args = self.last("HEALTHCHECK")
        _, sep, command = args.partition("CMD ")
        assert sep, f"HEALTHCHECK without CMD: {args!r}"
        parsed = json.loads(command)
        assert isinstance(parsed, list)
        return [str(arg) for arg in parsed]

    def copied_sources(self) -> list[str]:
        """Sources of the stage's COPY instructions from the build context."""
        sources: list[str] = []
        for args in self.all("COPY"):
            words = [word for word in shlex.split(args) if not word.startswith("--")]
            if any(word.startswith("--from") for word in shlex.split(args)):
                continue
            sources += words[:-1]
        return sources


def parse(path: Path = DOCKERFILE) -> list[Stage]:
    """The stages of the Dockerfile, in order; a stage without ``AS`` is named
    by its position."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name))
        elif stages:
            stages[-1].instructions.append((keyword, " ".join(args.split())))
    return stages


def stage(name: str, path: Path = DOCKERFILE) -> Stage:
    for candidate in parse(path):
        if candidate.name == name:
            return candidate
    raise AssertionError(f"no stage {name} in {path}")
