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
    ap.add_argument("--stream", action="store_true", help="with --seed-shapes: a gated Hub-to-Hub stream "
                    "of that pair instead of validate (needs ~40 GB of free disk)")
    args = ap.parse_args(argv)
    rows = []
    if args.seed_shapes and args.stream:
        seed_shapes_stream(args.out)
        return
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


def seed_shapes_stream(out: Path, shard: str = "3GB", budget: str = "12GB") -> dict:
    """The Qwen2-72B-shaped pair streamed Hub to Hub with the gate (all three models evaluated,
    no cache) through the test Hub (bench/stream.py), ``shard`` output shards within ``budget``:
    wall, CPU, peak RSS, peak disk and the gate's perplexities; printed, written to
    ``out``/validate_stream.json and, with the default ``out``, to RESULTS.md."""
    import shutil

    from results_md import replace_section
    from stream import python_out, test_hub

    a, b = make_pair.build_seed_shapes(WORK / "seed-shapes")
    work = WORK / "validate-stream"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with test_hub(work, (a, b), link=True) as (_url, env):
        env = {**env, "SLERP_PLUGIN_CACHE": str(work / "eval-cache")}
        cmd = [*CLI, "modelpool.models.model_1=bench/parent-a", "modelpool.models.model_2=bench/parent-b",
               "modelpool.tokenizer=bench/parent-a", "method.t=0.5", f"method.model_save_path={work / 'out'}",
               "method.stream=true", f"method.max_shard_size={shard}", f"method.disk_budget={budget}",
               "+push_to_hub=bench/merged-seed-shapes"]
        row = {"shard": shard, "budget": budget, **timed(cmd, env=env)}
        code = ("import json; from huggingface_hub import hf_hub_download as d; "
                "r = 'bench/merged-seed-shapes'; print(json.dumps([json.load(open(d(r, f))) "
                "for f in ('validation.json', 'merge_manifest.json')]))")
        report, manifest = json.loads(python_out(code, env))
    row["perplexity"] = report["functional"]["perplexity"]
    row["passed"] = report["passed"]
    row["peak_disk_gb"] = manifest["timings"]["stream_peak_disk_bytes"] / 1e9
    shutil.rmtree(work, ignore_errors=True)
    lines = stream_lines(row)
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate_stream.json").write_text(json.dumps(row, indent=2))
    if out == BENCH / "results":
        replace_section(BENCH / "RESULTS.md", "## A gated stream at 72B shapes", lines)
    return row


def stream_lines(row: dict) -> list[str]:
    """The markdown of :func:`seed_shapes_stream`'s ``row``."""
    ppl, budget = row["perplexity"], row["budget"]
    limit = float(budget.removesuffix("GB")) * 1e9
    figures = f"{ppl['merged']:.2f} / {ppl['model_1']:.2f} / {ppl['model_2']:.2f}"
    return [
        "The pair of \"Validation at 72B shapes\" (Qwen2-72B's tensor shapes, 2 decoder layers, 8.5 GB "
        "each), hard-linked into the test Hub, streamed Hub to Hub "
        "through the test Hub with the gate on (all three models evaluated on 1024 tokens, no cache), "
        f"{row['shard']} output shards, `method.disk_budget={budget}`, CPU "
        "(`python bench/validate.py --seed-shapes --stream`):",
        "",
        "| run | wall (s) | CPU (s) | peak RSS (MB) | peak disk (GB) | perplexity merged / model_1 / "
        "model_2 |",
        "|---|---:|---:|---:|---:|---|",
        f"| gated stream | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_rss_mb']:.0f} | "
        f"{row['peak_disk_gb']:.2f} | {figures} |",
        "",
        f"- {'met' if row['peak_rss_mb'] <= 1536 else 'NOT met'}: peak RSS {row['peak_rss_mb']:.0f} MB "
        "≤ 1.5 GB at hidden 8192 and vocabulary 152064",
        f"- {'met' if row['peak_disk_gb'] * 1e9 <= limit else 'NOT met'}: peak disk "
        f"{row['peak_disk_gb']:.2f} GB within the budget of {budget}",
        f"- the gate {'passed' if row['passed'] else 'failed'}",
    ]


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
