"""Benchmark of ``slerp-merge validate``: peak memory across model sizes, time on a real model.

    python bench/validate.py [--layers 4 16 32] [--no-smollm2] [--device cpu] [--out DIR]

For each ``--layers`` count (4/16/32 = the 0.25×/1×/2× pairs of bench/run.py; 16 = 953M
parameters) the pair is built under bench/work/ if missing, merged once at t = 0.5, and
validated with ``--no-cache`` (all three models evaluated); then SmolLM2-135M-Instruct and its
fine-tune (bench/finetune.py) are merged and validated twice with a fresh evaluation cache: cold
(parents evaluated) and warm (parents from the cache). Each run's wall time and peak RSS come
from the kernel (bench/run.py's ``timed``), with the seconds of each check from its report.
Writes DIR/validate.json and prints a markdown table (default DIR: bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_pair  # noqa: E402
from run import WORK, timed  # noqa: E402

CLI = [sys.executable, "-m", "slerp_plugin"]


def merged(a: Path, b: Path, out: Path) -> Path:
    """``a`` and ``b`` merged at t = 0.5 into ``out`` (once)."""
    if not (out / "merge_manifest.json").is_file():
        cmd = [*CLI, f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}", "method.t=0.5",
               f"method.model_save_path={out}", f"modelpool.tokenizer={a}"]
        timed(cmd)
    return out


def validate(model: Path, parents: tuple[Path, Path], device: str, extra: list[str],
             env: dict | None = None) -> dict:
    """One timed ``slerp-merge validate``; its figures and the report's timings."""
    with tempfile.TemporaryDirectory() as report:
        m = timed([*CLI, "validate", str(model), "--parents", *map(str, parents), "--report", report,
                   "--device", device, *extra], env=env)
        rep = json.loads((Path(report) / "validation.json").read_text())
    f = rep["functional"]
    modes = sorted({e["mode"] for e in f.get("evaluations", {}).values()})
    return {**m, "timings": rep["timings"], "passed": rep["passed"], "modes": modes,
            "perplexity": f.get("perplexity", {})}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 16, 32])
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    rows = []
    for layers in args.layers:
        a, b = make_pair.build(WORK / f"pair-{layers}", layers)
        out = merged(a, b, WORK / "validate" / f"merged-{layers}")
        rows.append({"model": f"pair-{layers} ({layers} layers)", "cache": "none",
                     **validate(out, (a, b), args.device, ["--no-cache"])})
        print(rows[-1], flush=True)
    if not args.no_smollm2:
        from finetune import finetune

        from slerp_plugin.demo.smollm2 import smollm2_folder

        base = smollm2_folder()
        tuned = finetune(base, base.with_name(base.name + "-ft20"))
        out = merged(base, tuned, WORK / "validate" / "merged-smollm2")
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SLERP_PLUGIN_CACHE": cache}
            for label in ("cold", "warm"):
                rows.append({"model": "SmolLM2-135M + fine-tune", "cache": label,
                             **validate(out, (base, tuned), args.device, [], env)})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate.json").write_text(json.dumps(rows, indent=2))
    print("| model | parents | wall s | peak RSS MB | structural s | spot s | functional s | evaluated |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t = r["timings"]
        print(f"| {r['model']} | {r['cache']} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{t.get('structural_s', 0):.1f} | {t.get('spot_s', 0):.1f} | {t.get('functional_s', 0):.1f} | "
              f"{', '.join(r['modes'])} |")


if __name__ == "__main__":
    main()
