"""FusionBench's ``llm_slerp`` config run with Hydra's flags and override grammar.

``--config-path``/``--config-name`` select the YAML (default: FusionBench's ``llm_slerp`` config, bundled in
``conf/``); overrides like ``method.t=0.3`` work whether or not the key is in the YAML; ``-m``
sweeps (one output per value); ``--cfg job`` prints the composed config and merges nothing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, SlerpPluginError, first_line

if TYPE_CHECKING:
    from ..spec import MergeSpec

log = logging.getLogger("slerp_plugin.cli")

PROG = "slerp-merge"
CONF_DIR = Path(__file__).resolve().parent / "conf"
DEFAULT_CONFIG = "llm_slerp"

_VALUE_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                "--package", "-p", "--experimental-rerun"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_hydra_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values, config folders made absolute) and its positional
    overrides, in order."""
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


def force_method_keys(argv: list[str]) -> list[str]:
    """``method.DOT_THRESHOLD=0.99`` → ``++method.DOT_THRESHOLD=0.99`` for the method's known options.

    FusionBench's YAML lacks most option keys, and Hydra refuses to override an absent key without
    ``+``; ``++`` adds or overrides, so both spellings work.
    """
    from ..formats.fusionbench import METHOD_KEYS

    out = []
    for arg in argv:
        m = re.fullmatch(r"method\.(\w+)=(.*)", arg, flags=re.S)
        out.append(f"++{arg}" if m and m.group(1) in METHOD_KEYS else arg)
    return out


def swept_keys(overrides: list[str]) -> set[str]:
    """Keys that a multirun sweeps over (``method.t=0.3,0.5`` → ``{"method.t"}``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra reports grammar errors itself, later
        return set()
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def multirun_suffix(task_overrides: list[str], swept: set[str]) -> str:
    """``t=0.3`` from a job's concrete overrides, keeping the swept keys only."""
    parts = []
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key in swept:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return re.sub(r"[^\w.=,+-]", "_", ",".join(parts))


def fusionbench_models(container: object) -> list[str]:
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


