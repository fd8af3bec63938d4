"""Pipeline steps as plain functions: resolve → download → plan → merge (shards) → finalize →
validate → publish → summary. The Airflow DAGs call exactly these; they take and return paths and
small JSON-able dicts (never tensors), and they import no Airflow.

Errors keep their types: :data:`TRANSIENT_ERRORS` (network, Hub 5xx, truncated downloads, an
interrupted merge) are worth retrying, everything else (bad config, unknown repo, failed
validation gate) is permanent — see :func:`is_transient`, which the DAGs' retry policy uses.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from ...errors import TRANSIENT_ERRORS, ConfigError, SlerpPluginError, ValidationGateError
from ...spec import MergeSpec, ModelRef
from . import records
from .records import run_dir

log = logging.getLogger(__name__)

ROLES = ("model_1", "model_2", "tokenizer")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying a failed step can help (network/Hub outages, interrupted merges)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    if isinstance(exc, SlerpPluginError):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, InterruptedError))


def _ref(value: str, revision: str | None) -> ModelRef:
    ref = ModelRef.parse(value)
    if revision:
        ref = ModelRef(ref=ref.ref, revision=revision)
    return ref


def spec_from_params(params: dict[str, Any], output: Path | str) -> MergeSpec:
    """The MergeSpec of a DAG run. Validates everything again (the UI form clamps silently).

    Raises:
        ConfigError: an invalid parameter, with a one-line message.
    """
    for key in ("model_1", "model_2"):
        if not params.get(key):
            raise ConfigError(f"{key}: missing (a Hub id org/name or a local folder)")
    tok = params.get("tokenizer") or None
    return MergeSpec.build(
        model_1=_ref(params["model_1"], params.get("model_1_revision")),
        model_2=_ref(params["model_2"], params.get("model_2_revision")),
        tokenizer=_ref(tok, params.get("tokenizer_revision")) if tok else None,
        t=params.get("t"),
        DOT_THRESHOLD=params.get("DOT_THRESHOLD", 0.9995),
        epsilon=params.get("epsilon", 1e-8),
        dtype=None if params.get("dtype") in (None, "", "auto") else params["dtype"],
        output=str(output),
        max_shard_size=params.get("max_shard_size") or "5GB",
        device=params.get("device") or "auto",
        stream=bool(params.get("stream", False)),
        disk_budget=params.get("disk_budget") or None,
        push_to_hub=(params.get("target_repo") or None) if params.get("stream") else None,
        private=bool(params.get("private", False)),
        gate=bool(params.get("validate_functional", True)),
        gate_margin=float(params.get("validation_margin", 0.10)),
    )


def _resolved(inputs: dict[str, dict]):
    from ...io.model_files import ResolvedModel

    out = {role: ResolvedModel(Path(e["path"]), e.get("commit"))
           for role, e in inputs.items() if e.get("path")}
    tok = inputs.get("tokenizer") or {}
    if tok.get("same_as") in out:
        out["tokenizer"] = out[tok["same_as"]]
    return out


def pinned(params: dict[str, Any], inputs: dict[str, dict]) -> dict[str, Any]:
    """``params`` with each Hub input's revision set to the commit :func:`resolve_inputs` pinned, so
    that every task of a run reads the same bytes."""
    out = dict(params)
    for role in ("model_1", "model_2", "tokenizer"):
        entry = inputs.get(role) or {}
        if entry.get("commit") and not entry.get("same_as"):
            out[f"{role}_revision"] = entry["commit"]
    return out


def resolve_inputs(params: dict[str, Any], output: Path | str | None = None) -> dict[str, dict]:
    """Each input's reference and, for Hub ids, the commit sha its revision points to now. With
    ``output``, the preflight too: the parents' sizes, disk and time are logged, and a merge that
    cannot fit on disk there is refused before anything is downloaded.

    Raises:
        OutputWriteError: not enough disk space (with ``output``).
        ModelNotFoundError, HubError: an input cannot be resolved.
    """
    from ...hub.client import resolve_revision
    from ...hub.sources import looks_like_hub_id

    spec = spec_from_params(params, output or "unused")
    refs = {"model_1": spec.model_1, "model_2": spec.model_2, "tokenizer": spec.tokenizer_ref}
    out = {}
    for role, ref in refs.items():
        if role == "tokenizer" and ref == spec.model_1:
            out[role] = {**out["model_1"], "role": role, "same_as": "model_1"}
            continue
        if looks_like_hub_id(ref.ref):
            commit = resolve_revision(ref.ref, ref.revision)
            out[role] = {"role": role, "ref": ref.ref, "revision": ref.revision, "commit": commit}
        else:
            if not Path(ref.ref).is_dir():
                from ...errors import ModelNotFoundError

                raise ModelNotFoundError(f"{role}: model folder not found: {ref.ref}")
            out[role] = {"role": role, "ref": ref.ref, "revision": None, "commit": None,
                         "path": str(Path(ref.ref).resolve())}
        log.info("%s: %s%s", role, ref, f" = commit {out[role]['commit']}" if out[role]["commit"] else "")
    if output is not None and spec.stream:
        from ...stream import check_stream_spec

        check_stream_spec(spec)
    elif output is not None:
        from ...preflight import require_disk
        from ...stream.evaluation import aside_estimate

        for line in require_disk(spec, aside=functools.partial(aside_estimate, spec)).lines():
            log.info("preflight: %s", line)
    return out


def download_input(entry: dict, *, weights: bool = True) -> dict:
    """Fetch one resolved input (pinned to its commit); local folders, and a tokenizer that is
    model_1's (``same_as``), pass through (the log says so)."""
    role = entry.get("role", "input")
    if entry.get("same_as"):
        log.info("%s: the same as %s, nothing to download", role, entry["same_as"])
        return dict(entry)
    if entry.get("commit") is None:
        folder = Path(entry["path"])
        files = [p for p in folder.iterdir() if p.is_file()]
        log.info("%s: local folder %s (%d files, %.1f MB), nothing to download", role, folder, len(files),
                 sum(p.stat().st_size for p in files) / 1e6)
        return dict(entry)
    from ...hub.client import download_model

    d = download_model(entry["ref"], entry["commit"], weights=weights)
    log.info("%s: %s@%s in %s", role, entry["ref"], entry["commit"][:12], d.path)
    return {**entry, "path": str(d.path)}


