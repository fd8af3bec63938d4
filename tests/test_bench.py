"""bench/run.py's measuring and reporting parts (the benchmark itself runs with `make bench`)."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """The benchmark script ``bench/<name>.py`` as a module (with bench/ importable while it loads)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"slerp_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


bench = bench_module("run")


def test_timed_reports_the_run_s_own_peak_memory_and_times():
    grow = "import time; b = bytearray(200 << 20); b[::4096] = bytes(len(b[::4096])); time.sleep(0.2)"
    m = bench.timed([sys.executable, "-c", grow])
    assert 200 <= m["peak_rss_mb"] < 400
    assert m["wall_s"] >= 0.2 and m["cpu_s"] == pytest.approx(m["user_s"] + m["sys_s"])
    small = bench.timed([sys.executable, "-c", "pass"])
    assert small["peak_rss_mb"] < 100  # the earlier run's peak is not carried over


def test_timed_names_a_failed_command_with_the_end_of_its_stderr():
    with pytest.raises(RuntimeError, match="boom"):
        bench.timed([sys.executable, "-c", "import sys; sys.exit('boom')"])
    with pytest.raises(RuntimeError, match="no-such-merge-tool: No such file"):
        bench.timed(["no-such-merge-tool"])


def test_run_order_puts_every_system_first_once_and_varies_its_predecessor():
    systems = list(bench.SYSTEMS)
    rows = [bench.run_order(systems, rep) for rep in range(len(systems))]
    assert all(sorted(r) == sorted(systems) for r in rows)
    assert sorted(r[0] for r in rows) == sorted(systems)
    for s in systems:
        before = {r[r.index(s) - 1] for r in rows if r.index(s) > 0}
        assert len(before) > 1, s


def _row(layers: int, params_m: float, device: str, ours: list[float], floors: list[float]) -> dict:
    run = [{"wall_s": w, "cpu_s": 1.5 * w, "user_s": w, "sys_s": 0.5 * w, "peak_rss_mb": 476.0} for w in ours]
    floor = [{"floor_s": f, "read_cold_s": 0.7 * f, "read_warm_s": 0.1, "write_fsync_s": 0.3 * f}
             for f in floors]
    return {"layers": layers, "params_m": params_m, "model_gb": params_m * 2e-3, "device": device,
            "floors": floor, "runs": {"ours": run}}


