"""The package's front door: the names load lazily at run time, and type checkers see each one's
real type (no ``Any``), checked by mypy in strict mode over a script that uses the public API."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import slerp_plugin

USES = textwrap.dedent(
    """
    from pathlib import Path

    import slerp_plugin
    from slerp_plugin import (
        Manifest, MergeSpec, SweepResult, finalize, merge_shards, plan_merge, run_merge, run_sweep,
        stream_merge,
    )

    spec: MergeSpec = MergeSpec.build(model_1="a", model_2="b", t=0.3, output="out")
    plan = plan_merge(spec)
    outcomes = merge_shards(plan, [0])
    result = finalize(plan)
    manifest: Manifest = result.manifest
    again = run_merge(spec)
    streamed = stream_merge(spec)
    folder: Path | None = again.output
    branches: dict[str, int] = manifest.branch_counts
    fingerprint: str = plan.fingerprint
    ref: slerp_plugin.ModelRef = spec.model_1
    version: str = slerp_plugin.__version__
    reused: list[bool] = [o.reused for o in outcomes]
    sweep: SweepResult = run_sweep(spec, [0.3, 0.5], report=Path("sweep"))
    best: float | None = sweep.best_t
    print(streamed, folder, branches, fingerprint, ref, version, reused, best)
    """
)


def test_every_public_name_loads_lazily_and_is_listed():
    code = "import sys, slerp_plugin; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr  # importing the package is cheap
    assert sorted(slerp_plugin.__all__) == sorted(["__version__", *slerp_plugin._LAZY])
    for name in slerp_plugin._LAZY:
        assert getattr(slerp_plugin, name).__name__ == name


def test_type_checkers_see_the_real_types(tmp_path):
    """``--disallow-any-expr``: an expression of type Any in the script (a public name the checker
    cannot see through, or one whose signature says Any) fails the test."""
    pytest.importorskip("mypy")
    script = tmp_path / "uses_the_api.py"
    script.write_text(USES)
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--disallow-any-expr", "--follow-imports=silent",
         "--no-incremental", "--cache-dir", str(tmp_path / "cache"), "--config-file", "pyproject.toml",
         str(script)],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    reveal = tmp_path / "reveal.py"
    reveal.write_text("import slerp_plugin\nreveal_type(slerp_plugin.run_merge)\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental",
                        "--cache-dir", str(tmp_path / "cache"), "--config-file", "pyproject.toml",
                        str(reveal)], capture_output=True, text=True, timeout=600)
    assert "def (spec: slerp_plugin.spec.MergeSpec" in r.stdout, r.stdout
