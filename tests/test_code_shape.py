"""The code keeps a readable shape: no function over 60 lines anywhere (bench/ aside), no class over
300 lines in the daemons' packages. Measured on the AST: a definition's lines run from its ``def`` /
``class`` line to its last line, decorators excluded, nested definitions counted inside their parent
and on their own.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300
CLASS_LIMITED = ("broker", "worker", "common", "sdfs")  # top-level packages whose classes are limited too
SKIPPED = ("bench",)  # benchmarks are scripts, not product code; hidden directories (.venv, .git) are skipped too

def oversized(source: str, path: str) -> dict[str, int]:
    """``{"path:Qualified.name": lines}`` for each definition in ``source`` over its limit."""
    limit_classes = path.split("/", 1)[0] in CLASS_LIMITED
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                is_class = isinstance(child, ast.ClassDef)
                if (lines > MAX_CLASS_LINES and limit_classes) if is_class else lines > MAX_FUNCTION_LINES:
                    found[f"{path}:{name}"] = lines
                visit(child, f"{name}.")
            else:
                visit(child, prefix)  # definitions inside if/try/with blocks

    visit(ast.parse(source, filename=path), "")
    return found


def python_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        # Pruned, not filtered afterwards: a checkout's .venv holds tens of thousands of files.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIPPED]
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def repo_oversized() -> dict[str, int]:
    found: dict[str, int] = {}
    for p in python_files():
        found |= oversized(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())
    return found


def test_no_function_over_60_lines_and_no_class_over_300():
    found = repo_oversized()
    assert not found, f"over the limit (functions {MAX_FUNCTION_LINES}, classes {MAX_CLASS_LINES} lines): {found}"


def test_the_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in python_files()}
    assert {"broker/coordinator.py", "cli/main.py", "tests/test_code_shape.py"} <= files
    assert not any(f.startswith(("bench/", ".venv/")) for f in files)


def _body(n: int, indent: str = "    ") -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(n))


def test_the_check_finds_long_definitions_in_a_synthetic_source():
    # def line + 59 body lines = 60 (allowed); def line + 60 = 61 (too long); a 302-line class.
    source = (
        "def fits():\n" + _body(59)
        + "async def too_long():\n" + _body(60)
        + "if True:\n    def hidden():\n" + _body(61, "        ")
        + "class Big:\n    def small(self):\n" + _body(3, "        ") + _body(297)
        + "class Small:\n    def long_method(self):\n" + _body(70, "        ")
    )
    assert oversized(source, "broker/x.py") == {
        "broker/x.py:too_long": 61,
        "broker/x.py:hidden": 62,
        "broker/x.py:Big": 302,
        "broker/x.py:Small.long_method": 71,
    }
    # Outside the daemons' packages only functions are limited.
    assert set(oversized(source, "cli/x.py")) == {"cli/x.py:too_long", "cli/x.py:hidden", "cli/x.py:Small.long_method"}
    assert oversized("def f():\n" + _body(59), "tests/x.py") == {}
