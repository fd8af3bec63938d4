"""Benchmark of Hub-to-Hub streaming (``method.stream=true``) against download, merge and upload
done one after the other.

    python bench/stream.py [--layers 16] [--down-mbps 200] [--up-mbps 100] [--shard 100MB] [--out DIR]

The pair (16 layers = 953M parameters, built under bench/work/ if missing) is served by the Hub
test server (tests/hub_server.py, in a process of its own on 127.0.0.1) whose links are limited to
``--down-mbps`` and ``--up-mbps`` MB/s, each direction shared by all its connections. Measured,
each in a fresh process (wall time and peak RSS from the kernel, bench/run.py's ``timed``):

- merge-only: the local merge of the two folders (also the reference output);
- download-only: both parents downloaded with ``download_model`` into an empty Hub cache;
- upload-only: the reference output uploaded with ``upload_folder`` to a new repo;
- streaming: ``slerp-merge ... method.stream=true +push_to_hub=...`` with ``method.gate=false``, with
  the disk its working folder holds sampled every 50 ms;
- the same with the perplexity gate (the default): first with both parents evaluated in the same
  pass (an empty evaluation cache), then again with the parents' evaluations cached.

"Sequential" is download + merge + upload. The streamed shards' SHA-256 (from the Hub) must equal
the reference output's. Writes DIR/stream.json and prints a markdown table (default DIR:
bench/results); bench/run.py's report adds it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import make_pair  # noqa: E402
from results_md import replace_section  # noqa: E402
from run import WORK, timed  # noqa: E402

CLI = [sys.executable, "-m", "slerp_plugin"]
TOKEN = "hf_test_token_write"  # the test server's write token
RESULT = "stream.json"


def python(code: str, env: dict) -> dict:
    """``code`` timed in a fresh interpreter."""
    return timed([sys.executable, "-c", code], env=env)


def python_out(code: str, env: dict) -> str:
    """What ``code`` prints, run in a fresh interpreter with ``env``."""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout


class DiskSampler:
    """The largest number of bytes the files under ``folder`` took at once, sampled every 50 ms."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            total = 0
            for root, _, files in os.walk(self.folder):
                for name in files:
                    try:
                        total += os.stat(os.path.join(root, name)).st_blocks * 512
                    except FileNotFoundError:
                        pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def pair_and_scratch(layers: int, name: str) -> tuple[Path, Path, Path]:
    """The benchmark pair of ``layers`` layers (built under bench/work/ if missing) and an empty
    scratch folder ``bench/work/<name>`` (this benchmark's own: emptied first)."""
    a, b = make_pair.build(WORK / f"pair-{layers}", layers)
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return a, b, work


