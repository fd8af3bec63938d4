"""``slerp-merge``: run the seed's FusionBench config (Hydra flags and overrides), or a subcommand.

    slerp-merge --config-path config/_get_started --config-name llm_slerp method.t=0.3 \\
        +method.model_save_path=out/merged
    slerp-merge -m ... method.t=0.3,0.5,0.7        # one output per t
    slerp-merge --cfg job ...                       # print the composed config
    slerp-merge demo-models DIR                     # build the demo model pair

Errors print one line ``slerp-merge: error: ...`` and exit non-zero (2 bad config, 3 bad
checkpoint, 4 output exists, 5 write failure, 1 other). ``SLERP_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("slerp_plugin.cli")

PROG = "slerp-merge"


def _demo_models(argv: list[str]) -> int:
    from .demo import main

    return main(argv)


SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo-models": _demo_models,
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
    except OSError as e:
        return _fail(OSError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")), 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _absolutise_config_path(argv: list[str]) -> list[str]:
    """Hydra resolves a relative ``--config-path`` against its own module; users mean the cwd."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                out += [arg, str(Path(argv[i + 1]).absolute())]
                i += 2
                break
            if arg.startswith(flag + "="):
                out.append(f"{flag}={Path(arg.split('=', 1)[1]).absolute()}")
                i += 1
                break
        else:
            out.append(arg)
            i += 1
    return out


def _multirun_suffix(task_overrides: list[str]) -> str:
    parts = []
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key.endswith("model_save_path"):
            continue
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts))


def _hydra_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .config import spec_from_fusionbench
    from .engine import run_merge

    hc = HydraConfig.get()
    container = OmegaConf.to_container(cfg, resolve=True)
    spec = spec_from_fusionbench(container, default_output=Path(hc.runtime.output_dir) / "merged")
    explicit = isinstance(container.get("method"), dict) and container["method"].get("model_save_path")
    if hc.mode == RunMode.MULTIRUN and explicit:
        suffix = _multirun_suffix(list(hc.overrides.task)) or f"job{hc.job.num}"
        spec = spec.model_copy(update={"output": Path(spec.output) / suffix})
    log.info(
        "SLERP t=%s DOT_THRESHOLD=%s epsilon=%s: %s (%s) + %s (%s) -> %s",
        spec.t, spec.DOT_THRESHOLD, spec.epsilon, spec.model_1, spec.model_names[0],
        spec.model_2, spec.model_names[1], spec.output,
    )
    result = run_merge(spec)
    print(f"merged model: {result.output}")


def _run_hydra(argv: list[str]) -> int:
    import hydra

    from .errors import SlerpPluginError

    argv = _absolutise_config_path(argv)
    if not any(a.startswith("hydra.sweep.dir") for a in argv):
        argv.append("hydra.sweep.dir=outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}")
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
    """Console-script wrapper: exit with :func:`main`'s status."""
    sys.exit(main())
