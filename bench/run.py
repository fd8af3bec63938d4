"""Benchmark: slerp-merge against mergekit and a FusionBench-formula eager merge, and the I/O floor.

    python bench/run.py [--layers 4 8 16 32] [--repeats 3] [--target-repeats 5] [--systems ours ...]
                        [--no-big-tensor] [--device cuda] [--baseline CHECKOUT] [--out DIR]

Builds (once, under bench/work/) bf16 Llama pairs of hidden 2048, intermediate 5632, vocab 32000
and the given layer counts (16 layers = the 953M pair; 4/8/32 ≈ 0.25×/0.5×/2×) in 500 MB input
shards, and a pair whose one tensor is 152064×8192 bf16 (Qwen-72B's embedding, 2.5 GB), then runs
each system on each pair ``--repeats`` times (the 953M pair, on which the targets are
checked, ``--target-repeats`` times: a single run on this disk scatters by ±0.5 s), in an order
that changes from one repeat to the next (:func:`run_order`: each system first after the floor
once per cycle, and not always right after the same system). Before every run the software the
systems run (the interpreter's standard library and site-packages, the shared libraries they map)
is read into the page cache (the memory-hungry runs evict it), the inputs are evicted from it,
slerp-merge's cache of input checksums is emptied, pending write-back is flushed and the machine
is left idle for ``SETTLE_S`` seconds, so that every run and every floor measurement starts from
the same idle state (this machine's shared disk reads faster after idle moments). Each run's wall
time, CPU time and peak RSS come from the OS (the kernel's rusage of the run's process, what
``/usr/bin/time -v`` reports). The I/O floor is measured on the same disk in every repeat: reading
both inputs cold and warm, writing the output size with fsync (each the faster of buffered and
O_DIRECT); floor = cold read + write. Writes bench/results/results.json, a markdown table of
medians, GB/s (both inputs read and the output written, over the wall time) and ratios with the
targets checked (bench/RESULTS.md) and a plot (bench/bench.png); ``--out DIR`` puts all
three in DIR. ``--device`` is passed to slerp-merge (``bash bench/gpu_check.sh`` runs it with
``cuda`` on a GPU machine). The eager FusionBench-formula merge is skipped on the 2.5 GB tensor: it
needs about ten times it in RAM. ``--baseline CHECKOUT`` (a checkout of another version of this
project, e.g. made with ``git worktree add``) adds the system ``baseline``: slerp-merge from that
checkout (``python -P -m slerp_plugin`` with it on ``PYTHONPATH``), in the same rotation, so the
table's "ours / system" on its row compares the two versions run alternately.
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from make_pair import build, build_big  # noqa: E402

BIG = "152064x8192 tensor"
TARGET_LAYERS = 16  #: the 953M pair, on which the targets are checked

HEADER = """# Benchmark results

Produced by `python bench/run.py` (see its docstring; `--report-only` rebuilds this file and the
plot from bench/results/results.json); medians over the repeats, inputs evicted from the page
cache before every run. "ours / system" < 1 means slerp-merge is faster. The machine's disk is
shared and its speed drifts by up to 2× within minutes: compare ratios within one run, not
absolute times across runs.

"""
SYSTEMS = ("ours", "mergekit", "mergekit_500M", "mergekit_plugin", "fusionbench_eager")
EAGER = """
import sys, torch, glob
from safetensors.torch import load_file, save_file
from slerp_plugin.kernel import slerp_reference
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


SETTLE_S = 2.0  #: seconds of idle machine before every run and every floor measurement


def settle() -> None:
    """Flush pending write-back (no run competes with the previous one's), then idle ``SETTLE_S``."""
    os.sync()
    time.sleep(SETTLE_S)


def evict(paths: list[Path]) -> None:
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


PROBE = """
import importlib
for name in ("hashlib", "mergekit.merge", "safetensors.torch", "torch", "transformers", "slerp_plugin.cli"):
    try:  # a system not installed (e.g. mergekit on a GPU machine running only ours) is not warmed
        importlib.import_module(name)
    except ImportError:
        pass
print(open("/proc/self/maps").read())
"""


