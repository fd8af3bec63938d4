"""Benchmark of Hub transfers against a test Hub that behaves like the real one behind its CDN.

    python bench/stream_cdn.py [--layers 16] [--down-mbps 400] [--up-mbps 200]
                               [--connection-mbps 50] [--rtt-ms 20] [--url-ttl 60] [--shard 100MB]
                               [--storage lfs|xet]

The Hub test server (tests/hub_server.py, a process of its own on 127.0.0.1) limits the link to
``--down-mbps`` / ``--up-mbps`` MB/s, each download connection to ``--connection-mbps``, waits
``--rtt-ms`` before each answer, and answers each weight file's ``resolve`` with a 302 to a signed
URL on a second origin that expires after ``--url-ttl`` seconds. With ``--storage xet`` the server
also runs its Xet storage and huggingface_hub uploads and downloads through hf_xet (its xorb transfers
under the same limits); our fetcher still reads ``resolve`` ranges, as the Hub serves Xet files too.
Measured, each in a fresh process:

- fetch: every parent byte fetched by the streaming merge's own fetcher (``fetch_spool``, with
  ``method.connections``), spool files deleted as they fill: "our fetcher";
- snapshot_download: both parents downloaded by huggingface_hub (``download_model``), side by side;
- upload only: a local merge of the same pair at t = 0.3 uploaded (``upload_folder``): as large as
  the stream's output, and new to the Hub and to hf_xet's cache (uploading the stream's own bytes
  first would let Xet's deduplication skip the stream's uploads);
- streaming: ``method.stream=true method.gate=false`` end to end;
- resume: the same stream killed (SIGKILL) once half of its shards are on the Hub, then run again;
  the weight bytes the server sent over both runs, against the parents' weights.

With ``--gated-resume`` only the resume is measured, with the gate on (all three models evaluated,
no cached evaluation): how many shards the second run merged again, and the bytes fetched over
both runs; it goes under a heading of its own.

Writes DIR/stream_cdn.json and prints a markdown table (default DIR: bench/results); the default run
puts it in RESULTS.md under its own heading.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from results_md import replace_section  # noqa: E402
from run import timed  # noqa: E402
from stream import CLI, pair_and_scratch, python, python_out, same_shards, test_hub  # noqa: E402

RESULT = "stream_cdn.json"
SECTION = "## Hub to Hub through a CDN-like Hub"

FETCH = """
import json, sys, tempfile, time
from pathlib import Path
from slerp_plugin.hub.connections import Connections
from slerp_plugin.spec import MergeSpec
from slerp_plugin.stream import open_remote
from slerp_plugin.stream.spool import PIECE_BYTES, SHARDS_AT_ONCE, ParentHashes, ShardFetches, spool_shard
began = time.perf_counter()  # after the interpreter's start and the imports (torch's among them)
spec = MergeSpec.build(model_1="bench/parent-a", model_2="bench/parent-b", t=0.5, output=sys.argv[1],
                       max_shard_size=sys.argv[2], connections=sys.argv[3])
conns = Connections(spec.connections, PIECE_BYTES)  # one for the run, as the stream's
with tempfile.TemporaryDirectory() as tmp:
    plan, parents = open_remote(spec, Path(tmp), execution=False)  # file order, as an ungated stream
    opened = time.perf_counter()
    hashes = ParentHashes(parents)
    with ShardFetches(parents, hashes, connections=conns) as fetches:  # as the stream's fetch stage
        for shard in plan.shards:
            if fetches.pending == SHARDS_AT_ONCE:
                fetches.finish().remove()
            fetches.start(spool_shard(shard, Path(tmp))[1])
        while fetches.pending:
            fetches.finish().remove()
    hashes.verify()
print("connections per parent:", conns.level, file=sys.stderr)
print(json.dumps({"fetch_s": time.perf_counter() - began, "open_s": opened - began}))
"""


CHECK_TENSORS = """
import json, shutil
from pathlib import Path
from huggingface_hub import snapshot_download
from safetensors import safe_open
got = Path(snapshot_download({repo!r}, cache_dir={dest!r}))
def tensors(folder):
    out = {{}}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({{k: st.get_tensor(k) for k in st.keys()}})
    return out
a, b = tensors({local!r}), tensors(got)
same = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                    and a[k].view(-1).view(dtype=__import__("torch").uint8).equal(
                                        b[k].view(-1).view(dtype=__import__("torch").uint8)) for k in a)
