"""FusionBench's ``llm_slerp`` YAML (``fusion_bench.method.SlerpForCausalLM`` + ``CausalLMPool``) → MergeSpec.

A config is data: ``_target_`` values are checked against an allow-list of FusionBench's own names
and never instantiated; a file may not configure Hydra itself (callbacks, launchers, sweepers and
logging handlers are code), compose other configs, or read environment variables
(:func:`check_config_file`). Unknown keys are errors (typos would otherwise be silently ignored);
keys of FusionBench's program that do not affect a merge are accepted.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, first_line
from ..spec import MergeSpec, ModelRef

PROGRAM_TARGETS = frozenset({
    "fusion_bench.programs.FabricModelFusionProgram",
    "fusion_bench.programs.fabric_fusion_program.FabricModelFusionProgram",
})
METHOD_TARGETS = frozenset({
    "fusion_bench.method.SlerpForCausalLM",
    "fusion_bench.method.slerp.SlerpForCausalLM",
    "fusion_bench.method.slerp.slerp.SlerpForCausalLM",
})
POOL_TARGETS = frozenset({
    "fusion_bench.modelpool.CausalLMPool",
    "fusion_bench.modelpool.causal_lm.CausalLMPool",
    "fusion_bench.modelpool.causal_lm.causal_lm.CausalLMPool",
})
LOADER_TARGETS = frozenset({
    "transformers.AutoModelForCausalLM.from_pretrained",
    "transformers.AutoTokenizer.from_pretrained",
    "transformers.LlamaForCausalLM.from_pretrained",
    "transformers.Qwen2ForCausalLM.from_pretrained",
    "transformers.MistralForCausalLM.from_pretrained",
})
#: program keys FusionBench accepts that do not change a merge
PROGRAM_IGNORED = frozenset({
    "_recursive_", "_usage_", "_version_", "fabric", "fabric_logger", "taskpool", "print_config",
    "dry_run", "fast_dev_run", "report_save_path", "seed", "path", "merged_model_save_path",
    "print_function_call", "log_dir", "defaults",
})
METHOD_KEYS = {
    # FusionBench's own options
    "t": "t", "DOT_THRESHOLD": "DOT_THRESHOLD", "epsilon": "epsilon",
    "model_save_path": "output", "show_pbar": "show_pbar",
    # slerp_plugin's additions
    "dtype": "dtype", "device": "device", "max_shard_size": "max_shard_size",
    "overwrite": "overwrite", "chunk_elements": "chunk_elements", "threads": "threads",
    "direct_io": "direct_io", "buffer_memory": "buffer_memory", "allow_bin": "allow_bin",
    "norm_precision": "norm_precision", "stream": "stream", "disk_budget": "disk_budget",
    "connections": "connections",
    "gate": "gate", "gate_margin": "gate_margin", "gate_max_tokens": "gate_max_tokens",
}
POOL_IGNORED = frozenset({"_recursive_", "_usage_", "_version_", "tokenizer_kwargs", "enable_lazy_loading"})


#: an interpolation that reads the environment (its value would end up in logs and errors)
ENV_RESOLVER = re.compile(r"\$\{\s*oc\.env\s*:")


def check_config_file(path: Path) -> dict[str, Any]:
    """Read a seed-format YAML file as data and refuse what would make Hydra run code or leak secrets.

    Refused: YAML tags that build Python objects, a ``hydra:`` section, a ``defaults`` list other
    than ``[_self_]``, and ``${oc.env:...}`` interpolations. Returns the document.

    Raises:
        ConfigError: one line naming the file and the reason.
    """
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", path=path) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not plain YAML data: {first_line(e)}", path=path) from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level", path=path)
    if "hydra" in doc:
        raise ConfigError(f"{path}: a config may not configure Hydra (its callbacks, launchers and logging "
                          "run code); remove the hydra: section", path=path)
    defaults = doc.get("defaults")
    if defaults is not None and defaults != ["_self_"]:
        raise ConfigError(f"{path}: defaults may only be [_self_]: a merge config is one file, it does not "
                          "compose others", path=path)
    for where, value in _strings(doc):
        if ENV_RESOLVER.search(value):
            raise ConfigError(f"{path}: {where}: environment variables cannot be read into a config "
                              "(${oc.env:...})", path=path)
    return doc


def _strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, str):
        yield where or "config", node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(key, where)
            yield from _strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, f"{where}[{i}]")


def _check_target(where: str, node: Mapping[str, Any], allowed: frozenset[str]) -> None:
    target = node.get("_target_")
    if target is not None and target not in allowed:
        raise ConfigError(
            f"{where}._target_: {target!r} is not allowed (config targets are never instantiated; "
            f"allowed: {', '.join(sorted(allowed))})"
        )


def _model_ref(where: str, value: Any) -> ModelRef:
    if isinstance(value, str):
        return ModelRef.parse(value)
    if isinstance(value, Mapping):
        _check_target(where, value, LOADER_TARGETS)
        path = value.get("pretrained_model_name_or_path")
        if not isinstance(path, str):
            raise ConfigError(f"{where}: needs pretrained_model_name_or_path")
        ref = ModelRef.parse(path)
        if value.get("revision"):
            ref = ModelRef(ref=ref.ref, revision=str(value["revision"]))
        return ref
    raise ConfigError(f"{where}: expected a path, Hub id or mapping, got {value!r}")


def spec_from_fusionbench(cfg: Mapping[str, Any], *, default_output: Path | str | None = None) -> MergeSpec:
    """Convert a FusionBench-style config (plain mapping) into a validated :class:`MergeSpec`.

    ``default_output`` is used when ``method.model_save_path`` is absent (FusionBench would save
    nothing; we always save). Raises :class:`ConfigError` with a one-line message.
    """
    _check_target("config", cfg, PROGRAM_TARGETS)
    unknown = set(cfg) - {"_target_", "method", "modelpool", "push_to_hub", "push_private"} - PROGRAM_IGNORED
    if unknown:
        raise ConfigError(f"config: unknown key(s) {sorted(unknown)}")
    method = cfg.get("method")
    pool = cfg.get("modelpool")
    if not isinstance(method, Mapping) or not isinstance(pool, Mapping):
        raise ConfigError("config: needs a 'method' and a 'modelpool' section")
    _check_target("method", method, METHOD_TARGETS)
    _check_target("modelpool", pool, POOL_TARGETS)

    fields: dict[str, Any] = {}
    for key, value in method.items():
        if key in ("_target_", "_recursive_"):
            continue
        if key not in METHOD_KEYS:
            raise ConfigError(f"method.{key}: unknown option (known: {', '.join(METHOD_KEYS)})")
        if value is not None:
            fields[METHOD_KEYS[key]] = value
    if "t" not in fields:
        raise ConfigError("method.t: missing (the interpolation factor, 0 ≤ t ≤ 1)")

    unknown = set(pool) - {"_target_", "models", "tokenizer", "model_kwargs"} - POOL_IGNORED
    if unknown:
        raise ConfigError(f"modelpool: unknown key(s) {sorted(unknown)}")
    models = pool.get("models")
    if not isinstance(models, Mapping):
        raise ConfigError("modelpool.models: expected a mapping of name → model")
    if len(models) != 2:
        raise ConfigError(
            f"modelpool.models: SLERP needs exactly two models, got {len(models)} "
            f"({', '.join(map(str, models))})"
        )
    (name_1, m1), (name_2, m2) = models.items()
    fields["model_1"] = _model_ref(f"modelpool.models.{name_1}", m1)
    fields["model_2"] = _model_ref(f"modelpool.models.{name_2}", m2)
    fields["model_names"] = (str(name_1), str(name_2))
    if pool.get("tokenizer") is not None:
        fields["tokenizer"] = _model_ref("modelpool.tokenizer", pool["tokenizer"])
    kwargs = pool.get("model_kwargs") or {}
    load_dtype = kwargs.get("torch_dtype", kwargs.get("dtype"))
    if load_dtype is not None and "dtype" not in fields:
        fields["dtype"] = load_dtype
    if cfg.get("push_to_hub"):
        fields["push_to_hub"] = str(cfg["push_to_hub"])
        fields["private"] = bool(cfg.get("push_private", False))
    if "output" not in fields:
        if default_output is None:
            raise ConfigError("method.model_save_path: missing")
        fields["output"] = Path(default_output)
    return MergeSpec.build(**fields)