@contextlib.contextmanager
def test_hub(work: Path, parents: tuple[Path, Path], xet: bool = False,
             link: bool = False) -> Iterator[tuple[str, dict]]:
    """The Hub test server in a process of its own, holding ``parents`` as bench/parent-a and -b:
    its URL and the environment that points a command at it (caches under ``work``). With ``xet``
    large files go up and down through its Xet storage (hf_xet), else by the LFS protocol. With
    ``link`` the parents' weight files are hard-linked into the server's storage instead of
    uploaded (no second copy on disk; LFS only)."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "hub_server.py"),
                               str(work / "hub-blobs"), *(["--xet"] if xet else [])], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT / "tests")
    try:
        url = server.stdout.readline().strip()
        env = {**os.environ, "HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "0" if xet else "1",
               "HF_XET_CACHE": str(work / "xet-cache"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_CACHE": str(work / "hf-cache"),
               "SLERP_PLUGIN_CACHE": str(work / "cache")}
        a, b = parents
        if link:
            for folder, repo in ((a, "bench/parent-a"), (b, "bench/parent-b")):
                body = json.dumps({"repo_id": repo, "folder": str(folder)}).encode()
                req = urllib.request.Request(f"{url}/_test/seed", method="POST", data=body,
                                             headers={"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=1800).read()
        else:
            python(f"from slerp_plugin.hub.client import upload_folder as up; "
                   f"up({str(a)!r}, 'bench/parent-a'); up({str(b)!r}, 'bench/parent-b')", env)
        yield url, env
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def set_bandwidth(url: str, down: float | None, up: float | None) -> None:
    req = urllib.request.Request(f"{url}/_test/bandwidth", data=json.dumps({"down": down, "up": up}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--down-mbps", type=float, default=200.0)
    ap.add_argument("--up-mbps", type=float, default=100.0)
    ap.add_argument("--shard", default="100MB", help="method.max_shard_size of both merges")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    a, b, work = pair_and_scratch(args.layers, "stream")
    common = [f"method.max_shard_size={args.shard}", "method.t=0.5"]

    local = work / "local"
    merge = timed([*CLI, f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}",
                   f"modelpool.tokenizer={a}", f"method.model_save_path={local}", *common])
    print("merge-only", merge, flush=True)

    with test_hub(work, (a, b)) as (url, env):
        set_bandwidth(url, args.down_mbps * 1e6, args.up_mbps * 1e6)

        download = python("from slerp_plugin.hub.client import download_model as d; d('bench/parent-a'); "
                          "d('bench/parent-b')", {**env, "HF_HUB_CACHE": str(work / "download-only")})
        shutil.rmtree(work / "download-only")
        print("download-only", download, flush=True)
        upload = python(f"from slerp_plugin.hub.client import upload_folder as up; "
                        f"up({str(local)!r}, 'bench/upload-only')", env)
        print("upload-only", upload, flush=True)

        def streaming(name: str, *extra: str) -> dict:
            out = work / name
            with DiskSampler(out.with_name(f"{name}.partial")) as disk:
                run = timed([*CLI, "modelpool.models.model_1=bench/parent-a",
                             "modelpool.models.model_2=bench/parent-b", "modelpool.tokenizer=bench/parent-a",
                             f"method.model_save_path={out}", *common, "method.stream=true",
                             f"+push_to_hub=bench/{name}", *extra], env=env, stderr_to=work / f"{name}.log")
            run["peak_disk_mb"] = disk.peak / 1e6
            run["budget_mb"] = disk_budget(f"bench/{name}", env) / 1e6
            print(name, run, flush=True)
            return run

        stream = streaming("streamed", "method.gate=false")
        identical = same_shards(local, "bench/streamed", env)
        # the gate: first with both parents evaluated in the same pass, then with them cached
        gated = {"parents evaluated": streaming("gated-cold"), "parents cached": streaming("gated-warm")}

    manifest = json.loads((local / "merge_manifest.json").read_text())["output"]
    out_bytes = manifest["total_size"]
    shards = manifest["shards"]
    row = {
        "pair": f"pair-{args.layers}", "params_m": round(out_bytes / 2e6), "down_MBps": args.down_mbps,
        "up_MBps": args.up_mbps, "shard": args.shard, "output_gb": out_bytes / 1e9,
        "largest_shard_mb": max(s["size"] for s in shards) / 1e6, "shards": len(shards),
        "merge": merge, "download": download, "upload": upload, "stream": stream, "gated": gated,
        "sequential_s": download["wall_s"] + merge["wall_s"] + upload["wall_s"], "identical": identical,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULT).write_text(json.dumps(row, indent=2))
    lines = report_lines(row)
    print("\n".join(lines))
    if args.out == BENCH / "results":  # the default run updates the published figures
        write_section(BENCH / "RESULTS.md", lines)
        plot(row, BENCH / "stream.png")


SECTION = "## Hub to Hub streaming"


def write_section(results_md: Path, lines: list[str]) -> None:
    """Put ``lines`` under :data:`SECTION` in RESULTS.md, replacing an earlier one."""
    image = "![streaming against the phases one after the other](stream.png)"
    replace_section(results_md, SECTION, [*lines, "", image])


def plot(row: dict, dest: Path) -> None:
    """Bars: each phase alone, their sum, and the streaming run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return
    labels = ["download only", "merge only", "upload only", "sequential", "streaming"]
    values = [row["download"]["wall_s"], row["merge"]["wall_s"], row["upload"]["wall_s"], row["sequential_s"],
              row["stream"]["wall_s"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(labels, values, color=["C0", "C1", "C2", "C7", "C3"])
    ax.axvline(1.2 * max(values[0], values[2]), color="k", ls="--", lw=1, label="1.2 × max(download, upload)")
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s)", title=f"Hub to Hub, {row['pair']}: {row['down_MBps']:.0f} MB/s down, "
                                         f"{row['up_MBps']:.0f} MB/s up")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)