reused = json.loads((got / "merge_manifest.json").read_text())["resume"]["reused_shards"]
shutil.rmtree({dest!r})
print(json.dumps({{"identical": same, "reused": reused}}))
"""


def control(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if body is not None else "GET")
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


def stream_cmd(out: Path, name: str, common: list[str], gate: bool = False) -> list[str]:
    return [*CLI, "modelpool.models.model_1=bench/parent-a", "modelpool.models.model_2=bench/parent-b",
            "modelpool.tokenizer=bench/parent-a", f"method.model_save_path={out}", *common,
            "method.stream=true", f"method.gate={str(gate).lower()}", f"+push_to_hub=bench/{name}"]


def chosen_connections(log: Path) -> int | None:
    """The GETs per parent a run's log says it settled on (with ``auto``), if it says."""
    found = re.findall(r"(?:fetching over|connections per parent:) (\d+)", log.read_text(errors="replace"))
    return int(found[-1]) if found else None


def fetcher_times(log: Path) -> dict:
    """The fetch's own seconds its log reports (``fetch_s``: opening the parents to their verified
    hashes, without the interpreter's start and imports; ``open_s``: opening them)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"fetch_s"')]
    return json.loads(lines[-1]) if lines else {}


def killed_at_half(cmd: list[str], out: Path, shards: int, env: dict, log: Path) -> float:
    """Run ``cmd`` until half of its shards are uploaded, then SIGKILL it; seconds it ran."""
    marks = out.with_name(out.name + ".partial") / ".slerp_state" / "shards"
    started = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and len(list(marks.glob("*.hub.json"))) < shards // 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--down-mbps", type=float, default=400.0)
    ap.add_argument("--up-mbps", type=float, default=200.0)
    ap.add_argument("--connection-mbps", type=float, default=50.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--url-ttl", type=float, default=60.0)
    ap.add_argument("--connections", default="auto", help="method.connections (1-64 or auto)")
    ap.add_argument("--shard", default="100MB", help="method.max_shard_size")
    ap.add_argument("--storage", choices=("lfs", "xet"), default="lfs",
                    help="how the test Hub stores large files")
    ap.add_argument("--gated-resume", action="store_true", help="only the resume, with the gate on")
    ap.add_argument("--baseline", type=Path, help="with --gated-resume: the JSON another checkout's run "
                    "wrote (PYTHONPATH=CHECKOUT ... --out DIR), shown as a row of its own")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    a, b, work = pair_and_scratch(args.layers, "stream-cdn")
    common = [f"method.max_shard_size={args.shard}", "method.t=0.5", f"method.connections={args.connections}"]
    local = work / "local"
    timed([*CLI, f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}", f"modelpool.tokenizer={a}",
           f"method.model_save_path={local}", *common[:2]])
    other = work / "local-t0.3"  # what "upload only" sends: as large, but bytes no one uploaded yet
    timed([*CLI, f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}", f"modelpool.tokenizer={a}",
           f"method.model_save_path={other}", common[0], "method.t=0.3"])
    weights = sum(f.stat().st_size for d in (a, b) for f in d.glob("*.safetensors"))
    shards = len(json.loads((local / "merge_manifest.json").read_text())["output"]["shards"])

    with test_hub(work, (a, b), xet=args.storage == "xet") as (url, env):
        control(url, "/_test/bandwidth", {"down": args.down_mbps * 1e6, "up": args.up_mbps * 1e6,
                                          "per_connection": args.connection_mbps * 1e6,
                                          "latency": args.rtt_ms / 1e3, "redirect_ttl": args.url_ttl})
        row: dict = {"pair": f"pair-{args.layers}", "weights_gb": weights / 1e9, "shards": shards,
                     **{k: getattr(args, k) for k in ("down_mbps", "up_mbps", "connection_mbps", "rtt_ms",
                                                      "url_ttl", "connections", "shard", "storage")}}
        if args.gated_resume:
            env = {**env, "SLERP_PLUGIN_CACHE": str(work / "eval-cache")}
            row.update(resumed(url, env, work, common, shards, weights, local, gate=True))
            gated_report(row, args.out, json.loads(args.baseline.read_text()) if args.baseline else None)
            return
        row["fetch"] = timed([sys.executable, "-c", FETCH, str(work / "fetch"), args.shard,
                              str(args.connections)], env=env, stderr_to=work / "fetch.log")
        row["fetch_connections"] = chosen_connections(work / "fetch.log")
        row["fetch"].update(fetcher_times(work / "fetch.log"))
        print("fetch", row["fetch"], flush=True)
        row["snapshot_download"] = python(
            "from slerp_plugin.hub.client import download_model as d; d('bench/parent-a'); "
            "d('bench/parent-b')",
            {**env, "HF_HUB_CACHE": str(work / "download-only")})
        shutil.rmtree(work / "download-only")
        print("snapshot_download", row["snapshot_download"], flush=True)
        row["upload"] = python(f"from slerp_plugin.hub.client import upload_folder as up; "
                               f"up({str(other)!r}, 'bench/upload-only')", env)
        print("upload", row["upload"], flush=True)
        row["stream"] = timed(stream_cmd(work / "streamed", "streamed", common), env=env,
                              stderr_to=work / "streamed.log")
        row["stream_connections"] = chosen_connections(work / "streamed.log")
        row["identical"] = same_shards(local, "bench/streamed", env)
        print("stream", row["stream"], flush=True)
        row.update(resumed(url, env, work, common, shards, weights, local))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / (RESULT if args.storage == "lfs" else f"stream_cdn_{args.storage}.json")).write_text(
        json.dumps(row, indent=2))
    lines = report_lines(row)
    print("\n".join(lines))
    if args.out == BENCH / "results":
        write_section(BENCH / "RESULTS.md", lines, row)


def resumed(url: str, env: dict, work: Path, common: list[str], shards: int, weights: int, local: Path, *,
            gate: bool = False) -> dict:
    """A stream killed at half its shards and run again: its figures, the bytes fetched over both
    runs (against the parents' ``weights``), the shards the second run merged."""
    before = control(url, "/_test/stats")["weight_bytes_sent"]
    name = "resumed-gated" if gate else "resumed"
    cmd = stream_cmd(work / name, name, common, gate=gate)
    row = {"killed_after_s": killed_at_half(cmd, work / name, shards, env, work / f"{name}-1.log")}
    row["resume"] = timed(cmd, env=env, stderr_to=work / f"{name}-2.log")
    row["resume_fetched_ratio"] = (control(url, "/_test/stats")["weight_bytes_sent"] - before) / weights
    if gate:  # shards in the order the model runs: the same tensors as the local merge, other files
        found = json.loads(python_out(CHECK_TENSORS.format(local=str(local), repo=f"bench/{name}",
                                                           dest=str(work / "check")), env))
        row["resume_merged"] = shards - found["reused"]
        row["resumed_identical"] = found["identical"]
    else:
        row["resumed_identical"] = same_shards(local, f"bench/{name}", env)
    print("resume", row["resume"], row["resume_fetched_ratio"], row.get("resume_merged", ""), flush=True)
    return row


def gated_report(row: dict, out: Path, baseline: dict | None = None) -> None:
    """Print (and with the default ``out``, put in RESULTS.md) the gated resume's figures, with
    those of a ``baseline`` run of another checkout when given."""
    def table_row(what: str, found: dict) -> str:
        r = found["resume"]
        return (f"| {what} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{found['resume_merged']} of {found['shards']} | {found['resume_fetched_ratio']:.3f}× |")

    lines = [
        f"{row['pair']} ({row['weights_gb']:.2f} GB of parents, {row['shards']} shards of ≤ {row['shard']}); "
        f"the CDN-like test Hub at {row['down_mbps']:.0f} MB/s down, {row['up_mbps']:.0f} MB/s up, "
        f"≤ {row['connection_mbps']:.0f} MB/s per connection; the gate on 1024 tokens, all three models "
        f"evaluated; killed (SIGKILL) once half the shards were on the Hub, after "
        f"{row['killed_after_s']:.1f} s (`python bench/stream_cdn.py --gated-resume`):",
        "",
        "| run | wall (s) | CPU (s) | peak RSS (MB) | shards merged | parents' weights fetched, both runs |",
        "|---|---:|---:|---:|---:|---:|",
        *([table_row("resumed, gate on, before (every shard merged again)", baseline)] if baseline else []),
        table_row("resumed, gate on", row),
        "",
        f"- {'met' if row['resume_fetched_ratio'] <= 1.05 else 'NOT met'}: "
        f"{row['resume_fetched_ratio']:.3f}× the parents' weights fetched over both runs (target ≤ 1.05)",
        "- the second run neither fetched nor merged the shards before the first one the gate's evaluation "
        "still needed (its saved point); it merged the others and uploaded those merged but not uploaded",
        f"- {'met' if row['resumed_identical'] else 'NOT met'}: the published tensors are bit-identical with "
        "the local merge's (the gate orders shards as the model runs: compared tensor by tensor)",
    ]
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "stream_cdn_gated_resume.json").write_text(json.dumps(row, indent=2))
    if out == BENCH / "results":
        replace_section(BENCH / "RESULTS.md", "## A gated stream killed at half and resumed", lines)


