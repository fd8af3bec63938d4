"""``slerp-merge``: run the seed's FusionBench config (Hydra flags and overrides), or a subcommand.

    slerp-merge --config-path config/_get_started --config-name llm_slerp method.t=0.3 \\
        +method.model_save_path=out/merged
    slerp-merge -m ... method.t=0.3,0.5,0.7        # one output per t
    slerp-merge --cfg job ...                       # print the composed config
    slerp-merge mergekit CONFIG.yml OUT             # a mergekit YAML, streaming engine
    slerp-merge validate OUT --parents A B          # validate a merge (exit 6: gate failed)
    slerp-merge upload OUT org/name [--private]     # publish a merge on the Hub
    slerp-merge demo-models DIR                     # build the demo model pair

Errors print one line ``slerp-merge: error: ...`` and exit non-zero (2 bad config, 3 bad
checkpoint, 4 output exists, 5 write failure, 1 other). ``SLERP_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("slerp_plugin.cli")


class ValidationArgError(Exception):
    """A bad argument to ``validate`` (reported like other usage errors)."""

PROG = "slerp-merge"


def _demo_models(argv: list[str]) -> int:
    from .demo import main

    return main(argv)


def _mergekit(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"{PROG} mergekit",
        description="Run a mergekit merge YAML (merge_method: slerp_for_causal_lm or slerp) "
        "with the streaming engine.",
    )
    parser.add_argument("config", type=Path, help="mergekit merge YAML")
    parser.add_argument("out_path", type=Path, help="output folder (must not exist)")
    parser.add_argument("--max-shard-size", default="5GB", help="bytes per output shard (default 5GB)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--show-pbar", action="store_true", help="progress bar even without a terminal")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU compute threads (default: usable CPUs - 2, at least 1)")
    parser.add_argument("--buffered-io", action="store_true",
                        help="read and write through the page cache instead of O_DIRECT")
    parser.add_argument("--buffer-memory", default="192MB",
                        help="input block buffers; tensors that fit stay in memory between the passes (default 192MB)")
    args = parser.parse_args(argv)
    with _read_ahead(_mergekit_models(args.config)):
        from .engine import run_merge
        from .mergekit_config import load_mergekit_yaml, spec_from_mergekit

        _setup_logging()
        spec = spec_from_mergekit(
            load_mergekit_yaml(args.config), args.out_path, max_shard_size=args.max_shard_size,
            device=args.device, overwrite=args.overwrite, show_pbar=args.show_pbar,
            threads=args.threads, direct_io=not args.buffered_io, buffer_memory=args.buffer_memory,
        )
        result = run_merge(spec)
    print(f"merged model: {result.output}")
    return 0


def _mergekit_models(config: Path) -> list[str]:
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


def _fusionbench_models(container: object) -> list[str]:
    """The model references of a composed seed config's ``modelpool``, best effort."""
    pool = container.get("modelpool") if isinstance(container, dict) else None
    models = pool.get("models") if isinstance(pool, dict) else None
    found = []
    for value in models.values() if isinstance(models, dict) else ():
        if isinstance(value, dict):
            value = value.get("pretrained_model_name_or_path")
        if isinstance(value, str):
            found.append(value)
    return found


@contextmanager
def _read_ahead(models: list[str]) -> Iterator[None]:
    """Read (and hash) the local input models while torch is imported (:mod:`slerp_plugin.prefetch`);
    the read-ahead is stopped and forgotten when the block ends, whatever happens in it.

    The cyclic garbage collector is off in the block (:func:`~slerp_plugin.gc_pause.cyclic_gc_paused`):
    importing torch would run it over and over, and a merge frees its buffers by reference counting.
    """
    from . import prefetch
    from .gc_pause import cyclic_gc_paused

    with cyclic_gc_paused():
        prefetch.start(Path(m).expanduser() for m in models)
        try:
            yield
        finally:
            prefetch.clear()


def _validate(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"{PROG} validate",
        description="Validate a merged model: structure, spot re-computation, perplexity vs the parents. "
        "Writes validation.json and validation.txt; exits 6 when the gate fails.",
    )
    parser.add_argument("model", type=Path, help="the merged model folder")
    parser.add_argument("--parents", nargs=2, type=Path, required=True, metavar=("MODEL_1", "MODEL_2"))
    parser.add_argument("--skip-functional", metavar="REASON", help="skip the perplexity gate, saying why")
    parser.add_argument("--eval-text", type=Path, help="text file for perplexity (default: bundled text)")
    parser.add_argument("--margin", type=float, default=0.10,
                        help="allowed excess over the worse parent's perplexity (default 0.10 = 10%%)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="evaluation tokens (default 1024)")
    parser.add_argument("--spot", type=int, default=16, help="tensors sampled for re-computation of big models")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--t", type=float, help="t of the merge, for outputs without merge_manifest.json")
    parser.add_argument("--report", type=Path, help="folder for validation.json (default: the model folder)")
    args = parser.parse_args(argv)

    from .validate import validate_merge, write_report

    _setup_logging()
    if args.eval_text is not None and not args.eval_text.is_file():
        raise ValidationArgError(f"--eval-text: no such file: {args.eval_text}")
    report = validate_merge(
        args.model, tuple(args.parents), skip_functional=args.skip_functional,
        eval_text=args.eval_text.read_text() if args.eval_text else None, margin=args.margin,
        max_tokens=args.max_tokens, spot_sample=args.spot, device=args.device, t=args.t,
    )
    path = write_report(report, args.report)
    print(report.summary)
    print(f"report: {path}")
    return 0 if report.passed else 6


def _upload(argv: list[str]) -> int:
    import argparse

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

    from .hub import upload_folder

    _setup_logging()
    up = upload_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                       commit_message=args.message)
    print(f"{'committed' if up.new_commit else 'unchanged'}: {up.commit} {up.url}")
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo-models": _demo_models,
    "mergekit": _mergekit,
    "validate": _validate,
    "upload": _upload,
}


