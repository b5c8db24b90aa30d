"""A lint rule for the test suite itself: no assertion that cannot fail.

`assert x or True`, `assert (a, b)`, `assert "message"` and `assert 1` always pass: a test built on
them asserts nothing (one such line was found in this suite). Ruff has no rule for the `or True`
form, so this walks every test module's AST.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOTS = [Path(__file__).parent, Path(__file__).parent.parent / "bench"]


def _always_true(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return bool(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
        return len(getattr(node, "elts", getattr(node, "keys", []))) > 0
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        return any(_always_true(v) for v in node.values)
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        return all(_always_true(v) for v in node.values)
    return False


def constant_asserts(source: str, filename: str) -> list[str]:
    return [f"{filename}:{n.lineno}: {ast.unparse(n.test)[:80]}"
            for n in ast.walk(ast.parse(source, filename)) if isinstance(n, ast.Assert) and _always_true(n.test)]


def test_the_rule_catches_what_it_should_and_nothing_else():
    bad = "assert x or True\nassert (a, 'why')\nassert 'text'\nassert 1\nassert y and 2 or 3\n"
    good = "assert x\nassert x or y\nassert not True\nassert 0 or x\nassert ()\nassert x and True\n"
    assert len(constant_asserts(bad, "bad.py")) == 5
    assert constant_asserts(good, "good.py") == []


def test_no_test_or_benchmark_asserts_a_constant():
    found = []
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            found += constant_asserts(path.read_text(), str(path.relative_to(root.parent)))
    assert found == [], "\n".join(found)
