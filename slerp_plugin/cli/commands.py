"""The subcommands of ``slerp-merge``: ``plan``, ``mergekit``, ``validate``, ``sweep``, ``upload``,
``demo-models``.

Each takes its argument list and returns the exit status; errors are raised as
:class:`~slerp_plugin.errors.SlerpPluginError` and reported by :func:`slerp_plugin.cli.main.main`.
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path

from ..errors import ConfigError
from .process import cyclic_gc_paused

PROG = "slerp-merge"


def setup_logging() -> None:
    from .process import quiet_http_logs

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    quiet_http_logs()


def demo_models(argv: list[str]) -> int:
    """``slerp-merge demo-models DIR``: build the demo model pair."""
    from ..demo.pair import main

    return main(argv)


def plan(argv: list[str]) -> int:
    """``slerp-merge plan [--config-path D --config-name N] [overrides]``: what the merge needs
    (parents' sizes, disk, memory, time at the given bandwidths); exit 0, or 5 when a local merge
    would not fit on disk."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} plan",
        description="Preflight of a merge given as for the merge itself (seed config and overrides): "
        "the parents' sizes, the disk and memory it needs, and the time expected. Downloads nothing.",
    )
    parser.add_argument("--download-bandwidth", default="100MB", metavar="SIZE",
                        help="bytes per second from the Hub (default 100MB)")
    parser.add_argument("--upload-bandwidth", default="50MB", metavar="SIZE",
                        help="bytes per second to the Hub (default 50MB)")
    parser.add_argument("--connection-bandwidth", default=None, metavar="SIZE",
                        help="bytes per second one connection may carry (CDNs limit each; default: only "
                        "the link limits)")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args, rest = parser.parse_known_args(argv)
    from ..preflight import estimate
    from ..spec import parse_size
    from ..stream.evaluation import aside_estimate
    from .hydra_app import compose_spec

    try:
        down, up = parse_size(args.download_bandwidth), parse_size(args.upload_bandwidth)
        per = parse_size(args.connection_bandwidth) if args.connection_bandwidth else None
    except ValueError as e:
        raise ConfigError(f"bandwidth: {e}") from e
    spec = compose_spec(rest)
    est = estimate(spec, download_bps=down, upload_bps=up, connection_bps=per,
                   aside=functools.partial(aside_estimate, spec))
    if args.json:
        import json

        print(json.dumps(est.as_record(), indent=1))
    else:
        print("\n".join(est.lines()))
    return 5 if est.problems or est.unwritable else 0


def mergekit(argv: list[str]) -> int:
    """``slerp-merge mergekit CONFIG OUT``: a mergekit YAML on the streaming engine."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} mergekit",
        description="Run a mergekit merge YAML (merge_method: slerp_for_causal_lm or slerp) "
        "with the streaming engine.",
    )
    parser.add_argument("config", type=Path, help="mergekit merge YAML")
    parser.add_argument("out_path", type=Path, help="output folder (must not exist)")
    parser.add_argument("--max-shard-size", default="5GB", help="bytes per output shard (default 5GB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier merge in the output folder")
    parser.add_argument("--show-pbar", action="store_true", help="progress bar even without a terminal")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU compute threads (default: usable CPUs - 2, at least 1)")
    parser.add_argument("--buffered-io", action="store_true",
                        help="read and write through the page cache instead of O_DIRECT")
    parser.add_argument("--buffer-memory", default="192MB",
                        help="input block buffers; tensors that fit stay in memory between the passes "
                             "(default 192MB)")
    args = parser.parse_args(argv)
    from .process import merge_process

    with merge_process(mergekit_models(args.config)) as prefetch:
        from ..formats.mergekit_yaml import load_mergekit_yaml, spec_from_mergekit
        from ..merge import run_merge

        setup_logging()
        spec = spec_from_mergekit(
            load_mergekit_yaml(args.config), args.out_path, max_shard_size=args.max_shard_size,
            device=args.device, overwrite=args.overwrite, show_pbar=args.show_pbar,
            threads=args.threads, direct_io=not args.buffered_io, buffer_memory=args.buffer_memory,
        )
        result = run_merge(spec, prefetch=prefetch)
    print(f"merged model: {result.output}")
    return 0


def mergekit_models(config: Path) -> list[str]:
    """The model references of a mergekit YAML, best effort (the YAML is checked later)."""
    import yaml

    try:
        doc = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return []
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("model", "base_model") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


def validate(argv: list[str]) -> int:
    """``slerp-merge validate OUT --parents A B``: exit 0 passed, 6 gate failed, 8 an input unreadable
    (then no report is written)."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} validate",
        description="Validate a merged model: structure, spot re-computation, perplexity vs the parents. "
        "Writes validation.json and validation.txt; exits 6 when the gate fails, 8 when the merge or a "
        "parent cannot be read (no report is written then).",
    )
    parser.add_argument("model", type=Path, help="the merged model folder")
    parser.add_argument("--parents", nargs=2, type=Path, required=True, metavar=("MODEL_1", "MODEL_2"))
    parser.add_argument("--skip-functional", metavar="REASON", help="skip the perplexity gate, saying why")
    parser.add_argument("--eval-text", type=Path, help="text file for perplexity (default: bundled text)")
    parser.add_argument("--margin", type=float, default=0.10,
                        help="allowed excess over the worse parent's perplexity (default 0.10 = 10%%)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="evaluation tokens (default 1024)")
    parser.add_argument("--spot", type=int, default=16,
                        help="tensors sampled for re-computation of big models")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="compute dtype (default auto: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--generation-memory", default="1GiB", metavar="SIZE",
                        help="weights a model may keep in memory to write completions of the prompts "
                        "(default 1GiB; 0: no completions); larger models are evaluated layer by layer only")
    parser.add_argument("--no-cache", action="store_true",
                        help="evaluate the parents again instead of reusing cached results")
    parser.add_argument("--t", type=float, help="t of the merge, for outputs without merge_manifest.json")
    parser.add_argument("--report", type=Path, help="folder for validation.json (default: the model folder)")
    args = parser.parse_args(argv)

    setup_logging()
    if args.eval_text is not None and not args.eval_text.is_file():
        raise ConfigError(f"--eval-text: no such file: {args.eval_text}", path=args.eval_text)
    if args.report is not None and not args.report.is_dir():
        raise ConfigError(f"--report: no such folder: {args.report}", path=args.report)
    with cyclic_gc_paused():  # importing torch and transformers would run it a thousand times (~1 s)
        from ..validate import EvalSettings, EvaluationCache, validate_merge, write_report

        settings = _settings(args, EvalSettings)
        report = validate_merge(
            args.model, tuple(args.parents), settings=settings, skip_functional=args.skip_functional,
            margin=args.margin, spot_sample=args.spot, t=args.t,
            cache=None if args.no_cache else EvaluationCache(),
        )
    path = write_report(report, args.report)
    print(report.summary)
    print(f"report: {path}")
    return 0 if report.passed else 6


