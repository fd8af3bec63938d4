"""Branch choices near DOT_THRESHOLD: the engine (float64 sums, and ``norm_precision=float32``)
against FusionBench's op order, on SmolLM2-135M-Instruct and a genuine fine-tune of it.

    python bench/branches.py [--threshold 0.99999] [--t 0.5] [--out DIR]

Merges the pair (bench/finetune.py) twice with float32 outputs, once per ``norm_precision``, then
recomputes every tensor with FusionBench's op order (:func:`slerp_plugin.kernel.slerp_reference`,
float32 whole-tensor norms) and counts the SLERP/LERP branches each took. For each engine merge
it reports the tensors whose branch differs from FusionBench's and the largest relative
difference of a tensor from FusionBench's, ``‖engine − FusionBench‖ / ‖FusionBench‖``. Writes
DIR/branches.json (default DIR: bench/results) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from finetune import finetune  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from slerp_plugin.demo.smollm2 import smollm2_folder  # noqa: E402
from slerp_plugin.engine import compute_threads  # noqa: E402
from slerp_plugin.formats.manifest import Manifest  # noqa: E402
from slerp_plugin.kernel import fusionbench_coefficients, slerp_reference  # noqa: E402
from slerp_plugin.merge import run_merge  # noqa: E402
from slerp_plugin.spec import MergeSpec  # noqa: E402


def state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: dict, b: dict, merged: Path, t: float, tau: float) -> dict:
    """One engine merge against FusionBench's op order, tensor by tensor."""
    records = {r.name: r for r in Manifest.read(merged).tensors}
    got = state(merged)
    counts = {"slerp": 0, "lerp": 0}
    fb_counts = {"slerp": 0, "lerp": 0}
    differ, worst, worst_name = [], 0.0, ""
    for name, x in a.items():
        fb = fusionbench_coefficients(t, x.float(), b[name].float(), DOT_THRESHOLD=tau)
        fb_branch = "lerp" if fb.branch == "lerp" else "slerp"
        ours = "lerp" if records[name].branch == "lerp" else "slerp"
        counts[ours] += 1
        fb_counts[fb_branch] += 1
        if ours != fb_branch:
            differ.append(name)
        ref = slerp_reference(t, x, b[name], tau)
        rel = float((got[name].double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    return {"engine": counts, "fusionbench": fb_counts, "branch_differs": differ,
            "max_rel_diff": worst, "max_rel_diff_tensor": worst_name}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=0.99999)
    ap.add_argument("--t", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    base = smollm2_folder()
    tuned = finetune(base, base.with_name(base.name + "-ft20"))
    a, b = state(base), state(tuned)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("float64", "float32"):
            out = Path(tmp) / precision
            run_merge(MergeSpec.build(model_1=str(base), model_2=str(tuned), t=args.t, output=str(out),
                                      DOT_THRESHOLD=args.threshold, out_dtype="float32",
                                      norm_precision=precision, buffer_memory="2GB"))
            with compute_threads(torch.device("cpu"), None):  # the merge's thread count: the same sums
                results[precision] = compare(a, b, out, args.t, args.threshold)
            brief = {k: v for k, v in results[precision].items() if k != "branch_differs"}
            print(precision, brief, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "branches.json").write_text(json.dumps({"threshold": args.threshold, "t": args.t,
                                                        "tensors": len(a), **results}, indent=2))
    print("| norm_precision | engine SLERP/LERP | FusionBench SLERP/LERP | branch differs | max rel. diff |")
    print("|---|---|---|---:|---:|")
    for precision, r in results.items():
        print(f"| {precision} | {r['engine']['slerp']}/{r['engine']['lerp']} | "
              f"{r['fusionbench']['slerp']}/{r['fusionbench']['lerp']} | {len(r['branch_differs'])} | "
              f"{r['max_rel_diff']:.2g} |")


if __name__ == "__main__":
    main()
