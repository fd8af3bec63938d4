"""Benchmark of ``slerp-merge validate``: peak memory across model sizes, time on a real model.

    python bench/validate.py [--layers 4 16 32] [--no-smollm2] [--device cpu] [--out DIR]
                             [--repeats N] [--baseline CHECKOUT]

For each ``--layers`` count (4/16/32 = the 0.25×/1×/2× pairs of bench/run.py; 16 = 953M
parameters) the pair is built under bench/work/ if missing, merged once at t = 0.5, and
validated with ``--no-cache`` (all three models evaluated); then SmolLM2-135M-Instruct and its
fine-tune (bench/finetune.py) are merged and validated twice with a fresh evaluation cache: cold
(parents evaluated) and warm (parents from the cache), ``--repeats`` times (default 1). With
``--baseline CHECKOUT`` (a checkout of another version of this project, e.g. made with
``git worktree add CHECKOUT <commit>``) each repeat first runs that version's ``validate`` on the same
model (imported from CHECKOUT), so the two are compared on the same host within the same
minutes; the table then gives each version's median and the ratio to the baseline's. Each run's
wall time and peak RSS come from the kernel (bench/run.py's ``timed``), with the seconds of each
check from its report. Writes DIR/validate.json and prints a markdown table (default DIR:
bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
             env: dict | None = None, cli: list[str] = CLI) -> dict:
    """One timed ``slerp-merge validate`` (run as ``cli``); its figures and the report's timings."""
    with tempfile.TemporaryDirectory() as report:
        m = timed([*cli, "validate", str(model), "--parents", *map(str, parents), "--report", report,
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
    ap.add_argument("--repeats", type=int, default=1, help="SmolLM2 runs of each kind")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="a checkout of the version to compare with")
    ap.add_argument("--seed-shapes", action="store_true",
                    help="only the pair with Qwen2-72B's tensor shapes and 2 layers (~8.5 GB each)")
    args = ap.parse_args(argv)
    rows = []
    if args.seed_shapes:
        args.layers, args.no_smollm2 = [], True
        rows += seed_shapes(args.device, args.baseline)
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
        for _ in range(args.repeats):
            if args.baseline:
                # -P: the package comes from PYTHONPATH, not from the current folder
                env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
                rows.append({"model": "SmolLM2-135M + fine-tune", "cache": "baseline",
                             **validate(out, (base, tuned), args.device, [], env,
                                        [sys.executable, "-P", "-m", "slerp_plugin"])})
                print(rows[-1], flush=True)
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "SLERP_PLUGIN_CACHE": cache}
                for label in ("cold", "warm"):
                    rows.append({"model": "SmolLM2-135M + fine-tune", "cache": label,
                                 **validate(out, (base, tuned), args.device, [], env)})
                    print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "validate.json").write_text(json.dumps(rows, indent=2))
    print_table(rows)


def seed_shapes(device: str, baseline: Path | None) -> list[dict]:
    """``validate --no-cache`` (all three models evaluated) of the Qwen2-72B-shaped pair's merge,
    by this version and, with ``baseline``, by that one; the perplexities are compared."""
    a, b = make_pair.build_seed_shapes(WORK / "seed-shapes")
    out = merged(a, b, WORK / "validate" / "merged-seed-shapes")
    rows = []
    if baseline:
        env = {**os.environ, "PYTHONPATH": str(baseline.resolve())}
        rows.append({"model": "Qwen2-72B shapes, 2 layers", "cache": "baseline",
                     **validate(out, (a, b), device, ["--no-cache"], env,
                                [sys.executable, "-P", "-m", "slerp_plugin"])})
        print(rows[-1], flush=True)
    rows.append({"model": "Qwen2-72B shapes, 2 layers", "cache": "none",
                 **validate(out, (a, b), device, ["--no-cache"])})
    print(rows[-1], flush=True)
    if baseline:
        for role, ppl in rows[-1]["perplexity"].items():
            want = rows[0]["perplexity"][role]
            print(f"{role}: perplexity {ppl:.6f}, baseline {want:.6f}, relative difference "
                  f"{abs(ppl - want) / want:.2e}")
    return rows


def print_table(rows: list[dict]) -> None:
    """One markdown row per model and cache state: medians over its repeats, and the ratio of
    the median wall time to the baseline's (when there is one)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["cache"]), []).append(r)
    base = {m: statistics.median(r["wall_s"] for r in rs) for (m, c), rs in groups.items() if c == "baseline"}
    print("| model | parents | runs | wall s (median) | × baseline | peak RSS MB | structural s | spot s "
          "| functional s | evaluated |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for (model, cache), rs in groups.items():
        def med(key: str, rs: list[dict] = rs) -> float:
            return statistics.median(r["timings"].get(key, 0) for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        ratio = f"{wall / base[model]:.2f}" if model in base else "–"
        modes = sorted({m for r in rs for m in r["modes"]})
        print(f"| {model} | {cache} | {len(rs)} | {wall:.1f} | {ratio} | "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} | {med('structural_s'):.1f} | {med('spot_s'):.1f} | "
              f"{med('functional_s'):.1f} | {', '.join(modes) or '–'} |")


if __name__ == "__main__":
    main()
