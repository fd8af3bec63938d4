"""Helpers for the mergekit tests: a merge YAML, and runs of mergekit-yaml and of our engine on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
FILTERED_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def write_cfg(path: Path, a: Path, b: Path, method="slerp_for_causal_lm", **params) -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": FILTERED_T, **params},
        "dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mergekit_yaml(cfg: Path, out: Path, *extra: str, env=None,
                  fresh: bool = False) -> subprocess.CompletedProcess:
    """``mergekit-yaml cfg out --lazy-unpickle extra``, output captured. ``fresh``: a new interpreter
    (what tests of how the method is registered at start-up need); else forked from the warm server,
    which started as any interpreter does (the plugin's start-up hook included) and has the package
    imported, saving seconds of imports per run."""
    argv = [str(cfg), str(out), "--lazy-unpickle", *extra]
    if fresh:
        return subprocess.run([str(BIN / "mergekit-yaml"), *argv], capture_output=True, text=True,
                              timeout=300, env=env)
    from crash_harness import run_command

    return run_command(argv, Path.cwd(), env, program="mergekit-yaml")


def ours(cfg: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    from model_helpers import run_cli

    return run_cli(["mergekit", str(cfg), str(out), *extra], Path.cwd())