def report_lines(row: dict) -> list[str]:
    """The markdown table and targets of one run."""
    f, d, u, s = row["fetch"], row["snapshot_download"], row["upload"], row["stream"]
    gb = row["weights_gb"]
    link = row["down_mbps"] / 1e3
    lines = [
        f"{row['pair']} ({gb:.2f} GB of parents, {row['shards']} shards of ≤ {row['shard']}); test Hub at "
        f"{row['down_mbps']:.0f} MB/s down, {row['up_mbps']:.0f} MB/s up, each connection ≤ "
        f"{row['connection_mbps']:.0f} MB/s, {row['rtt_ms']:.0f} ms per request, 302 to URLs valid "
        f"{row['url_ttl']:.0f} s; {row.get('storage', 'lfs').upper()} storage; method.connections="
        f"{row['connections']}{settled(row)} (`python bench/stream_cdn.py --storage "
        f"{row.get('storage', 'lfs')}`):",
        "",
        "| run | wall (s) | GB/s | CPU (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
        f"| our fetcher (parents' weights) | {f['wall_s']:.1f} | {gb / f['wall_s']:.2f} | {f['cpu_s']:.1f} | "
        f"{f['peak_rss_mb']:.0f} |",
        f"| huggingface_hub snapshot_download | {d['wall_s']:.1f} | {gb / d['wall_s']:.2f} | "
        f"{d['cpu_s']:.1f} | {d['peak_rss_mb']:.0f} |",
        f"| upload only | {u['wall_s']:.1f} | | {u['cpu_s']:.1f} | {u['peak_rss_mb']:.0f} |",
        f"| streaming, gate off | {s['wall_s']:.1f} | | {s['cpu_s']:.1f} | {s['peak_rss_mb']:.0f} |",
        f"| resumed after a kill at half the shards | {row['resume']['wall_s']:.1f} | | "
        f"{row['resume']['cpu_s']:.1f} | {row['resume']['peak_rss_mb']:.0f} |",
        "",
    ]

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text}")

    own = f.get("fetch_s", f["wall_s"])
    how = (f": {own:.1f} s from opening the parents (their headers: {f.get('open_s', 0):.1f} s) to their "
           f"verified hashes, timed in the process; the process's {f['wall_s']:.1f} s with the interpreter's "
           f"start and the imports give {gb / f['wall_s'] / link:.3f}×" if "fetch_s" in f else "")
    check(gb / own >= 0.85 * link, f"our fetcher at {gb / own / link:.3f}× the link (target ≥ 0.85){how}")
    check(f["wall_s"] <= d["wall_s"],
          f"our fetcher {f['wall_s']:.1f} s vs snapshot_download {d['wall_s']:.1f} s (side by side)")
    bound = max(f["wall_s"], u["wall_s"])
    check(s["wall_s"] <= 1.2 * bound, f"streaming / max(download, upload) = {s['wall_s'] / bound:.2f} "
          "(target ≤ 1.2)")
    check(row["resume_fetched_ratio"] <= 1.05, f"killed at half and resumed: "
          f"{row['resume_fetched_ratio']:.3f}× the parents' weights fetched over both runs (target ≤ 1.05)")
    check(row["identical"] and row["resumed_identical"],
          "the published shards are bit-identical with the local merge (SHA-256), both runs")
    return lines


def settled(row: dict) -> str:
    """What ``auto`` settled on, as a note for the heading line."""
    keys = (("fetcher", "fetch_connections"), ("stream", "stream_connections"))
    chosen = [f"{what} {row[key]}" for what, key in keys if row.get(key)]
    return f" (settled per parent: {', '.join(chosen)})" if chosen else ""


def write_section(results_md: Path, lines: list[str], row: dict) -> None:
    """Put ``lines`` in RESULTS.md under :data:`SECTION` and the run's link rates (one section per
    setting), replacing an earlier one."""
    heading = f"{SECTION}, {row['down_mbps']:g} MB/s down, {row['connection_mbps']:g} MB/s per connection"
    if str(row.get("connections")) == "auto":
        heading += ", connections auto"
    if row.get("storage", "lfs") != "lfs":
        heading += f", {row['storage'].upper()}"
    replace_section(results_md, heading, lines)


if __name__ == "__main__":
    main()