def _task(cfg, swept: set[str]) -> None:
    """One Hydra job: the composed config → MergeSpec → merge."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .process import merge_process, quiet_http_logs

    quiet_http_logs()  # after Hydra has configured logging for the job
    hc = HydraConfig.get()
    container = OmegaConf.to_container(cfg, resolve=True)
    with merge_process(fusionbench_models(container)) as prefetch:
        from ..formats.fusionbench import spec_from_fusionbench
        from ..merge import run_merge

        spec = spec_from_fusionbench(container, default_output=Path(hc.runtime.output_dir) / "merged")
        explicit = isinstance(container.get("method"), dict) and container["method"].get("model_save_path")
        if hc.mode == RunMode.MULTIRUN and explicit:
            suffix = multirun_suffix(list(hc.overrides.task), swept) or f"job{hc.job.num}"
            spec = spec.model_copy(update={"output": Path(spec.output) / suffix})
        log.info("SLERP t=%s DOT_THRESHOLD=%s epsilon=%s: %s (%s) + %s (%s) -> %s",
                 spec.t, spec.DOT_THRESHOLD, spec.epsilon, spec.model_1, spec.model_names[0],
                 spec.model_2, spec.model_names[1], spec.output)
        result = run_merge(spec, prefetch=prefetch)
    if result.output is not None:
        print(f"merged model: {result.output}")
    if result.upload is not None:
        print(f"published: {result.upload.url}")


#: the Hydra settings an override may change; the others configure code (callbacks, launchers,
#: sweepers, logging handlers) or where configs come from
SAFE_HYDRA_KEYS = frozenset({"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.job.chdir",
                             "hydra.output_subdir", "hydra.verbose", "hydra.job.name", "hydra.mode"})
_NO_CONFIG_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def _flag_values(flags: list[str], *names: str) -> list[str]:
    values = []
    for i, flag in enumerate(flags):
        if flag in names and i + 1 < len(flags):
            values.append(flags[i + 1])
        for name in names:
            if flag.startswith(name + "="):
                values.append(flag.split("=", 1)[1])
    return values


def primary_config(flags: list[str]) -> Path:
    """The YAML file Hydra will compose from: ``--config-name`` in ``--config-path`` (else in a
    ``--config-dir``), by default the bundled seed config.

    Raises:
        ConfigError: no such file.
    """
    name = (_flag_values(flags, "--config-name", "-cn") or [DEFAULT_CONFIG])[-1]
    dirs = [Path(d) for d in _flag_values(flags, "--config-path", "-cp")[-1:] or [CONF_DIR]]
    dirs += [Path(d) for d in _flag_values(flags, "--config-dir", "-cd")]
    for folder in dirs:
        for candidate in (folder / name, folder / f"{name}.yaml", folder / f"{name}.yml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"config {name!r} not found in {', '.join(str(d) for d in dirs)}")


def check_command_line(flags: list[str], overrides: list[str]) -> None:
    """Refuse a command line that would run code or read secrets: ``--experimental-rerun`` (it
    unpickles a file), overrides of Hydra's code-bearing settings, ``${oc.env:...}`` values, and a
    config file that is not plain data (:func:`~slerp_plugin.formats.fusionbench.check_config_file`).

    Raises:
        ConfigError: one line saying what was refused.
    """
    from ..formats.fusionbench import ENV_RESOLVER, check_config_file

    if any(f == "--experimental-rerun" or f.startswith("--experimental-rerun=") for f in flags):
        raise ConfigError("--experimental-rerun is not supported: it loads a pickle, which can run code")
    for arg in overrides:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith(("hydra.", "hydra/")) and key not in SAFE_HYDRA_KEYS:
            raise ConfigError(f"{key}: this Hydra setting cannot be overridden here (it configures code); "
                              f"allowed: {', '.join(sorted(SAFE_HYDRA_KEYS))}")
        if ENV_RESOLVER.search(arg):
            raise ConfigError(f"{key}: environment variables cannot be read into a config (${{oc.env:...}})")
    if not _NO_CONFIG_FLAGS & set(flags):
        check_config_file(primary_config(flags))


def compose_spec(argv: list[str]) -> MergeSpec:
    """The MergeSpec a seed-config command line would merge, composed without running anything
    (Hydra's compose API: no output folder, no log file). Without ``method.model_save_path`` the
    output is taken as ``outputs/merged`` (where Hydra's run folders go).

    Raises:
        ConfigError: the command line or config is refused or invalid; a sweep (``-m``).
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ..formats.fusionbench import spec_from_fusionbench

    flags, overrides = split_hydra_args(argv)
    check_command_line(flags, overrides)
    if {"-m", "--multirun"} & set(flags) or swept_keys(overrides):
        raise ConfigError("plan takes one merge: give single values, not a sweep")
    allowed = {"--config-path", "-cp", "--config-name", "-cn"}
    i = 0
    while i < len(flags):
        if flags[i] in allowed:
            i += 2  # the flag and its value
        elif flags[i].split("=", 1)[0] in allowed:
            i += 1
        else:
            raise ConfigError(f"plan: unsupported option {flags[i]}")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config = primary_config(flags)
    try:
        with initialize_config_dir(config_dir=str(config.parent), version_base="1.3"):
            cfg = compose(config_name=config.stem, overrides=force_method_keys(overrides))
        container = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(" ".join(first_line(e).split())) from e
    return spec_from_fusionbench(container, default_output=Path("outputs") / "merged")


def run_hydra(argv: list[str], fail) -> int:
    """Run the seed-config command line ``argv``; ``fail(error, code)`` reports our errors.

    Returns the exit status.

    Raises:
        ConfigError: the command line or the config file is refused (:func:`check_command_line`).
    """
    import hydra

    flags, overrides = split_hydra_args(argv)
    check_command_line(flags, overrides)
    overrides = force_method_keys(overrides)
    if not any(a.lstrip("+").startswith("hydra.sweep.dir") for a in overrides):
        overrides.append("hydra.sweep.dir=outputs/multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}")
    swept = swept_keys(overrides)
    saved = sys.argv
    sys.argv = [PROG, *flags, *overrides]
    code = 0

    def task(cfg) -> None:
        nonlocal code
        try:
            _task(cfg, swept)
        except SlerpPluginError as e:
            if os.environ.get("SLERP_DEBUG") == "1":
                raise
            code = fail(e, e.exit_code)
            raise SystemExit(code) from None

    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=DEFAULT_CONFIG)(task)()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code
