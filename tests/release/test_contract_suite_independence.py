"""tests/contract is for consumers: it may use the protos (over reflection)
and public packages, never the service's Python code. A static check of
every import in it, so a convenient `from usersvc...` cannot creep in."""

from __future__ import annotations

import ast
from pathlib import Path

CONTRACT_SUITE = Path(__file__).resolve().parents[1] / "contract"
FORBIDDEN = ("usersvc", "usersvc_protos", "usersvc_migrations", "generated", "tests")
DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def forbidden_imports(source: str, filename: str = "<source>") -> list[str]:
    """Imports of our own code in ``source``: usersvc, generated, the other
    test tiers (absolute, or relative ones that climb out of the folder), and
    importlib.import_module / __import__ with such a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 1:
                found.append(f"{filename}:{node.lineno}: relative import out of the suite")
                continue
            if node.level == 0 and node.module:
                names = [node.module]
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            called = (
                function.attr
                if isinstance(function, ast.Attribute)
                else getattr(function, "id", "")
            )
            first = node.args[0]
            if (
                called in DYNAMIC_IMPORTERS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                names = [first.value]
        found += [
            f"{filename}:{getattr(node, 'lineno', 0)}: {name}"
            for name in names
            if name.split(".")[0] in FORBIDDEN
        ]
    return found


def test_the_contract_suite_imports_nothing_from_the_service_or_generated_code() -> None:
    files = sorted(CONTRACT_SUITE.glob("**/*.py"))
    assert len(files) >= 5, files
    problems = [
        problem
        for path in files
        for problem in forbidden_imports(path.read_text(), str(path.relative_to(CONTRACT_SUITE)))
    ]
    assert problems == []


def test_the_check_catches_each_kind_of_forbidden_import() -> None:
    source = "\n".join(
        [
            "import usersvc",
            "from usersvc.config import Settings",
            "from usersvc_protos.v1 import user_pb2",
            "import tests.e2e.helpers",
            "from ..e2e import helpers",
            "import importlib; importlib.import_module('usersvc.api')",
            "__import__('usersvc_protos')",
        ]
    )
    assert len(forbidden_imports(source)) == 7


def test_the_check_lets_public_packages_and_the_suites_own_modules_through() -> None:
    source = "\n".join(
        [
            "import grpc",
            "from google.protobuf import descriptor_pool",
            "from .client import ReflectedApi",
            "from . import client",
            "command = ['usersvc', 'serve']",
        ]
    )
    assert forbidden_imports(source) == []
