"""A mergekit merge YAML (``merge_method: slerp_for_causal_lm`` or ``slerp``) → MergeSpec.

This is the streaming path of ``slerp-merge mergekit CONFIG OUT``; it does not import mergekit.
``t`` resolves exactly as mergekit does (gradient lists over the layer position, ``filter``
substrings, first match wins; embeddings, final norm and lm_head take the first gradient value).

Rules where mergekit and FusionBench differ — this path follows mergekit's:

- a shape mismatch is an error (FusionBench keeps model_1's tensor); a vocabulary mismatch says
  how to align the vocabularies;
- tensors present in one model only are an error in both;
- ``dtype`` is the dtype inputs are loaded in, ``out_dtype`` the dtype written (default ``dtype``,
  else each tensor keeps base_model's dtype).

With mergekit's built-in ``slerp`` name, this path honours ``DOT_THRESHOLD``/``epsilon`` from the
YAML (mergekit's own ``slerp`` ignores them) and computes with FusionBench's kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, first_line
from ..spec import MergeSpec, ModelRef

METHOD_NAMES = ("slerp_for_causal_lm", "slerp")
PARAMETERS = ("t", "DOT_THRESHOLD", "epsilon")
_TOP_KEYS = {
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name",
}


def load_mergekit_yaml(path: Path | str) -> dict[str, Any]:
    """Read a mergekit YAML file.

    Raises:
        ConfigError: unreadable file or not a YAML mapping.
    """
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {first_line(e)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return doc


def _ref(where: str, value: Any) -> ModelRef:
    if isinstance(value, Mapping):
        value = value.get("model", value.get("path"))
        if isinstance(value, Mapping):
            return ModelRef(ref=str(value["path"]), revision=value.get("revision"))
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path or Hub id, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise ConfigError(f"{where}: LoRA references ({value}) are not supported; merge the adapter first")
    return ModelRef.parse(value)


def _models(doc: Mapping[str, Any]) -> tuple[list[ModelRef], dict[str, Any]]:
    """The input models and the slice-level parameters (empty for the ``models:`` form)."""
    if doc.get("models") and doc.get("slices"):
        raise ConfigError("give either models or slices, not both")
    if doc.get("models"):
        refs = []
        for i, entry in enumerate(doc["models"]):
            if isinstance(entry, Mapping) and entry.get("parameters"):
                bad = sorted(set(entry["parameters"]) & set(PARAMETERS))
                if bad:
                    raise ConfigError(
                        f"models[{i}].parameters: {bad} apply to the whole merge; set them in the "
                        "top-level parameters"
                    )
            refs.append(_ref(f"models[{i}]", entry.get("model") if isinstance(entry, Mapping) else entry))
        return refs, {}
    slices = doc.get("slices")
    if not slices:
        raise ConfigError("models: missing (list base_model and the model to interpolate towards)")
    if len(slices) != 1:
        raise ConfigError(
            f"slices: {len(slices)} slices; the streaming path merges whole models only "
            "(use mergekit-yaml for layer stacking)"
        )
    sources = slices[0].get("sources") or []
    ranges = {tuple(s.get("layer_range") or ()) for s in sources}
    if len(ranges) > 1:
        raise ConfigError("slices[0]: sources with different layer_range; use mergekit-yaml for this")
    refs = [_ref(f"slices[0].sources[{i}]", s.get("model")) for i, s in enumerate(sources)]
    return refs, dict(slices[0].get("parameters") or {})


def spec_from_mergekit(doc: Mapping[str, Any], output: Path | str, **options: Any) -> MergeSpec:
    """Convert a parsed mergekit YAML into a :class:`MergeSpec` writing to ``output``.

    ``options`` are further MergeSpec fields (``max_shard_size``, ``device``, ``overwrite``, ...).

    Raises:
        ConfigError: wrong method, not exactly two models, no base_model, missing or invalid
            ``t``, or a feature the streaming path does not support (with what to use instead).
    """
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}")
    method = doc.get("merge_method")
    if method not in METHOD_NAMES:
        raise ConfigError(f"merge_method: expected one of {list(METHOD_NAMES)}, got {method!r}")
    if doc.get("chat_template"):
        raise ConfigError("chat_template: not supported by the streaming path; use mergekit-yaml")
    if not doc.get("base_model"):
        raise ConfigError("base_model: missing (SLERP goes from base_model at t=0 to the other model at t=1)")
    base = _ref("base_model", doc["base_model"])
    refs, slice_params = _models(doc)
    distinct = list(dict.fromkeys(r for r in refs))
    others = [r for r in distinct if r.ref != base.ref or r.revision != base.revision]
    if len(distinct) != 2 or len(others) != 1:
        names = ", ".join(str(r) for r in distinct)
        raise ConfigError(
            f"models: SLERP needs exactly two models, base_model and one other; got {len(distinct)} "
            f"({names}){'' if base in distinct else ' and base_model is not among them'}"
        )
    params = {**dict(doc.get("parameters") or {}), **slice_params}
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ConfigError(f"parameters: unknown {unknown} (known: {list(PARAMETERS)})")
    if "t" not in params:
        raise ConfigError("parameters.t: missing (a number, a gradient list, or filter entries)")
    fields: dict[str, Any] = {
        "model_1": base,
        "model_2": others[0],
        "model_names": ("base_model", "model"),
        "t": params["t"],
        "output": output,
        "on_shape_mismatch": "error",
    }
    for key in ("DOT_THRESHOLD", "epsilon"):
        if key in params:
            if not isinstance(params[key], (int, float)) or isinstance(params[key], bool):
                raise ConfigError(f"parameters.{key}: must be a number on this path, got {params[key]!r}")
            fields[key] = params[key]
    if doc.get("dtype"):
        fields["dtype"] = doc["dtype"]
    if doc.get("out_dtype"):
        fields["out_dtype"] = doc["out_dtype"]
    source = doc.get("tokenizer_source")
    tok = doc.get("tokenizer")
    if isinstance(tok, Mapping):
        source = tok.get("source", source)
        if set(tok) - {"source"}:
            raise ConfigError("tokenizer: only `source` is supported by the streaming path; "
                              "use mergekit-yaml")
    if source == "union":
        raise ConfigError("tokenizer_source: union re-maps embeddings; use mergekit-yaml for it")
    if source not in (None, "base"):
        fields["tokenizer"] = _ref("tokenizer_source", source)
    return MergeSpec.build(**{**fields, **options})