def test_report_has_throughput_and_the_targets_and_goes_where_asked(tmp_path):
    results = [_row(4, 337.0, "cpu", [2.0, 2.2, 2.1], [1.5, 1.4, 1.6]),
               _row(16, 953.0, "cpu", [4.0, 4.5, 4.2, 4.4, 4.1], [3.0, 2.0, 3.2, 2.9, 3.1]),
               _row(32, 1775.0, "cpu", [8.0, 8.2, 8.1], [6.0, 6.1, 6.2])]
    bench.write_report(results, tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    # 953M: median wall 4.2 s, median floor 3.0 s; 3 × 1.906 GB moved in 4.2 s
    assert "| 953M | ours | 4.20 | 6.30 | 476 | 1.36 | – | 1.40 |" in text
    assert "- met: 953M pair, ours / I/O floor = 1.40 (target ≤ 1.5)" in text
    assert "- met: peak RSS 476 MB (0.25× pair) → 476 MB (2× pair), +0.0 %" in text
    assert "CPU only" in text and "GPU (`device: cuda`): no figures yet" in text
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_gpu_report_names_the_card(tmp_path):
    bench.write_report([_row(16, 953.0, "NVIDIA H200", [1.0, 1.1, 1.2], [0.8, 0.9, 1.0])], tmp_path)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "slerp-merge on NVIDIA H200" in text and "no figures yet" not in text
    assert "| 953M | ours | 1.10 |" in text


def test_device_label_resolves_as_the_engine_does():
    import torch

    from slerp_plugin.errors import ConfigError

    assert bench.device_label("cpu") == "cpu"
    if torch.cuda.is_available():
        assert bench.device_label(None) == torch.cuda.get_device_name(0)
    else:
        assert bench.device_label(None) == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            bench.device_label("cuda")


def test_pairs_are_built_with_the_package_s_tokenizer(tmp_path):
    sys.path.insert(0, str(Path(bench.__file__).parent))
    try:
        import make_pair
    finally:
        sys.path.pop(0)
    a, b = make_pair.build_big(tmp_path, rows=64, cols=32)
    from slerp_plugin.io.safetensors import Checkpoint

    assert Checkpoint.open(a).tensors.keys() == Checkpoint.open(b).tensors.keys() == {
        "model.embed_tokens.weight", "model.norm.weight"}
    assert (a / "tokenizer.json").is_file() and (b / "config.json").is_file()


def test_dag_parse_report_lists_every_dag_file_and_fails_over_the_limit(capsys, monkeypatch):
    pytest.importorskip("airflow")
    dag_parse = bench_module("dag_parse")
    assert dag_parse.seconds("0:01:02.500000") == 62.5
    # Airflow parses the files once; both limits judge that report
    monkeypatch.setattr(dag_parse, "parse_times", functools.cache(dag_parse.parse_times))
    assert dag_parse.main(["--limit", "1000"]) == 0
    table = set(capsys.readouterr().out.split())
    assert {"slerp_merge.py", "slerp_nightly.py", "slerp_sweep.py", "slerp_nightly_bench"} <= table
    assert dag_parse.main(["--limit", "0"]) == 1
    assert "slower than 0.0 s" in capsys.readouterr().err


def test_validate_table_gives_medians_and_the_ratio_to_the_baseline(capsys):
    validate = bench_module("validate")

    def row(cache: str, wall: float) -> dict:
        return {"model": "m", "cache": cache, "wall_s": wall, "peak_rss_mb": wall * 10, "modes": ["resident"],
                "timings": {"structural_s": 1.0, "spot_s": 2.0, "functional_s": wall - 3}}

    validate.print_table([row("baseline", 30), row("warm", 11), row("baseline", 40), row("warm", 9),
                          row("baseline", 35), row("warm", 10)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| m | baseline | 3 | 35.0 | 1.00 | 400 |")
    assert lines[3].startswith("| m | warm | 3 | 10.0 | 0.29 | 110 | 1.0 | 2.0 | 7.0 | resident |")


def test_the_baseline_runs_the_module_from_its_own_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "WORK", tmp_path)  # where the merge config is written
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    cmd = bench.command("baseline", a, b, out, "cpu")
    assert cmd[:4] == [sys.executable, "-P", "-m", "slerp_plugin"]  # -P: not this checkout's path
    assert cmd[4] == "mergekit" and cmd[-3:] == [str(out), "--device", "cpu"]
    assert "-P" not in bench.command("ours", a, b, out)


def test_dashboard_benchmark_builds_valid_runs_and_reports_its_figures(tmp_path):
    dash = bench_module("dashboard")
    dash.build(tmp_path / "tree", 12)
    from slerp_plugin.integrations.airflow.dashboard import collect

    entries, _, _ = collect([tmp_path / "tree"])
    assert len(entries) >= 12 and all(e.readable and e.validation == "passed" for e in entries)
    lines = dash.measure(tmp_path / "tree", repeats=2)
    assert lines[0].startswith(f"{len(entries)} merges") and any("rescan" in x for x in lines)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Hub to Hub streaming\n\nkept\n")
    dash.write_section(results, lines)
    dash.write_section(results, lines)  # replaced, not repeated
    text = results.read_text()
    assert text.count("## Dashboard") == 1 and "kept" in text


def test_the_cdn_benchmark_reports_rates_and_targets(tmp_path):
    cdn = bench_module("stream_cdn")

    def run(wall):
        return {"wall_s": wall, "cpu_s": 1.0, "peak_rss_mb": 100.0}
    row = {"pair": "pair-16", "weights_gb": 3.8, "shards": 20, "down_mbps": 400.0, "up_mbps": 200.0,
           "connection_mbps": 50.0, "rtt_ms": 20.0, "url_ttl": 60.0, "connections": 8, "shard": "100MB",
           "fetch": run(10.0), "snapshot_download": run(40.0), "upload": run(10.5), "stream": run(13.0),
           "resume": run(7.0), "resume_fetched_ratio": 1.02, "identical": True, "resumed_identical": True}
    lines = cdn.report_lines(row)
    assert "| our fetcher (parents' weights) | 10.0 | 0.38 | 1.0 | 100 |" in lines
    assert "- met: our fetcher at 0.950× the link (target ≥ 0.85)" in lines
    log = tmp_path / "fetch.log"
    log.write_text('a warning\n{"fetch_s": 10.0, "open_s": 0.5}\nconnections per parent: 8\n')
    assert cdn.fetcher_times(log) == {"fetch_s": 10.0, "open_s": 0.5}
    timed_inside = cdn.report_lines({**row, "fetch": {**run(12.0), "fetch_s": 10.0, "open_s": 0.5}})
    assert "- met: our fetcher at 0.950× the link (target ≥ 0.85): 10.0 s from opening the parents (their " \
           "headers: 0.5 s) to their verified hashes, timed in the process; the process's 12.0 s with the " \
           "interpreter's start and the imports give 0.792×" in timed_inside
    assert "- NOT met: streaming / max(download, upload) = 1.24 (target ≤ 1.2)" in lines
    assert "- met: killed at half and resumed: 1.020× the parents' weights fetched over both runs " \
           "(target ≤ 1.05)" in lines
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\n## Other\n\nkept\n")
    cdn.write_section(md, lines, row)
    cdn.write_section(md, lines, row)
    cdn.write_section(md, lines, {**row, "down_mbps": 100.0, "connection_mbps": 12.5})
    text = md.read_text()
    assert text.count(f"{cdn.SECTION}, 400 MB/s down, 50 MB/s per connection\n") == 1 and "kept" in text
    assert text.count(f"{cdn.SECTION}, 100 MB/s down, 12.5 MB/s per connection\n") == 1


def test_the_gated_resume_and_seed_shape_stream_reports(tmp_path, capsys):
    cdn, val = bench_module("stream_cdn"), bench_module("validate")

    def resumed(wall, merged, ratio):
        return {"pair": "pair-16", "weights_gb": 3.8, "shards": 21, "shard": "100MB", "down_mbps": 100.0,
                "up_mbps": 50.0, "connection_mbps": 12.5, "killed_after_s": 40.0, "resumed_identical": True,
                "resume": {"wall_s": wall, "cpu_s": 80.0, "peak_rss_mb": 1200.0}, "resume_merged": merged,
                "resume_fetched_ratio": ratio}
    cdn.gated_report(resumed(65.7, 8, 1.009), tmp_path, resumed(96.4, 21, 1.403))
    out = capsys.readouterr().out
    assert ("| resumed, gate on, before (every shard merged again) | 96.4 | 80.0 | 1200 | 21 of 21 | "
            "1.403× |") in out
    assert "| resumed, gate on | 65.7 | 80.0 | 1200 | 8 of 21 | 1.009× |" in out
    assert "- met: 1.009× the parents' weights fetched over both runs (target ≤ 1.05)" in out
    assert (tmp_path / "stream_cdn_gated_resume.json").is_file()

    row = {"shard": "3GB", "budget": "12GB", "wall_s": 300.0, "cpu_s": 450.0, "peak_rss_mb": 1600.0,
           "peak_disk_gb": 10.6, "passed": True,
           "perplexity": {"merged": 3.0, "model_1": 2.0, "model_2": 2.5}}
    lines = val.stream_lines(row)
    assert "| gated stream | 300.0 | 450.0 | 1600 | 10.60 | 3.00 / 2.00 / 2.50 |" in lines
    assert "- NOT met: peak RSS 1600 MB ≤ 1.5 GB at hidden 8192 and vocabulary 152064" in lines
    assert "- met: peak disk 10.60 GB within the budget of 12GB" in lines


def test_the_streaming_report_checks_each_gated_run_against_its_own_budget():
    stream = bench_module("stream")

    def run(wall, disk=None, budget=None):
        return {"wall_s": wall, "cpu_s": 1.0, "peak_rss_mb": 500.0,
                **({"peak_disk_mb": disk} if disk else {}), **({"budget_mb": budget} if budget else {})}
    row = {"pair": "pair-16", "down_MBps": 200.0, "up_MBps": 100.0, "shard": "100MB", "output_gb": 1.9,
           "largest_shard_mb": 131.0, "shards": 21, "merge": run(8.0), "download": run(22.0),
           "upload": run(22.5), "stream": run(25.0, 760.0, 1180.0), "sequential_s": 52.5, "identical": True,
           "gated": {"parents evaluated": run(50.0, 1259.0, 1300.0),
                     "parents cached": run(30.0, 1250.0, 1200.0)}}
    lines = stream.report_lines(row)
    assert "- met: peak disk 760 MB ≤ the default budget 1180 MB (3 shards in flight, each with its " \
           "inputs)" in lines
    assert "- met: gated stream, parents evaluated: peak disk 1259 MB within its budget of 1300 MB" in lines
    assert "- NOT met: gated stream, parents cached: peak disk 1250 MB within its budget of 1200 MB" in lines
    assert "- NOT met: gated stream, parents cached: 1.20× the ungated stream (target ≤ 1.15)" in lines


def test_the_hub_sweep_benchmark_reports_both_runs_against_the_link(tmp_path, capsys, monkeypatch):
    import argparse

    sweep = bench_module("sweep")

    def run(wall, ppl):
        return {"wall_s": wall, "cpu_s": 1.0, "peak_rss_mb": 800.0, "peak_disk_bytes": 9e8, "perplexity": ppl}
    ppl = {0.3: 10.0, 0.7: 12.0}
    monkeypatch.setattr(sweep, "one_pass_hub", lambda *a: {
        "down_mbps": 100.0, "parents_bytes": 3.8e9, "link_s": 38.0, "evaluated": run(55.1, ppl),
        "cached": run(48.4, ppl)})
    monkeypatch.setattr(sweep, "WORK", tmp_path)
    args = argparse.Namespace(layers=16, max_tokens=256, hub=100.0, out=tmp_path / "out")
    sweep.hub_main(tmp_path / "a", tmp_path / "b", [0.3, 0.7], args)
    out = capsys.readouterr().out
    assert "| parents from the cache | 48.4 | 1.27× | 800 | 0.90 |" in out
    assert "take 38.0 s at 100 MB/s; the perplexities of both runs are bit-identical" in out
    saved = json.loads((tmp_path / "out" / "sweep_hub.json").read_text())
    assert saved["same_perplexities"] is True and saved["cached"]["wall_s"] == 48.4