def stream_to_hub(params: dict[str, Any], output: str, record_dir: str | None = None,
                  output_root: str | Path | None = None) -> dict:
    """A streaming merge (``stream``) of the Hub parents straight into ``target_repo``: nothing of
    the models stays on local disk, and a retry resumes from what the Hub already holds.

    The merge is evaluated as it streams and published only if it passes the perplexity gate
    (``validate_functional``, ``validation_margin``, ``eval_max_tokens``, as the local route; the
    parents' evaluations are shared with it through the cache under ``output_root``). The manifest,
    ``validation.json`` and the upload record are kept in ``record_dir`` (for the dashboard), also
    when the gate fails; a retry after a failed gate reports the recorded verdict without merging
    again. Returns what :func:`summary` returns.

    Raises:
        ConfigError: no target repo, or a parent that is not a Hub id.
        ValidationGateError: the gate failed (now or in an earlier try).
        HubError, SlerpPluginError: as :func:`slerp_plugin.stream.stream_merge`.
    """
    from ...stream import stream_merge
    from ...validate import ValidationReport, write_report

    spec = spec_from_params(params, output)
    cache = evaluation_cache(output_root) if output_root is not None else None
    try:
        result = stream_merge(spec, settings=eval_settings(params).model_copy(update={"device": spec.device}),
                              cache=cache)
    except ValidationGateError:
        _keep_gate_records(spec.output, record_dir)
        raise
    up, man, report = result.upload, result.manifest, result.validation
    upload = _upload_record(up, None)
    validation = None
    if record_dir is not None:
        folder = Path(record_dir)
        folder.mkdir(parents=True, exist_ok=True)
        man.write(folder)
        _write_upload_record(folder, upload)
        if isinstance(report, ValidationReport):
            validation = {"passed": True, "perplexity": report.functional.perplexity,
                          "functional": report.functional.status, "report": str(write_report(report, folder))}
    if report is None:
        log.info("validation: every shard passed its spot re-computation; the perplexity gate is off "
                 "(validate_functional=false)")
    return summary({"output": f"{up.repo_id}@{up.commit[:12]}", "t": man.spec["t"],
                    "branch_counts": man.branch_counts}, validation, upload)