@functools.cache
def software_files() -> list[Path]:
    """Every file the systems' software may read: the interpreter's standard library and
    site-packages, this checkout's package, and the shared libraries a process importing the
    systems' modules has mapped (libpython, libcrypto, libgomp, ...)."""
    roots = {Path(sysconfig.get_path(k)) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(HERE.parent / "slerp_plugin")
    files = {f for root in roots if root.is_dir() for f in root.rglob("*") if f.is_file()}
    maps = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    files |= {Path(f[-1]) for f in map(str.split, maps.splitlines()) if f and f[-1].startswith("/")}
    return sorted(f for f in files if f.is_file())


def warm_libraries() -> None:
    """Read the software the systems run (:func:`software_files`) into the page cache, so every run
    starts with its software cached and only its model data cold (memory-hungry runs evict it)."""
    buf = bytearray(8 << 20)
    for f in software_files():
        try:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
        except OSError:
            pass


# Runs a command and reports what the kernel accounted to it, as /usr/bin/time -v does, from a
# small process of its own: a child's peak RSS starts at that of the process it was forked from.
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as e:
        print(f"{sys.argv[2]}: {e.strerror}", file=sys.stderr, flush=True)
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    json.dump([os.waitstatus_to_exitcode(status), wall, ru.ru_utime, ru.ru_stime, ru.ru_maxrss], f)
"""


def timed(cmd: list[str], env: dict | None = None, stderr_to: Path | None = None) -> dict:
    """Run ``cmd``; its wall time, and the CPU time (s) and peak RSS (MB) the kernel accounts to
    that process and its children (``wait4``'s rusage, what ``/usr/bin/time -v`` reports).
    ``stderr_to``: a file that gets the command's output, stdout and stderr (its log).

    Raises:
        RuntimeError: the command failed (the end of its stderr in the message).
    """
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as err:
        report = Path(tmp) / "rusage.json"
        subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd],
                       stdout=err, stderr=subprocess.STDOUT, env=env)
        code, wall, user, system, maxrss_kb = json.loads(report.read_text()) if report.is_file() else [1] * 5
        if code:
            err.seek(0)
            raise RuntimeError(f"{cmd[0]} failed: {err.read().decode(errors='replace')[-1500:]}")
        if stderr_to is not None:
            err.seek(0)
            stderr_to.write_bytes(err.read())
    return {"user_s": user, "sys_s": system, "wall_s": wall, "cpu_s": user + system,
            "peak_rss_mb": maxrss_kb / 1024}


def mk_config(a: Path, b: Path, method: str) -> Path:
    cfg = WORK / f"{method}-{a.parent.name}.yml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
                   "parameters:\n  t: 0.5\ndtype: bfloat16\n")
    return cfg


def command(system: str, a: Path, b: Path, out: Path, device: str | None = None) -> list[str]:
    """The command line of ``system`` merging ``a`` and ``b`` into ``out``; ``device`` is passed to
    ours and the baseline only (``--device``, default the CLI's: ``auto``)."""
    if system in ("ours", "baseline"):
        # the console script where this package is installed, else the module (a GPU machine
        # runs the checkout from PYTHONPATH); the baseline: the module from its checkout
        cli = ([str(BIN / "slerp-merge")] if (BIN / "slerp-merge").exists() and system == "ours"
               else [sys.executable, *(["-P"] if system == "baseline" else []), "-m", "slerp_plugin"])
        return [*cli, "mergekit", str(mk_config(a, b, "slerp")), str(out),
                *(["--device", device] if device else [])]
    if system == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp")), str(out)]
    if system == "mergekit_500M":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp")), str(out),
                "--out-shard-size", "500M"]
    if system == "mergekit_plugin":
        return [str(BIN / "mergekit-yaml"), str(mk_config(a, b, "slerp_for_causal_lm")), str(out)]
    if system == "fusionbench_eager":
        return [sys.executable, "-c", EAGER, str(a), str(b), str(out)]
    raise ValueError(system)


def io_floor(a: Path, b: Path, out_bytes: int) -> dict:
    """Seconds to read both inputs (cold: evicted first; warm: again) and to write ``out_bytes``
    durably, each the faster of the buffered and the direct (O_DIRECT) path, each after
    :func:`settle`. The floor is the cold read plus the write: the two done one after the other,
    8 MiB at a time."""
    files = [f for d in (a, b) for f in d.glob("*.safetensors")]
    block = 8 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs

    def read_all(direct: bool) -> float:
        t = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            off = 0
            while n := os.preadv(fd, [buf], off):
                off += n
            os.close(fd)
        return time.perf_counter() - t

    def write_all(direct: bool) -> float:
        target = WORK / "floor.bin"
        t = time.perf_counter()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0))
        for _ in range(-(-out_bytes // block)):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        seconds = time.perf_counter() - t
        target.unlink()
        return seconds

    evict(files)
    settle()
    cold_buffered = read_all(False)
    warm = read_all(False)
    evict(files)
    settle()
    cold_direct = read_all(True)
    settle()
    write_buffered = write_all(False)
    settle()
    write_direct = write_all(True)
    cold, write = min(cold_buffered, cold_direct), min(write_buffered, write_direct)
    return {"read_cold_s": cold, "read_warm_s": warm, "write_fsync_s": write, "floor_s": cold + write,
            "read_cold_buffered_s": cold_buffered, "read_cold_direct_s": cold_direct,
            "write_buffered_s": write_buffered, "write_direct_s": write_direct}


def run_order(systems: list[str], rep: int) -> list[str]:
    """The order of the systems in repeat ``rep``: row ``rep`` of a Williams square,
    ``r, r+1, r-1, r+2, r-2, ...`` (mod n). Every system runs first after the floor's heavy I/O
    once in n repeats, and the system it runs right after changes from one repeat to the next: a
    run right after the memory-hungry eager merge is slower (0.2-0.8 s for slerp-merge on the 953M
    pair), and a plain rotation put every system after the same one in all repeats but one."""
    n = len(systems)
    return [systems[(rep + (k + 1) // 2 * (1 if k % 2 else -1)) % n] for k in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[4, 8, 16, 32])
    ap.add_argument("--big-tensor", action=argparse.BooleanOptionalAction, default=True,
                    help="also the pair whose one tensor is 152064x8192 bf16 (2.5 GB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-repeats", type=int, default=5, help="repeats of the 953M (16-layer) pair")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--device", default=None,
                    help="slerp-merge's --device (auto, cpu, cuda, cuda:N; default: the CLI's, auto)")
    ap.add_argument("--out", type=Path, default=None,
                    help="write results.json, RESULTS.md and the plot here "
                         "(default: bench/results/results.json, bench/RESULTS.md, bench/bench.png)")
    ap.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                    help="also run slerp-merge from this checkout of another version (system 'baseline')")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild RESULTS.md and the plot from results.json")
    args = ap.parse_args()
    store = args.out or RESULTS
    report = args.out or HERE
    if args.report_only:
        write_report(json.loads((store / "results.json").read_text()), report)
        return 0
    store.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    device = device_label(args.device)
    env = {**os.environ, "SLERP_PLUGIN_CACHE": str(WORK / "no-cache")}
    envs = {"baseline": {**env, "PYTHONPATH": str(args.baseline.resolve())}} if args.baseline else {}
    if args.baseline:
        args.systems = [*args.systems, "baseline"]
    cases = [(f"{n} layers", n, lambda n=n: build(WORK / f"pair-{n}", n)) for n in args.layers]
    if args.big_tensor:
        cases.append((BIG, BIG, lambda: build_big(WORK / "big_tensor")))
    results = []
    # the software is read again before every run only where a memory-hungry peer may evict it
    peers, warmed = set(args.systems) != {"ours"}, False
    for label, key, make in cases:
        a, b = make()
        size = sum(f.stat().st_size for f in a.glob("*.safetensors"))
        row = {"layers": key, "params_m": size / 2e6, "model_gb": size / 1e9, "device": device,
               "floors": [], "runs": {}}
        # an eager merge of the 2.5 GB tensor needs ~10x it in RAM (fp32 copies of A, B, Â, B̂, r)
        systems = [s for s in args.systems if not (key == BIG and s == "fusionbench_eager")]
        for rep in range(args.target_repeats if key == TARGET_LAYERS else args.repeats):
            row["floors"].append(io_floor(a, b, size))
            f = row["floors"][-1]
            print(f"{label:>9} I/O floor          {f['floor_s']:6.2f} s  "
                  f"(cold read {f['read_cold_s']:.2f} s, write+fsync {f['write_fsync_s']:.2f} s)", flush=True)
            after = "I/O floor"
            for system in run_order(systems, rep):
                out = WORK / f"out-{system}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(env["SLERP_PLUGIN_CACHE"], ignore_errors=True)
                if not warmed or peers:
                    warm_libraries()
                    warmed = True
                evict([a, b])
                settle()
                m = timed(command(system, a, b, out, args.device), envs.get(system, env))
                m["after"], after = after, system
                row["runs"].setdefault(system, []).append(m)
                print(f"{label:>9} {system:18s} wall {m['wall_s']:6.2f} s  cpu {m['cpu_s']:6.2f} s  "
                      f"rss {m['peak_rss_mb']:7.0f} MB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        results.append(row)
    stored = store / "results.json"
    old = json.loads(stored.read_text()) if stored.is_file() else []
    done = {r["layers"] for r in results}
    # a pair measured on another device (an earlier run with another --device) is not mixed in
    kept = [r for r in old if r["layers"] not in done and r.get("device", "cpu") == device]
    results = sorted(kept + results, key=lambda r: r["params_m"])
    stored.write_text(json.dumps(results, indent=2))
    write_report(results, report)
    return 0


def device_label(device: str | None) -> str:
    """``cpu``, or the name of the CUDA card slerp-merge runs on with ``--device`` (resolved as the
    engine resolves it: ``auto`` picks CUDA where present).

    Raises:
        ConfigError: CUDA was asked for but is not available.
    """
    import torch

    from slerp_plugin.engine import resolve_device

    d = resolve_device(device or "auto")
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def floor(row: dict) -> dict:
    """The medians of a pair's I/O floor measurements (one per repeat)."""
    floors = row.get("floors") or [row["floor"]]
    return {k: statistics.median(f[k] for f in floors) for k in floors[0]}


GPU_NOTE = ("GPU (`device: cuda`): no figures yet. `bash bench/gpu_check.sh` on a machine with an NVIDIA "
            "GPU runs the engine's CUDA tests and this benchmark for slerp-merge there "
            "(`--systems ours --device cuda --out DIR`) and writes its own RESULTS.md.")


def machine(device: str = "cpu") -> str:
    """CPU model, usable cores, memory and (``device``) the GPU slerp-merge ran on, for the report."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = 0.0
    gpu = "CPU only" if device == "cpu" else f"slerp-merge on {device}"
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {mem:.0f} GiB RAM, {gpu}"


def pair_label(row: dict) -> str:
    return f"{row['params_m']:.0f}M" + (" (one 2.5 GB tensor)" if row["layers"] == BIG else "")


def targets(results: list[dict]) -> list[str]:
    """The performance targets, checked against the medians (ratios measured in the same run)."""
    by = {r["layers"]: r for r in results}
    out = []

    def check(ok: bool, text: str) -> None:
        out.append(f"- {'met' if ok else 'NOT met'}: {text}")

    base = by.get(TARGET_LAYERS)
    if base and "ours" in base["runs"]:
        ours = median(base["runs"]["ours"], "wall_s")
        if "mergekit" in base["runs"]:
            r = ours / median(base["runs"]["mergekit"], "wall_s")
            check(r <= 0.4, f"953M pair, ours / mergekit default = {r:.2f} (target ≤ 0.4)")
        r = ours / floor(base)["floor_s"]
        walls = ", ".join(f"{m['wall_s']:.2f}" for m in base["runs"]["ours"])
        floors = ", ".join(f"{f['floor_s']:.2f}" for f in base["floors"])
        check(r <= 1.5, f"953M pair, ours / I/O floor = {r:.2f} (target ≤ 1.5); single repeats: "
              f"ours {walls} s, floor {floors} s")
        rss = median(base["runs"]["ours"], "peak_rss_mb")
        check(rss <= 600, f"953M pair, peak RSS {rss:.0f} MB (target ≤ 600 MB)")
    small, large = by.get(4), by.get(32)
    if small and large and "ours" in small["runs"] and "ours" in large["runs"]:
        lo, hi = median(small["runs"]["ours"], "peak_rss_mb"), median(large["runs"]["ours"], "peak_rss_mb")
        check(hi <= 1.1 * lo, f"peak RSS {lo:.0f} MB (0.25× pair) → {hi:.0f} MB (2× pair), "
              f"{100 * (hi / lo - 1):+.1f} % (target ≤ +10 %)")
    big = by.get(BIG)
    if big and "ours" in big["runs"]:
        rss = median(big["runs"]["ours"], "peak_rss_mb")
        check(rss < 1024, f"152064×8192 bf16 tensor, peak RSS {rss:.0f} MB (target < 1 GB)")
    return out


def _system_rank(system: str) -> int:
    """Where a system's row goes in the table: the order of :data:`SYSTEMS`, not the run order."""
    return SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)


def throughput(row: dict, wall_s: float) -> float:
    """GB/s moved by a merge of the pair: both inputs read and the output written, over ``wall_s``."""
    return 3 * row["model_gb"] / wall_s


STREAM_SECTION = "## Hub to Hub streaming"  #: written by bench/stream.py, kept by write_report


def write_report(results: list[dict], dest: Path = HERE) -> None:
    """``dest``/RESULTS.md (the table, the machine, the targets checked) and ``dest``/bench.png."""
    lines = ["| pair | system | wall (s) | CPU (s) | peak RSS (MB) | GB/s | ours / system "
             "| ours / I/O floor |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        ours = median(row["runs"]["ours"], "wall_s") if "ours" in row["runs"] else None
        for system, runs in sorted(row["runs"].items(), key=lambda kv: _system_rank(kv[0])):
            w = median(runs, "wall_s")
            ratio = f"{ours / w:.2f}" if ours and system != "ours" else "–"
            fl = f"{w / floor(row)['floor_s']:.2f}" if system == "ours" else "–"
            lines.append(f"| {pair_label(row)} | {system} | {w:.2f} | {median(runs, 'cpu_s'):.2f} | "
                         f"{median(runs, 'peak_rss_mb'):.0f} | {throughput(row, w):.2f} | {ratio} | {fl} |")
        f = floor(row)
        lines.append(f"| {pair_label(row)} | I/O floor | {f['floor_s']:.2f} | | | "
                     f"{throughput(row, f['floor_s']):.2f} | | cold read {f['read_cold_s']:.2f} s, "
                     f"warm {f['read_warm_s']:.2f} s, write+fsync {f['write_fsync_s']:.2f} s |")
    device = results[0].get("device", "cpu") if results else "cpu"
    lines += ["", f"Machine: {machine(device)}.", "", "Targets:", "", *targets(results)]
    lines += ["", GPU_NOTE] if device == "cpu" else []
    old = (dest / "RESULTS.md").read_text() if (dest / "RESULTS.md").is_file() else ""
    kept = old[old.index(STREAM_SECTION):] if STREAM_SECTION in old else ""  # bench/stream.py's
    (dest / "RESULTS.md").write_text(HEADER + "\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    layered = [r for r in results if r["layers"] != BIG]
    big = [r for r in results if r["layers"] == BIG]
    systems = sorted({s for row in results for s in row["runs"]})
    for i, system in enumerate(systems):
        color = f"C{i}"
        rows = [r for r in layered if system in r["runs"]]
        xs = [r["params_m"] for r in rows]
        ax1.plot(xs, [median(r["runs"][system], "wall_s") for r in rows], "o-", color=color, label=system)
        ax2.plot(xs, [median(r["runs"][system], "peak_rss_mb") for r in rows], "o-", color=color,
                 label=system)
        for r in big:
            if system in r["runs"]:
                ax1.plot(r["params_m"], median(r["runs"][system], "wall_s"), "*", ms=12, color=color)
                ax2.plot(r["params_m"], median(r["runs"][system], "peak_rss_mb"), "*", ms=12, color=color)
    ax1.plot([r["params_m"] for r in layered], [floor(r)["floor_s"] for r in layered], "k--",
             label="I/O floor")
    ax1.set(xlabel="parameters (M)", ylabel="wall time (s)", title="time (★: one 2.5 GB tensor)")
    ax2.set(xlabel="parameters (M)", ylabel="peak RSS (MB)", title="memory (★: one 2.5 GB tensor)",
            yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest / "bench.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
