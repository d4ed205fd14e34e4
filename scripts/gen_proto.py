"""Regenerate generated/ from protos/ (messages, gRPC stubs and .pyi types).

protoc run with ``-Iprotos`` writes ``usersvc/v1/*_pb2.py`` with
``from usersvc.v1 import ...``, which would resolve to our own ``usersvc``
package. We keep the descriptor file names clean (``usersvc/v1/user.proto``,
what reflection publishes), put the files in ``generated/usersvc_protos/v1/``
and rewrite the imports, and the module names the messages report, to
``usersvc_protos.v1``: the name the wheel installs them under (pyproject.toml
maps the directory), never a top-level ``generated``.

Usage: python scripts/gen_proto.py [--check]
  --check  regenerate into a temporary directory and fail if generated/ differs.
"""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "usersvc_protos"
PACKAGE_INITS = (f"generated/{PACKAGE}", f"generated/{PACKAGE}/v1")
_IMPORT = re.compile(r"^(from|import) usersvc\.v1\b", re.MULTILINE)
_QUALIFIED = re.compile(r"(?<![\w.])usersvc\.v1\.(\w+_pb2)")


def generate(out: Path) -> None:
    import grpc_tools

    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    gen_dir = out / "generated" / ".protoc"
    gen_dir.mkdir(parents=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={gen_dir}",
        f"--grpc_python_out={gen_dir}",
        f"--mypy_out={gen_dir}",
        f"--mypy_grpc_out={gen_dir}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTOS)  # noqa: S603
    package = out / "generated" / PACKAGE
    (gen_dir / "usersvc").rename(package)
    gen_dir.rmdir()
    for init in PACKAGE_INITS:
        (out / init / "__init__.py").write_text("")
    # PEP 561: type checkers of installed callers read the .pyi files.
    (package / "py.typed").write_text("")
    for path in package.rglob("*.py*"):
        text = path.read_text()
        text = _IMPORT.sub(rf"\1 {PACKAGE}.v1", text)
        text = _QUALIFIED.sub(rf"{PACKAGE}.v1.\1", text)
        path.write_text(text)


def _tree(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in (root / "generated").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    if "--check" not in sys.argv[1:]:
        shutil.rmtree(ROOT / "generated", ignore_errors=True)
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = _tree(Path(tmp)), _tree(ROOT)
        stale = sorted(
            name
            for name in fresh.keys() | committed.keys()
            if name not in fresh
            or name not in committed
            or not filecmp.cmp(fresh[name], committed[name], shallow=False)
        )
    if stale:
        print("generated/ is stale; run `make proto`:", *stale, sep="\n  ")
        return 1
    print("generated/ is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