def _fail(exc: BaseException, code: int) -> int:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _guard(fn: Callable[[], int]) -> int:
    """Run ``fn``; turn our errors (and OS errors) into a one-line message and an exit code."""
    from .errors import SlerpPluginError

    if os.environ.get("SLERP_DEBUG") == "1":
        return fn()
    try:
        return fn()
    except SlerpPluginError as e:
        return _fail(e, e.exit_code)
    except ValidationArgError as e:
        return _fail(e, 2)
    except OSError as e:
        return _fail(OSError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")), 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                "--package", "-p", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _split_hydra_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values) and its positional overrides, in order."""
    flags: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_FLAGS and i + 1 < len(argv):
            value = argv[i + 1]
            if arg in ("--config-path", "-cp", "--config-dir", "-cd"):
                # Hydra resolves a relative path against its own module; users mean the cwd
                value = str(Path(value).absolute())
            flags += [arg, value]
            i += 2
            continue
        if arg in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in _INFO_CHOICES:
            flags += argv[i : i + 2]
            i += 2
            continue
        for flag in ("--config-path", "--config-dir"):
            if arg.startswith(flag + "="):
                arg = f"{flag}={Path(arg.split('=', 1)[1]).absolute()}"
        (flags if arg.startswith("-") else overrides).append(arg)
        i += 1
    return flags, overrides


def _force_method_keys(argv: list[str]) -> list[str]:
    """``method.DOT_THRESHOLD=0.99`` → ``++method.DOT_THRESHOLD=0.99`` for the method's known options.

    The seed's YAML lacks most option keys, and Hydra refuses to override an absent key without
    ``+``; ``++`` adds or overrides, so both spellings work.
    """
    from .config import METHOD_KEYS

    out = []
    for arg in argv:
        m = re.fullmatch(r"method\.(\w+)=(.*)", arg, flags=re.S)
        out.append(f"++{arg}" if m and m.group(1) in METHOD_KEYS else arg)
    return out


def _swept_keys(overrides: list[str]) -> set[str]:
    """Keys that a multirun sweeps over (``method.t=0.3,0.5`` → ``{"method.t"}``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports grammar errors itself, later
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


_SWEPT: set[str] = set()


def _multirun_suffix(task_overrides: list[str], swept: set[str]) -> str:
    """``t=0.3`` from a job's concrete overrides, keeping the swept keys only."""
    parts = []
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in swept:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts))


def _hydra_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    container = OmegaConf.to_container(cfg, resolve=True)
    with _read_ahead(_fusionbench_models(container)):
        from .config import spec_from_fusionbench
        from .engine import run_merge

        spec = spec_from_fusionbench(container, default_output=Path(hc.runtime.output_dir) / "merged")
        explicit = isinstance(container.get("method"), dict) and container["method"].get("model_save_path")
        if hc.mode == RunMode.MULTIRUN and explicit:
            suffix = _multirun_suffix(list(hc.overrides.task), _SWEPT) or f"job{hc.job.num}"
            spec = spec.model_copy(update={"output": Path(spec.output) / suffix})
        log.info(
            "SLERP t=%s DOT_THRESHOLD=%s epsilon=%s: %s (%s) + %s (%s) -> %s",
            spec.t, spec.DOT_THRESHOLD, spec.epsilon, spec.model_1, spec.model_names[0],
            spec.model_2, spec.model_names[1], spec.output,
        )
        result = run_merge(spec)
    print(f"merged model: {result.output}")
    if result.upload is not None:
        print(f"published: {result.upload.url}")


def _run_hydra(argv: list[str]) -> int:
    import hydra

    from .errors import SlerpPluginError

    flags, overrides = _split_hydra_args(argv)
    overrides = _force_method_keys(overrides)
    if not any(a.lstrip("+").startswith("hydra.sweep.dir") for a in overrides):
        overrides.append("hydra.sweep.dir=outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}")
    argv = flags + overrides
    _SWEPT.clear()
    _SWEPT.update(_swept_keys(overrides))
    saved = sys.argv
    sys.argv = [PROG, *argv]
    code = 0

    def task(cfg) -> None:
        nonlocal code
        try:
            _hydra_task(cfg)
        except SlerpPluginError as e:
            if os.environ.get("SLERP_DEBUG") == "1":
                raise
            code = _fail(e, e.exit_code)
            raise SystemExit(code) from None

    try:
        hydra.main(version_base="1.3", config_path="conf", config_name="llm_slerp")(task)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slerp-merge``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _guard(lambda: SUBCOMMANDS[argv[0]](argv[1:]))
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__)
        print("Hydra's own help: slerp-merge --hydra-help")
        return 0
    return _guard(lambda: _run_hydra(argv))


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s status.

    Everything the command wrote is closed and fsynced when :func:`main` returns, so the process
    ends at once: tearing down an interpreter that imported torch takes about half a second.
    """
    # numpy (imported by torch) would start an OpenBLAS thread per CPU; nothing here uses them
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
