"""The documentation site cannot rot: it builds in strict mode (a broken link, a missing page or an
API name that no longer exists fails), and every function of the API reference documents each of
its arguments and what it returns (Google style)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from model_helpers import ROOT

API_PAGE = ROOT / "docs" / "api.md"


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    assert "run_merge" in api and "Parameters" in api and "Returns" in api


def test_every_function_of_the_api_reference_documents_its_arguments_and_result():
    griffe = pytest.importorskip("griffe")
    package = griffe.load("slerp_plugin", search_paths=[str(ROOT)])
    missing = []
    page = API_PAGE.read_text()
    for path, members in re.findall(r"^::: (\S+)\n(?:    options:\n(?:      .*\n)*?      members: \[(.*)\])?",
                                    page, flags=re.M):
        obj = package[path.removeprefix("slerp_plugin.")]
        if obj.is_module:
            continue  # a module's page lists its classes (the errors), not functions
        shown = {m.strip() for m in members.split(",")} if members else None
        functions = [obj] if obj.is_function else [
            m for m in obj.members.values() if not m.is_alias and m.is_function and not m.name.startswith("_")
            and (shown is None or m.name in shown)]
        for fn in functions:
            if fn.docstring is None:
                missing.append(f"{fn.path}: no docstring")
                continue
            sections = fn.docstring.parse("google")
            documented = {p.name.lstrip("*") for s in sections if s.kind.value == "parameters"
                          for p in s.value}
            wanted = {p.name for p in fn.parameters if p.name not in ("self", "cls")}
            if wanted - documented:
                missing.append(f"{fn.path}: arguments not documented: {sorted(wanted - documented)}")
            returns = str(fn.returns or "")
            if returns not in ("", "None") and not any(s.kind.value == "returns" for s in sections):
                missing.append(f"{fn.path}: no Returns section")
    assert not missing, "\n".join(missing)