def sweep(argv: list[str]) -> int:
    """``slerp-merge sweep --t LIST [--config-path D --config-name N] [overrides]``: the merge
    evaluated at every t in one pass; exit 0 when some t passes the gate, 6 when none does."""
    args, rest = _sweep_parser().parse_known_args(argv)
    if args.eval_text is not None and not args.eval_text.is_file():
        raise ConfigError(f"--eval-text: no such file: {args.eval_text}", path=args.eval_text)
    from ..sweep.values import parse_t_values
    from .hydra_app import compose_spec

    ts = parse_t_values(args.t)
    spec = compose_spec(rest)
    setup_logging()
    with cyclic_gc_paused():
        from ..sweep import merge_best, run_sweep
        from ..validate import EvalSettings

        args.device = spec.device
        settings = _settings(args, EvalSettings)
        cache = None if args.no_cache else "default"
        result = run_sweep(spec, ts, report=args.report, settings=settings, margin=args.margin, cache=cache)
    print("\n".join(result.lines()))
    print(f"report: {result.report}")
    if not result.passed:
        return 6
    if args.merge:
        merged = merge_best(spec, result, settings=settings, cache=cache)
        print(f"merged at t = {result.best_t:g}: {merged.output or spec.push_to_hub}")
    return 0


def _sweep_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} sweep",
        description="Evaluate the merge at several t in one read of the parents (no model is written), "
        "print and write a table and a plot, and name the best t (lowest perplexity among the t that pass "
        "the gate; ties go to the t nearer 0.5). The merge is given as for the merge itself (FusionBench's "
        "llm_slerp config and overrides). Exits 6 when no t passes the gate.",
    )
    parser.add_argument("--t", required=True, metavar="LIST",
                        help="t values: 0.1,0.3,0.5 or START:STOP:STEP (e.g. 0.1:0.9:0.2)")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="folder for the table and plot (default: <model_save_path>-sweep)")
    parser.add_argument("--merge", action="store_true",
                        help="then merge at the best t (locally, or to the Hub with method.stream=true)")
    parser.add_argument("--eval-text", type=Path, help="text file for perplexity (default: bundled text)")
    parser.add_argument("--margin", type=float, default=None,
                        help="allowed excess over the worse parent's perplexity (default method.gate_margin)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="evaluation tokens (default 1024)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="compute dtype (default auto: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--generation-memory", default="1GiB", metavar="SIZE",
                        help="parents whose weights fit it are evaluated as by validate, with completions")
    parser.add_argument("--no-cache", action="store_true",
                        help="evaluate the parents again instead of reusing cached results")
    return parser


def _settings(args: argparse.Namespace, settings_type: type):
    """The evaluation settings of ``validate``'s arguments.

    Raises:
        ConfigError: an invalid value (one line naming the option).
    """
    from pydantic import ValidationError

    from ..spec import parse_size

    try:
        memory = 0 if args.generation_memory.strip() == "0" else parse_size(args.generation_memory)
    except ValueError as e:
        raise ConfigError(f"--generation-memory: {e}") from None
    try:
        return settings_type(
            eval_text=args.eval_text.read_text() if args.eval_text else None,
            eval_text_name=args.eval_text.name if args.eval_text else None,
            max_tokens=args.max_tokens, device=args.device, dtype=args.dtype, generation_memory=memory)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None


def upload(argv: list[str]) -> int:
    """``slerp-merge upload OUT org/name``: publish a merged folder in one commit."""
    parser = argparse.ArgumentParser(
        prog=f"{PROG} upload",
        description="Upload a merged model folder to the Hugging Face Hub in one commit (token: HF_TOKEN "
        "or `hf auth login`). Re-running after a failure never makes a second or empty commit.",
    )
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id", help="org/name; created if missing")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default="main", help="branch to commit to (default main)")
    parser.add_argument("--message", help="commit message (default: names the parents, their shas and t)")
    args = parser.parse_args(argv)

    from ..hub.client import upload_folder

    setup_logging()
    up = upload_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.message)
    print(f"{'committed' if up.new_commit else 'unchanged'}: {up.commit} {up.url}")
    return 0