def _keep_gate_records(output: Path, record_dir: str | None) -> None:
    """A failed gate's manifest and report, copied where the dashboard reads the run's merge."""
    if record_dir is None:
        return
    from ...formats.manifest import MANIFEST_NAME
    from ...validate.report import REPORT_NAME, SUMMARY_NAME

    src = Path(str(output) + ".partial") / "publish"
    folder = Path(record_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_NAME, REPORT_NAME, SUMMARY_NAME):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)


def output_path(output_root: str | Path, dag_id: str, run_id: str, suffix: str = "") -> Path:
    """Where a run writes its merge: the same folder on every retry, so a retry resumes
    (``<root>/<dag_id>/<run folder>/merged<suffix>``, see :mod:`.records`)."""
    return run_dir(output_root, dag_id, run_id) / f"merged{suffix}"


def plan_groups(
    params: dict[str, Any], inputs: dict[str, dict], output: str, workers: int = 1
) -> list[list[int]]:
    """The output shards split into ``workers`` groups, for mapped merge tasks; the output is
    prepared for them (an unfinished merge of a different plan discarded, waiting for any attempt
    still holding the output)."""
    from ...engine import plan_resolved, prepare

    plan = plan_resolved(spec_from_params(params, output), _resolved(inputs))
    prepare(plan, wait=True)
    n = len(plan.shards)
    workers = max(1, min(workers, n))
    groups = [list(range(i, n, workers)) for i in range(workers)]
    log.info("t=%s: %d output shard(s) in %d group(s)", plan.spec.t, n, len(groups))
    return groups


def merge_group(params: dict[str, Any], inputs: dict[str, dict], output: str, indices: list[int]) -> dict:
    """Merge some output shards (resuming: finished shards are verified and reused). A retry that
    finds an orphaned attempt still writing a shard waits for it instead of racing it."""
    from ...engine import merge_shards, plan_resolved

    spec = spec_from_params(params, output)
    log.info("merging shards %s with t=%s (DOT_THRESHOLD=%s, epsilon=%s)", indices, spec.t,
             spec.DOT_THRESHOLD, spec.epsilon)
    outcomes = merge_shards(plan_resolved(spec, _resolved(inputs)), indices, wait=True)
    reused = sum(o.reused for o in outcomes)
    log.info("merged %d shard(s); %d reused from an earlier attempt", len(outcomes), reused)
    return {"shards": len(outcomes), "reused": reused}


def finalize_merge(params: dict[str, Any], inputs: dict[str, dict], output: str) -> dict:
    """Write index, configs, tokenizer, manifest and card; publish the folder by one rename (once
    every merge worker, orphaned attempts included, has let go of the output)."""
    from ...engine import finalize, plan_resolved

    result = finalize(plan_resolved(spec_from_params(params, output), _resolved(inputs)), wait=True)
    man = result.manifest
    return {"output": str(result.output), "t": man.spec["t"], "branch_counts": man.branch_counts}


def merge_all(params: dict[str, Any], inputs: dict[str, dict], output: str) -> dict:
    """Plan, merge every shard and finalize in one step (single-worker path)."""
    merge_group(params, inputs, output, [i for g in plan_groups(params, inputs, output) for i in g])
    return finalize_merge(params, inputs, output)


def eval_settings(params: dict[str, Any]):
    """The evaluation settings of a run's parameters (``eval_max_tokens``, default 512)."""
    from ...validate import EvalSettings

    return EvalSettings(max_tokens=int(params.get("eval_max_tokens", 512)))


def evaluation_cache(output_root: str | Path):
    """The evaluation cache every worker shares: ``<output root>/.evaluations``."""
    from ...validate import EvaluationCache

    return EvaluationCache(Path(output_root) / ".evaluations")


