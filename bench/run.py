"""Benchmark: slerp-merge against mergekit and a FusionBench-formula eager merge, and the I/O floor.

    python bench/run.py [--layers 4 8 16 32] [--repeats 3] [--systems ours mergekit ...] [--big-tensor]

Builds (once, under bench/work/) bf16 Llama pairs of hidden 2048, intermediate 5632, vocab 32000
and the given layer counts (16 layers = the 953M pair; 4/8/32 ≈ 0.25×/0.5×/2×) in 500 MB input
shards, then runs each system on each pair, alternating, ``--repeats`` times, with the inputs
evicted from the page cache before every run. Each run's wall time, CPU time and peak RSS come from
the OS (/usr/bin/time -v). The I/O floor is measured on the same disk: reading both inputs cold and
warm, writing the output size with fsync. Writes bench/results/results.json, a markdown table of
medians and ratios (bench/RESULTS.md) and a plot (bench/bench.png).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from make_pair import build  # noqa: E402

HEADER = """# Benchmark results

Produced by `python bench/run.py` (see its docstring); medians over the repeats, inputs evicted
from the page cache before every run. "ours / system" < 1 means slerp-merge is faster.

"""
SYSTEMS = ("ours", "mergekit", "mergekit_500M", "mergekit_plugin", "fusionbench_eager")
EAGER = """
import sys, torch, glob
from safetensors.torch import load_file, save_file
from slerp_plugin.slerp import slerp_reference
a, b, out = sys.argv[1:4]
def load(d):
    sd = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        sd.update(load_file(f))
    return sd
A, B = load(a), load(b)
merged = {k: slerp_reference(0.5, A[k], B[k]).to(A[k].dtype) for k in B}
import os; os.makedirs(out, exist_ok=True)
save_file(merged, out + "/model.safetensors", metadata={"format": "pt"})
"""


def evict(paths: list[Path]) -> None:
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def timed(cmd: list[str], env: dict | None = None) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-1500:]}")
    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", r.stderr).group(1).strip()
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    parts = [float(x) for x in wall.split(":")]
    seconds = parts[-1] + 60 * parts[-2] + (3600 * parts[-3] if len(parts) == 3 else 0)
    return {"wall_s": seconds, "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "peak_rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024}


def mk_config(a: Path, b: Path, method: str) -> Path:
    cfg = WORK / f"{method}-{a.parent.name}.yml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   "parameters:\n  t: 0.5\ndtype: bfloat16\n")
    return cfg


def command(system: str, a: Path, b: Path, out: Path) -> list[str]:
    if system == "ours":
        return [str(BIN / "slerp-merge"), "mergekit", str(mk_config(a, b, "slerp")), str(out)]
    if system == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp")), str(out), "--lazy-unpickle"]
    if system == "mergekit_500M":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp")), str(out), "--lazy-unpickle",
                "--out-shard-size", "500M"]
    if system == "mergekit_plugin":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp_for_causal_lm")), str(out), "--lazy-unpickle"]
    if system == "fusionbench_eager":
        return [sys.executable, "-c", EAGER, str(a), str(b), str(out)]
    raise ValueError(system)


def io_floor(a: Path, b: Path, out_bytes: int) -> dict:
    files = [f for d in (a, b) for f in d.glob("*.safetensors")]

    def read_all() -> float:
        t = time.perf_counter()
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
        return time.perf_counter() - t

    evict(files)
    cold = read_all()
    warm = read_all()
    target = WORK / "floor.bin"
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(out_bytes // len(buf) + 1):
        os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    write = time.perf_counter() - t
    target.unlink()
    return {"read_cold_s": cold, "read_warm_s": warm, "write_fsync_s": write, "floor_s": cold + write}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    args = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SLERP_PLUGIN_CACHE": str(WORK / "no-cache")}
    results = []
    for layers in args.layers:
        a, b = build(WORK / f"pair-{layers}", layers)
        size = sum(f.stat().st_size for f in a.glob("*.safetensors"))
        floor = io_floor(a, b, size)
        row = {"layers": layers, "params_m": size / 2e6, "model_gb": size / 1e9, "floor": floor, "runs": {}}
        for _ in range(args.repeats):
            for system in args.systems:
                out = WORK / f"out-{system}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(env["SLERP_PLUGIN_CACHE"], ignore_errors=True)
                evict([a, b])
                m = timed(command(system, a, b, out), env)
                row["runs"].setdefault(system, []).append(m)
                print(f"{layers:>2} layers {system:18s} wall {m['wall_s']:6.2f} s  cpu {m['cpu_s']:6.2f} s  "
                      f"rss {m['peak_rss_mb']:7.0f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        results.append(row)
    old = json.loads((RESULTS / "results.json").read_text()) if (RESULTS / "results.json").is_file() else []
    done = {r["layers"] for r in results}
    results = sorted([r for r in old if r["layers"] not in done] + results, key=lambda r: r["layers"])
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results)
    return 0


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def write_report(results: list[dict]) -> None:
    lines = ["| pair | system | wall (s) | CPU (s) | peak RSS (MB) | ours / system | ours / I/O floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in results:
        ours = median(row["runs"]["ours"], "wall_s") if "ours" in row["runs"] else None
        for system, runs in row["runs"].items():
            w = median(runs, "wall_s")
            ratio = f"{ours / w:.2f}" if ours and system != "ours" else "–"
            fl = f"{w / row['floor']['floor_s']:.2f}" if system == "ours" else "–"
            lines.append(f"| {row['params_m']:.0f}M | {system} | {w:.2f} | {median(runs, 'cpu_s'):.2f} | "
                         f"{median(runs, 'peak_rss_mb'):.0f} | {ratio} | {fl} |")
        f = row["floor"]
        lines.append(f"| {row['params_m']:.0f}M | I/O floor | {f['floor_s']:.2f} | | | | "
                     f"cold read {f['read_cold_s']:.2f} s, warm {f['read_warm_s']:.2f} s, write+fsync {f['write_fsync_s']:.2f} s |")
    (HERE / "RESULTS.md").write_text(HEADER + "\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    systems = sorted({s for row in results for s in row["runs"]})
    for system in systems:
        xs = [row["params_m"] for row in results if system in row["runs"]]
        ax1.plot(xs, [median(row["runs"][system], "wall_s") for row in results if system in row["runs"]], "o-", label=system)
        ax2.plot(xs, [median(row["runs"][system], "peak_rss_mb") for row in results if system in row["runs"]], "o-", label=system)
    ax1.plot([r["params_m"] for r in results], [r["floor"]["floor_s"] for r in results], "k--", label="I/O floor")
    ax1.set(xlabel="parameters (M)", ylabel="wall time (s)", title="time")
    ax2.set(xlabel="parameters (M)", ylabel="peak RSS (MB)", title="memory", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "bench.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
