"""Benchmark of choosing t: ``slerp-merge sweep`` (every t in one pass) against the sweep it replaces
(a merge per t, each validated and kept).

    python bench/sweep.py [--t 0.1,0.3,0.5,0.7,0.9] [--layers 16] [--max-tokens 1024] [--out DIR]
    python bench/sweep.py --hub 100 --t 0.3,0.7 --max-tokens 256

With ``--hub MBPS`` it measures instead the one-pass sweep of the pair as Hub parents (the test Hub
of bench/stream.py at MBPS MB/s down), once with the parents evaluated in the pass and once with
their perplexities cached, against the time the parents' bytes take at that rate; writes
DIR/sweep_hub.json.

On the pair of bench/run.py with ``--layers`` layers (16 = the 953M pair, built under bench/work/
if missing), each with an evaluation cache of its own (so both evaluate the parents once):

- merge each: ``slerp-merge -m``-style, one ``slerp-merge`` merge per t and one ``slerp-merge
  validate`` of it, every model kept (what ``slerp_sweep`` in merge-each mode does);
- one pass: ``slerp-merge sweep --t ...`` (what ``slerp_sweep`` does in one-pass mode).

Reported: wall time (sum of the commands), the largest peak RSS of any one command, the peak disk
each writes (sampled every 50 ms: merge each, the models kept; one pass, its work folder), and the
largest relative difference between the two sets of perplexities. Writes DIR/sweep.json and prints
a markdown table (default DIR: bench/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import make_pair  # noqa: E402
from run import WORK, timed  # noqa: E402
from stream import DiskSampler  # noqa: E402

CLI = [sys.executable, "-m", "slerp_plugin"]


def seed_args(a: Path, b: Path, *extra: str) -> list[str]:
    return [f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}", f"modelpool.tokenizer={a}",
            *extra]


def merge_each(a: Path, b: Path, ts: list[float], tokens: int, work: Path) -> dict:
    """A merge per t, each validated (parents from a cache of its own after the first)."""
    env = {**os.environ, "SLERP_PLUGIN_CACHE": str(work / "cache-each")}
    runs, ppl = [], {}
    (work / "each").mkdir()
    with DiskSampler(work / "each") as disk:
        for t in ts:
            out = work / "each" / f"t{t}"
            merge = seed_args(a, b, f"method.t={t}", f"method.model_save_path={out}")
            runs.append(timed([*CLI, *merge], env=env))
            runs.append(timed([*CLI, "validate", str(out), "--parents", str(a), str(b), "--max-tokens",
                               str(tokens), "--device", "cpu"], env=env))
            ppl[t] = json.loads((out / "validation.json").read_text())["functional"]["perplexity"]["merged"]
    shutil.rmtree(work / "each")
    return {"wall_s": sum(r["wall_s"] for r in runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_disk_bytes": disk.peak, "perplexity": ppl}


def swept(a: Path, b: Path, ts: list[float], tokens: int, report: Path, env: dict) -> dict:
    """``slerp-merge sweep`` of parents ``a`` and ``b`` (folders or Hub ids) into ``report``, its
    disk sampled in the folder around it."""
    report.parent.mkdir(parents=True, exist_ok=True)
    with DiskSampler(report.parent) as disk:
        run = timed([*CLI, "sweep", "--t", ",".join(map(str, ts)), "--report", str(report), "--max-tokens",
                     str(tokens), *seed_args(a, b, "method.t=0.5", "method.device=cpu",
                                             f"method.model_save_path={report.parent / 'merged'}")], env=env)
    sweep = json.loads((report / "sweep.json").read_text())
    return {**run, "peak_disk_bytes": disk.peak, "best_t": sweep["best_t"],
            "perplexity": {p["t"]: p["perplexity"] for p in sweep["points"]}}


def one_pass(a: Path, b: Path, ts: list[float], tokens: int, work: Path) -> dict:
    """``slerp-merge sweep`` over the same t."""
    env = {**os.environ, "SLERP_PLUGIN_CACHE": str(work / "cache-one")}
    return swept(a, b, ts, tokens, work / "one" / "report", env)


def one_pass_hub(a: Path, b: Path, ts: list[float], tokens: int, work: Path, down_mbps: float) -> dict:
    """``slerp-merge sweep`` of the same pair as Hub parents (the test Hub, hard-linked, ``down_mbps``
    MB/s down), twice: the parents evaluated in the pass, then their perplexities from the cache."""
    from stream import set_bandwidth, test_hub

    runs = {}
    with test_hub(work, (a, b), link=True) as (url, env):
        set_bandwidth(url, down_mbps * 1e6, None)
        for name in ("evaluated", "cached"):
            runs[name] = swept(Path("bench/parent-a"), Path("bench/parent-b"), ts, tokens,
                               work / "hub" / name / "report", env)
    weights = sum(f.stat().st_size for folder in (a, b) for f in folder.glob("*.safetensors"))
    return {"down_mbps": down_mbps, "parents_bytes": weights, "link_s": weights / (down_mbps * 1e6), **runs}


def hub_main(a: Path, b: Path, ts: list[float], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        hub = one_pass_hub(a, b, ts, args.max_tokens, Path(tmp), args.hub)
    same = hub["evaluated"]["perplexity"] == hub["cached"]["perplexity"]
    result = {"t": ts, "layers": args.layers, "tokens": args.max_tokens, **hub, "same_perplexities": same}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep_hub.json").write_text(json.dumps(result, indent=1))
    print("| sweep of Hub parents | wall (s) | / link time | peak RSS (MB) | peak disk (GB) |\n"
          "|---|---|---|---|---|")
    for name, label in (("evaluated", "parents evaluated in the pass"), ("cached", "parents from the cache")):
        r = hub[name]
        print(f"| {label} | {r['wall_s']:.1f} | {r['wall_s'] / hub['link_s']:.2f}× | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_disk_bytes'] / 1e9:.2f} |")
    print(f"\nthe parents' {hub['parents_bytes'] / 1e9:.2f} GB take {hub['link_s']:.1f} s at {args.hub:g} "
          f"MB/s; the perplexities of both runs are {'bit-identical' if same else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--hub", type=float, metavar="MBPS", default=None,
                    help="instead: the one-pass sweep of Hub parents on the test Hub at MBPS MB/s down")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args()
    ts = [float(t) for t in args.t.split(",")]
    a, b = make_pair.build(WORK / f"pair-{args.layers}", args.layers)
    if args.hub:
        hub_main(a, b, ts, args)
        return
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        each = merge_each(a, b, ts, args.max_tokens, Path(tmp))
        one = one_pass(a, b, ts, args.max_tokens, Path(tmp))
    diff = max(abs(one["perplexity"][t] / each["perplexity"][t] - 1) for t in ts)
    result = {"t": ts, "layers": args.layers, "tokens": args.max_tokens, "merge_each": each, "one_pass": one,
              "ratio": one["wall_s"] / each["wall_s"], "max_relative_difference": diff}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
    print("| | wall (s) | peak RSS (MB) | peak disk (GB) |\n|---|---|---|---|")
    for name, r in (("merge each + validate", each), ("one pass (`slerp-merge sweep`)", one)):
        print(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_disk_bytes'] / 1e9:.2f} |")
    print(f"\none pass / merge each: {result['ratio']:.2f}×; perplexities equal within {diff:.1e} relative; "
          f"best t {one['best_t']}")


if __name__ == "__main__":
    main()