def evaluate_parents(inputs: dict[str, dict], params: dict[str, Any], output_root: str | Path) -> dict:
    """Both parents' perplexities into the shared cache, once for every merge that follows (a
    sweep); nothing when functional validation is off. Returns role → perplexity."""
    from ...validate import evaluate_parents as evaluate

    if not params.get("validate_functional", True):
        log.info("functional validation is off: the parents are not evaluated")
        return {}
    parents = (Path(inputs["model_1"]["path"]), Path(inputs["model_2"]["path"]))
    tokenizer = Path((inputs.get("tokenizer") or inputs["model_1"])["path"])
    evals = evaluate(parents, tokenizer, eval_settings(params), evaluation_cache(output_root))
    return {role: ev.perplexity for role, ev in evals.items()}


def validate_output(output: str, inputs: dict[str, dict], params: dict[str, Any],
                    output_root: str | Path | None = None) -> dict:
    """Validate the merge against its parents; write validation.json. Parents' evaluations come
    from the cache under ``output_root`` when given.

    Raises:
        ValidationGateError: the gate failed (the report is written first).
    """
    from ...validate import validate_merge, write_report

    skip = None if params.get("validate_functional", True) else "disabled in the run's parameters"
    report = validate_merge(
        output, (inputs["model_1"]["path"], inputs["model_2"]["path"]), skip_functional=skip,
        margin=float(params.get("validation_margin", 0.10)), settings=eval_settings(params),
        cache=evaluation_cache(output_root) if output_root is not None else None,
    )
    write_report(report)
    log.info("validation:\n%s", report.summary)
    if not report.passed:
        problems = (report.structural.problems + (report.spot.problems if report.spot else [])
                    + report.functional.problems)
        raise ValidationGateError(report.summary.splitlines()[0] + ": " + "; ".join(problems)[:500])
    return {
        "passed": True,
        "perplexity": report.functional.perplexity,
        "functional": report.functional.status,
        "report": str(Path(output) / "validation.json"),
    }


def publish(output: str, target_repo: str | None, private: bool = False) -> dict:
    """Upload the merge to ``target_repo`` (None/empty: don't publish; ``published`` is False)."""
    if not target_repo:
        log.info("no target repo: the merge stays at %s", output)
        return {"published": False, "output": output}
    from ...hub.client import upload_folder

    record = _upload_record(upload_folder(output, target_repo, private=private), output)
    _write_upload_record(Path(output), record)
    return record


def _upload_record(up, output: str | None) -> dict:
    """What a publish returns and the dashboard reads: repo, commit, URL, whether it is new."""
    return {"published": True, "repo": up.repo_id, "commit": up.commit, "url": up.url,
            "new_commit": up.new_commit, "output": output}


def _write_upload_record(folder: Path, record: dict) -> None:
    from ...hub.client import UPLOAD_RECORD
    from ...io.atomic import write_json_atomic

    write_json_atomic(folder / UPLOAD_RECORD, record)  # for the dashboard; not uploaded


