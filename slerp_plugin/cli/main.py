"""``slerp-merge``: run FusionBench's ``llm_slerp`` config (Hydra flags and overrides), or a subcommand.

    slerp-merge                                      # FusionBench's llm_slerp config (bundled)
    slerp-merge --config-path config/_get_started --config-name llm_slerp method.t=0.3 \\
        +method.model_save_path=out/merged
    slerp-merge -m ... method.t=0.3,0.5,0.7          # one output per t
    slerp-merge --cfg job ...                        # print the composed config
    slerp-merge plan [--config-path ...] [overrides] # sizes, disk, memory and time; downloads nothing
    slerp-merge mergekit CONFIG.yml OUT              # a mergekit YAML, streaming engine
    slerp-merge validate OUT --parents A B           # validate a merge
    slerp-merge sweep --t 0.1:0.9:0.2 [...] [--merge] # t evaluated in one pass; the best one merged
    slerp-merge upload OUT org/name [--private]      # publish a merge on the Hub
    slerp-merge demo-models DIR                      # build the demo model pair

Errors print one line ``slerp-merge: error: ...``; ``SLERP_DEBUG=1`` shows tracebacks instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..errors import SlerpPluginError, exit_code_table, first_line, redact_secrets
from . import commands
from .hydra_app import PROG, run_hydra
from .process import fast_exit, limit_blas_threads

SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "plan": commands.plan,
    "demo-models": commands.demo_models,
    "mergekit": commands.mergekit,
    "validate": commands.validate,
    "sweep": commands.sweep,
    "upload": commands.upload,
}


def fail(exc: BaseException, code: int) -> int:
    """Print ``exc`` as one error line; return ``code``."""
    msg = first_line(exc)
    print(f"{PROG}: error: {redact_secrets(msg)}", file=sys.stderr)
    return code


def guard(fn: Callable[[], int]) -> int:
    """Run ``fn``; turn our errors (and OS errors) into a one-line message and an exit code."""
    if os.environ.get("SLERP_DEBUG") == "1":
        return fn()
    try:
        return fn()
    except SlerpPluginError as e:
        return fail(e, e.exit_code)
    except OSError as e:
        return fail(OSError(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")), 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def usage() -> str:
    """The command's help: its forms and the exit codes."""
    return f"{__doc__}\nExit codes:\n{exit_code_table()}\n\nHydra's own help: {PROG} --hydra-help"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``slerp-merge``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return guard(lambda: SUBCOMMANDS[argv[0]](argv[1:]))
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(usage())
        return 0
    return guard(lambda: run_hydra(argv, fail))


def entry() -> None:
    """Console-script entry point: the command's process settings (:mod:`.process`), then
    :func:`main`, then a fast exit with its status (everything written is closed and fsynced by
    then)."""
    limit_blas_threads()
    fast_exit(main())
