"""The merges dashboard after years of nightly runs: 10,000 merge folders with 72B-sized manifests.

    python bench/dashboard.py [--merges 10000] [--work bench/work/dashboard] [--repeats 20]

Builds (once) ``--merges`` run folders as the Airflow DAGs leave them: a run record, and a merge
with a manifest of a Qwen-72B-sized merge (963 tensors, 37 input shards per parent) and a
validation report; every fifth run is a sweep of three merges. The files are hard links of one
manifest and one report (the dashboard reads each folder's own path; disk stays small).

It then serves the dashboard in-process (FastAPI's test client, authentication stubbed) and
measures: the first request after start (every folder read once), then ``--repeats`` requests of
the first page of ``/slerp/api/merges`` and ``/slerp/`` (medians), a filtered page, a deep page,
and the process's RSS before and after 100 more requests. The figures go under "## Dashboard" in
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SECTION = "## Dashboard"
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from results_md import replace_section  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def manifest_72b() -> dict:
    """A manifest shaped like a Qwen-72B merge's."""
    tensors = [{"name": "model.embed_tokens.weight", "shape": [152064, 8192], "dtype": "bfloat16",
                "shard": "model-00001-of-00031.safetensors", "branch": "slerp", "t": 0.5,
                "d": 0.123456789012, "norm_precision": "float64"}]
    hidden, kv, mlp = 8192, 1024, 29568
    layer_tensors = [
        ("self_attn.q_proj.weight", [hidden, hidden]), ("self_attn.k_proj.weight", [kv, hidden]),
        ("self_attn.v_proj.weight", [kv, hidden]), ("self_attn.o_proj.weight", [hidden, hidden]),
        ("self_attn.q_proj.bias", [hidden]), ("self_attn.k_proj.bias", [kv]), ("self_attn.v_proj.bias", [kv]),
        ("mlp.gate_proj.weight", [mlp, hidden]), ("mlp.up_proj.weight", [mlp, hidden]),
        ("mlp.down_proj.weight", [hidden, mlp]), ("input_layernorm.weight", [hidden]),
        ("post_attention_layernorm.weight", [hidden])]
    for layer in range(80):
        for name, shape in layer_tensors:
            tensors.append({"name": f"model.layers.{layer}.{name}", "shape": shape, "dtype": "bfloat16",
                            "shard": f"model-{layer // 3 + 1:05d}-of-00031.safetensors", "branch": "slerp",
                            "t": 0.5, "d": 0.987654321098, "norm_precision": "float64"})
    tensors += [{"name": n, "shape": s, "dtype": "bfloat16", "shard": "model-00031-of-00031.safetensors",
                 "branch": "lerp", "t": 0.5, "d": 0.99999, "norm_precision": "float64"}
                for n, s in (("model.norm.weight", [8192]), ("lm_head.weight", [152064, 8192]))]
    files = [{"name": f"model-{i:05d}-of-00037.safetensors", "size": 3_900_000_000, "sha256": "ab" * 32}
             for i in range(1, 38)]
    inputs = {role: {"ref": f"org/qwen-72b-{role}", "revision": "main", "commit": "c" * 40,
                     "path": f"/data/hf/hub/models--org--qwen-72b-{role}/snapshots/{'c' * 40}",
                     "files": files}
              for role in ("model_1", "model_2", "tokenizer")}
    return {
        "schema_version": 1, "tool": {"name": "slerp_plugin", "version": "0.1.0"},
        "created_at": "2026-01-01T00:00:00+00:00",
        "spec": {"t": 0.5, "DOT_THRESHOLD": 0.9995, "epsilon": 1e-8, "output": "/data/merges/x/merged"},
        "inputs": inputs,
        "output": {"shards": [{"file": f"model-{i:05d}-of-00031.safetensors", "size": 4_700_000_000,
                               "sha256": "ef" * 32, "tensors": 31} for i in range(1, 32)],
                   "total_size": 145_000_000_000, "dtypes": {"bfloat16": len(tensors)}},
        "tensors": tensors, "branch_counts": {"slerp": len(tensors) - 2, "lerp": 2},
        "timings": {"merge_s": 1800.0}, "resume": {"reused_shards": 0, "total_shards": 31},
        "plan_fingerprint": "f" * 64,
    }