def summary(merge: dict, validation: dict | None, upload: dict | None) -> dict:
    """One dict for the run's log and XCom: where the merge is, its t, perplexities, the commit."""
    out = {
        "output": merge["output"], "t": merge["t"], "branch_counts": merge["branch_counts"],
        "validation": validation, "upload": upload,
    }
    lines = [f"merged model: {merge['output']} (t={merge['t']})"]
    if validation:
        ppl = validation.get("perplexity") or {}
        if ppl:
            lines.append("perplexity: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        lines.append(f"report: {validation['report']}")
    lines.append(f"published: {upload['url']}" if upload and upload.get("published") else "not published")
    log.info("\n".join(lines))
    return out


# --------------------------------------------------------------------------- sweeps


def best_of_sweep(results: list[dict]) -> dict:
    """The sweep entry with the lowest merged perplexity, and the perplexity-vs-t table.

    Raises:
        ValidationGateError: no entry passed validation.
    """
    ok = [r for r in results if r.get("validation") and r["validation"].get("passed")]
    if not ok:
        raise ValidationGateError("no t value of the sweep passed validation")

    def ppl(r: dict) -> float:
        return (r["validation"].get("perplexity") or {}).get("merged", math.inf)

    best = min(ok, key=ppl)
    rows = ["| t | merged ppl | passed |", "|---|---|---|"]
    for r in sorted(results, key=lambda r: r["t"]):
        v = r.get("validation") or {}
        rows.append(f"| {r['t']} | {(v.get('perplexity') or {}).get('merged', float('nan')):.3f} | "
                    f"{'yes' if v.get('passed') else 'no'} |")
    table = "\n".join(rows)
    log.info("sweep (best t=%s):\n%s", best["t"], table)
    return {**best, "table": table, "sweep": [{"t": r["t"], "output": r["output"],
                                               "perplexity": (r.get("validation") or {}).get("perplexity")}
                                              for r in results]}


def merge_and_validate(params: dict[str, Any], inputs: dict[str, dict], output: str,
                       output_root: str | Path | None = None) -> dict:
    """One sweep point: merge and validate (parents from the cache under ``output_root``); a
    failed gate is recorded, not raised."""
    result = merge_all(params, inputs, output)
    try:
        validation = validate_output(result["output"], inputs, params, output_root)
    except ValidationGateError as e:
        validation = {"passed": False, "error": str(e), "perplexity": _report_ppl(result["output"])}
    return {**result, "validation": validation}


def _report_ppl(output: str) -> dict:
    from ...validate import ValidationReport

    try:
        return ValidationReport.read(output).functional.perplexity
    except (OSError, ValueError):
        return {}


def sweep_mode(params: dict[str, Any], inputs: dict[str, dict]) -> str:
    """``one-pass`` or ``merge-each``: the ``sweep_mode`` parameter, or with ``auto`` (the
    default) one-pass when the parents' weights together exceed ``one_pass_above_gb`` (default 20)."""
    mode = params.get("sweep_mode") or "auto"
    if mode in ("one-pass", "merge-each"):
        return mode
    if mode != "auto":
        raise ConfigError(f"sweep_mode: {mode!r} is not auto, one-pass or merge-each")
    from ...preflight import parent_size

    size = 0
    for role in ("model_1", "model_2"):
        e = inputs[role]
        ref = ModelRef(ref=e["path"]) if e.get("path") else ModelRef(ref=e["ref"], revision=e.get("commit"))
        size += parent_size(role, ref).size
    limit = float(params.get("one_pass_above_gb", 20)) * 1e9
    chosen = "one-pass" if size > limit else "merge-each"
    log.info("sweep: the parents hold %.1f GB of weights: %s (one pass above %.1f GB)", size / 1e9, chosen,
             limit / 1e9)
    return chosen


def sweep_in_one_pass(params: dict[str, Any], inputs: dict[str, dict], run_folder: str,
                      output_root: str | Path) -> dict:
    """Every t of ``t_values`` evaluated in one pass (:func:`slerp_plugin.sweep.run_sweep`), Hub
    parents read by range at the commits ``inputs`` pinned (nothing downloaded); the report goes to
    ``<run folder>/sweep`` and the choice to the run's sweep record.

    Raises:
        ValidationGateError: no t passed the gate (the record and report are written first).
    """
    from ...sweep import run_sweep
    from ...sweep.values import check_t_values

    ts = check_t_values(float(t) for t in params["t_values"])
    spec = spec_from_params({**pinned(params, inputs), "t": ts[0], "stream": False},
                            Path(run_folder) / "merged")
    result = run_sweep(spec, ts, report=Path(run_folder) / "sweep", settings=eval_settings(params),
                       margin=float(params.get("validation_margin", 0.10)),
                       cache=evaluation_cache(output_root), resolved=_resolved(inputs))
    points = [{"t": p.t, "perplexity": p.perplexity, "passed": p.status == "passed"} for p in result.points]
    records.write_sweep(
        Path(run_folder), result.best_t, None, mode="one-pass", report=result.report, points=points,
        parents={r: e.perplexity for r, e in result.parents.items()}, eval_tokens=result.tokens,
        eval_text=result.eval_text)
    table = "\n".join(result.lines())
    log.info("sweep in one pass:\n%s", table)
    if not result.passed:
        raise ValidationGateError(f"no t value of the sweep passed the gate (report: {result.report})")
    return {"t": result.best_t, "report": result.report, "table": table}


def merge_chosen(params: dict[str, Any], inputs: dict[str, dict], t: float, output: str,
                 output_root: str | Path, record_dir: str) -> dict:
    """The one-pass sweep's chosen ``t``, the only model the sweep makes, from the parents the sweep
    read (the commits ``inputs`` pinned). With ``stream`` it is streamed from the Hub parents to
    ``target_repo`` behind the gate (whose parents' figures come from the sweep's cache) and the
    result carries its ``upload``; otherwise the parents are downloaded, merged and validated here
    and :func:`publish` uploads it. ``record_dir``: where a streamed merge's records go.

    Raises:
        ValidationGateError: the merge failed its gate (a streamed one publishes nothing).
        ConfigError, HubError, SlerpPluginError: as the merge.
    """
    params = {**pinned(params, inputs), "t": t}
    if params.get("stream"):
        return stream_to_hub(params, output, record_dir=record_dir, output_root=output_root)
    local = {role: download_input(entry, weights=role != "tokenizer") for role, entry in inputs.items()}
    return best_of_sweep([merge_and_validate(params, local, output, output_root)])


# --------------------------------------------------------------------------- nightly


def record_latest(dag_root: str | Path, output: str) -> None:
    """Remember ``output`` as the last published merge of a nightly DAG (for unpublished recipes)."""
    path = Path(dag_root) / "LATEST"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("LATEST.tmp")
    tmp.write_text(str(output))
    tmp.replace(path)


def latest_output(dag_root: str | Path) -> str | None:
    path = Path(dag_root) / "LATEST"
    return path.read_text().strip() if path.is_file() else None


def last_published_manifest(target_repo: str | None, local_output: str | None = None) -> dict | None:
    """The manifest of the last published merge (from the Hub repo, else a local output), or None."""
    if target_repo:
        from ...hub.client import fetch_file

        text = fetch_file(target_repo, "merge_manifest.json")
        if text is not None:
            import json

            return json.loads(text)
    if local_output and (Path(local_output) / "merge_manifest.json").is_file():
        import json

        return json.loads((Path(local_output) / "merge_manifest.json").read_text())
    return None


def parents_changed(resolved: dict[str, dict], last_manifest: dict | None, t: Any) -> dict:
    """Compare the parents' current commits (and t) with the last published merge.

    Returns ``{"changed": bool, "reason": str}``; local parents count as changed when their
    files' checksums differ.
    """
    if last_manifest is None:
        return {"changed": True, "reason": "no earlier merge published"}
    inputs = last_manifest.get("inputs", {})
    for role in ("model_1", "model_2"):
        now, before = resolved[role], inputs.get(role, {})
        if now.get("commit"):
            if before.get("commit") != now["commit"]:
                return {"changed": True, "reason": f"{role} {now['ref']} moved to {now['commit'][:12]}"}
            continue
        from ...io.hashing import cached_sha256
        from ...io.model_files import model_files

        folder = Path(now["path"])
        current = {str(f.relative_to(folder)): cached_sha256(f) for f in model_files(folder)}
        if current != {f["name"]: f["sha256"] for f in before.get("files", [])}:
            return {"changed": True, "reason": f"{role} ({now['ref']}) files changed"}
    if last_manifest.get("spec", {}).get("t") != t:
        return {"changed": True, "reason": "t changed"}
    return {"changed": False, "reason": "parents unchanged since the last published merge"}


__all__ = [
    "ConfigError", "ValidationGateError", "is_transient", "spec_from_params", "resolve_inputs",
    "download_input", "output_path", "plan_groups", "merge_group", "finalize_merge", "merge_all",
    "stream_to_hub", "validate_output", "publish", "summary", "best_of_sweep", "last_published_manifest",
    "parents_changed",
]
