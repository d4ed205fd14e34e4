"""The import contracts of pyproject.toml ([tool.importlinter], run by `make
lint`) bite: on a copy of the package, one import pointing outward fails
`lint-imports`, and the failure names the importing module, the imported one
and the line. The copy as committed passes, so the failure is the import's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "usersvc", tmp_path / "usersvc", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH first: the copy, not the editable install, is analysed.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def add_import(tree: Path, module: str, statement: str) -> int:
    """Append ``statement`` to ``module``'s file; returns its line number."""
    path = tree / (module.replace(".", "/") + ".py")
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, statement]) + "\n")
    return len(lines) + 1


def test_the_package_as_committed_keeps_every_contract(tree: Path) -> None:
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("usersvc.services.sessions", "usersvc.adapters.database", "Services import the domain"),
        ("usersvc.services.tokens", "usersvc.config", "Services import the domain"),
        ("usersvc.domain.models", "usersvc.services.inputs", "Layers point inward"),
        ("usersvc.adapters.revocations", "usersvc.services.sessions", "Adapters implement"),
        ("usersvc.observability.tracing", "usersvc.api.context", "Observability and logging"),
        ("usersvc.supervisor", "usersvc.server", "The supervisor of workers"),
    ],
)
def test_an_import_pointing_outward_fails_naming_the_import(
    tree: Path, importer: str, imported: str, contract: str
) -> None:
    line = add_import(tree, importer, f"import {imported}  # noqa: E402, F401")
    result = lint_imports(tree)
    assert result.returncode == 1, result.stdout
    assert f"{importer} -> {imported} (l.{line})" in result.stdout
    broken = result.stdout.split("Broken contracts", 1)[1]
    assert contract in broken