def report() -> dict:
    return {"schema_version": 1, "model": "/data/merges/x/merged", "parents": ["a", "b"],
            "created_at": "2026-01-01T00:00:00+00:00", "passed": True, "summary": "PASSED",
            "structural": {"passed": True, "tensors": 963, "problems": []},
            "functional": {"passed": True, "status": "passed", "tokens": 1024, "problems": [],
                           "perplexity": {"merged": 5.1, "model_1": 5.3, "model_2": 5.2}}}


def build(root: Path, merges: int) -> None:
    from slerp_plugin.integrations.airflow import records
    from slerp_plugin.validate.report import ValidationReport

    ValidationReport.model_validate(report())  # the dashboard must find every report valid
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(merges):
        return
    proto = root / "_proto"
    proto.mkdir(parents=True, exist_ok=True)
    (proto / "merge_manifest.json").write_text(json.dumps(manifest_72b()))
    (proto / "validation.json").write_text(json.dumps(report()))
    made = 0
    day = 0
    while made < merges:
        day += 1
        for dag in ("slerp_nightly_a", "slerp_nightly_b", "slerp_nightly_c", "slerp_sweep"):
            if made >= merges:
                break
            run_id = f"scheduled__{2026 + day // 365}-{day % 365:03d}T03:00:00+00:00"
            folder = records.run_dir(root, dag, run_id)
            if not folder.is_dir():
                records.write_run(folder, dag, run_id)
            for k in range(3 if dag == "slerp_sweep" else 1):
                out = folder / (f"merged-t0.{2 + 3 * k}" if dag == "slerp_sweep" else "merged")
                out.mkdir(exist_ok=True)
                for name in ("merge_manifest.json", "validation.json"):
                    if not (out / name).exists():
                        os.link(proto / name, out / name)
                made += 1
    done.write_text(str(merges))


def measure(root: Path, repeats: int) -> list[str]:
    from fastapi.testclient import TestClient

    from slerp_plugin.integrations.airflow.dashboard import INDEX, create_app

    client = TestClient(create_app([root], access=lambda: (lambda ids: set(ids))))

    def timed(path: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        return time.perf_counter() - t0, len(r.content)

    cold_s, _ = timed("/api/merges")
    cold_reads = INDEX.reads
    rows = []
    for path in ("/api/merges", "/", "/api/merges?dag=slerp_sweep&t=0.5", "/api/merges?page=150"):
        runs = [timed(path) for _ in range(repeats)]
        rows.append((path, statistics.median(s for s, _ in runs), runs[-1][1]))
    from slerp_plugin.integrations.airflow.dashboard import RESCAN_S

    rescans = []
    for _ in range(repeats // 2 or 1):
        time.sleep(RESCAN_S + 0.05)  # the scan of every folder's mtime is due again
        rescans.append(timed("/api/merges")[0])
    rows.append(("/api/merges (with its rescan of all folders)", statistics.median(rescans), rows[0][2]))
    before = rss_mb()
    for _ in range(100):
        client.get("/api/merges")
    after = rss_mb()
    total = client.get("/api/merges").json()["total"]
    lines = [f"{total} merges (72B-sized manifests, 963 tensors each) under one root; in-process "
             "(FastAPI test client), authentication stubbed. Requests within "
             f"{RESCAN_S:g} s of a scan share it; a scan stats every run and merge folder and re-reads "
             "those that changed.", "",
             "| request | median (ms) | response (KB) |", "|---|---:|---:|"]
    lines += [f"| `GET {p}` | {s * 1000:.0f} | {n / 1000:.0f} |" for p, s, n in rows]
    lines += ["", f"First request after start (reads every folder once, {cold_reads} folders): "
              f"{cold_s:.1f} s. Later requests re-read only folders that changed.",
              f"API server RSS: {before:.0f} MB before and {after:.0f} MB after 100 more requests."]
    return lines


def write_section(results_md: Path, lines: list[str]) -> None:
    replace_section(results_md, SECTION, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merges", type=int, default=10_000)
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "dashboard")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    t0 = time.perf_counter()
    build(args.work, args.merges)
    print(f"tree ready in {time.perf_counter() - t0:.1f} s", flush=True)
    lines = measure(args.work, args.repeats)
    print("\n".join(lines))
    if not args.no_write:
        write_section(BENCH / "RESULTS.md", lines)


if __name__ == "__main__":
    main()
