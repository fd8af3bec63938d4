"""The house rules the code itself can check: a test file per public module, short functions, no
import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from model_helpers import ROOT

PACKAGE = ROOT / "slerp_plugin"
MAX_BODY_LINES = 60  #: lines of a function after its docstring
LONG_FUNCTION_MARK = "Long because"  #: a docstring that says why may exceed MAX_BODY_LINES


def public_modules() -> list[Path]:
    """Modules of the package that hold code of their own (not ``__init__``/``__main__``, not private)."""
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if not p.name.startswith("_") and "__pycache__" not in p.parts)


def test_every_public_module_has_a_test_file_laid_out_like_the_package():
    missing = []
    for module in public_modules():
        rel = module.relative_to(PACKAGE)
        expected = ROOT / "tests" / rel.parent / f"test_{rel.stem}.py"
        if not expected.is_file():
            missing.append(str(expected.relative_to(ROOT)))
    assert not missing, f"no test file for: {missing}"


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        if len(body) == 1:
            return 0
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def test_functions_are_short_or_say_why():
    long = []
    for module in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and _body_lines(node) > MAX_BODY_LINES \
                    and LONG_FUNCTION_MARK not in (ast.get_docstring(node) or ""):
                where = f"{module.relative_to(ROOT)}:{node.lineno}"
                long.append(f"{where} {node.name} ({_body_lines(node)} lines)")
    assert not long, f"over {MAX_BODY_LINES} lines without '{LONG_FUNCTION_MARK}' in the docstring: {long}"


def test_no_import_cycles_between_modules():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("slerp_plugin", exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    cycles = []
    for module in modules:
        for other in graph.find_modules_directly_imported_by(module):
            if other != module and graph.chain_exists(importer=other, imported=module):
                # a package importing its own submodules (re-exports) is not a cycle between modules
                if not (other.startswith(module + ".") or module.startswith(other + ".")):
                    cycles.append(f"{module} <-> {other}")
    assert not cycles, cycles


def test_test_files_have_unique_names():
    """The test folders are not packages: pytest imports each test file by its name alone."""
    names: dict[str, list[str]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {n: p for n, p in names.items() if len(p) > 1}