def disk_budget(repo_id: str, env: dict) -> float:
    """The disk budget (bytes) the stream that published ``repo_id`` held itself to, from its manifest."""
    code = ("import json; from huggingface_hub import hf_hub_download as d; "
            f"m = json.load(open(d({repo_id!r}, 'merge_manifest.json'))); "
            "print(m['timings']['stream_disk_budget_bytes'])")
    return float(python_out(code, env))


def same_shards(local: Path, repo_id: str, env: dict) -> bool:
    """Whether the repo's weight files have exactly the SHA-256 of the local output's shards."""
    code = ("import json; from slerp_plugin.hub.client import list_files, resolve_revision as r; "
            f"print(json.dumps({{f.name: f.sha256 for f in list_files({repo_id!r}, r({repo_id!r}))}}))")
    hub = json.loads(python_out(code, env))
    shards = json.loads((local / "merge_manifest.json").read_text())["output"]["shards"]
    return bool(shards) and all(hub.get(s["file"]) == s["sha256"] for s in shards)


def report_lines(row: dict) -> list[str]:
    """The markdown table and targets of one streaming benchmark row."""
    s, d, u, m = row["stream"], row["download"], row["upload"], row["merge"]
    bound = max(d["wall_s"], u["wall_s"])
    lines = [
        f"Hub to Hub, {row['pair']} ({row['output_gb']:.2f} GB out, {row['shards']} shards of ≤ "
        f"{row['shard']}), test Hub at {row['down_MBps']:.0f} MB/s down, {row['up_MBps']:.0f} MB/s up "
        "(`python bench/stream.py`):",
        "",
        "| run | wall (s) | CPU (s) | peak RSS (MB) | peak disk (MB) |",
        "|---|---:|---:|---:|---:|",
        f"| download only | {d['wall_s']:.1f} | {d['cpu_s']:.1f} | {d['peak_rss_mb']:.0f} | |",
        f"| merge only (local) | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_mb']:.0f} | |",
        f"| upload only | {u['wall_s']:.1f} | {u['cpu_s']:.1f} | {u['peak_rss_mb']:.0f} | |",
        f"| sequential (sum) | {row['sequential_s']:.1f} | | | |",
        f"| streaming, gate off | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_mb']:.0f} | "
        f"{s['peak_disk_mb']:.0f} |",
        *(f"| streaming, gate on, {k} | {g['wall_s']:.1f} | {g['cpu_s']:.1f} | {g['peak_rss_mb']:.0f} | "
          f"{g['peak_disk_mb']:.0f} |" for k, g in row.get("gated", {}).items()),
        "",
    ]

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    check(s["wall_s"] <= 1.2 * bound,
          f"streaming / max(download, upload) = {s['wall_s'] / bound:.2f} (target ≤ 1.2)")
    check(s["wall_s"] <= 0.6 * row["sequential_s"],
          f"streaming / sequential = {s['wall_s'] / row['sequential_s']:.2f} (target ≤ 0.6)")
    budget = s.get("budget_mb", 3 * 3 * row["largest_shard_mb"])
    check(s["peak_disk_mb"] <= budget, f"peak disk {s['peak_disk_mb']:.0f} MB ≤ the default budget "
          f"{budget:.0f} MB (3 shards in flight, each with its inputs)")
    check(s["peak_rss_mb"] <= 1.1 * m["peak_rss_mb"] + 150,
          f"peak RSS {s['peak_rss_mb']:.0f} MB streaming vs {m['peak_rss_mb']:.0f} MB local")
    check(row["identical"], "the published shards are bit-identical with the local merge (SHA-256)")
    gated = row.get("gated", {})
    for key, limit in (("parents cached", 1.15), ("parents evaluated", 1.5)):
        if key in gated:
            g = gated[key]
            ratio = g["wall_s"] / s["wall_s"]
            check(ratio <= limit, f"gated stream, {key}: {ratio:.2f}× the ungated stream (target ≤ {limit})")
            own = g.get("budget_mb", budget)  # the gate's saved point and a tied head's copy count too
            check(g["peak_disk_mb"] <= own, f"gated stream, {key}: peak disk {g['peak_disk_mb']:.0f} MB "
                  f"within its budget of {own:.0f} MB")
    return lines


if __name__ == "__main__":
    main()
