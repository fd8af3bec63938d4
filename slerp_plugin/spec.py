"""MergeSpec: the one typed description of a merge that every input format is converted into.

FusionBench's ``llm_slerp`` YAML (with Hydra overrides), Python calls and, later, mergekit YAML and
Airflow params all become a :class:`MergeSpec`, validated here and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .defaults import DEFAULT_CHUNK_ELEMENTS, DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON
from .errors import ConfigError, redact_secrets

SPEC_SCHEMA_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # "5GB", as transformers' save_pretrained
DEFAULT_BUFFER_MEMORY = 192_000_000  # "192MB" of input chunk buffers

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}

DType = Literal["float32", "float16", "bfloat16", "float64"]
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "fp16": "float16", "half": "float16", "torch.float16": "float16",
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp64": "float64", "double": "float64", "torch.float64": "float64",
}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10⁹), ``"500MiB"`` (2²⁰), ``"1000"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"not a size: {value!r} (use e.g. 5GB, 500MB, 2GiB or bytes)")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return n


def _optional_size(value: int | str | None) -> int | None:
    return None if value is None else parse_size(value)


def _normalise_dtype(value: Any) -> Any:
    if value is None or value == "auto":
        return None
    s = str(value)
    return _DTYPE_ALIASES.get(s, s)


class ModelRef(BaseModel):
    """A model: a local folder or a Hub id, with an optional revision (branch, tag or sha)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(min_length=1, description="local folder path or Hub id 'org/name'")
    revision: str | None = Field(None, description="Hub revision; None for local folders/main")

    @classmethod
    def parse(cls, value: str | ModelRef | dict[str, Any]) -> ModelRef:
        """A reference from text or a mapping.

        Args:
            value: ``"path"``, ``"org/name"``, ``"org/name@rev"`` (branch, tag or commit sha), a
                ``{"ref": ..., "revision": ...}`` mapping, or a reference (returned as it is).

        Returns:
            The reference.
        """
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, dict):
            return cls(**value)
        s = str(value)
        if "@" in s and not Path(s).exists():
            ref, rev = s.rsplit("@", 1)
            return cls(ref=ref, revision=rev or None)
        return cls(ref=s)

    def __str__(self) -> str:
        return f"{self.ref}@{self.revision}" if self.revision else self.ref


class TCondition(BaseModel):
    """One entry of a mergekit-style filtered setting: ``{filter: self_attn, value: [0, 1]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filter: str | None = None
    value: float | list[float]


TSetting = float | list[float] | list[TCondition]


def _interpolate(values: list[float], fraction: float) -> float:
    # mergekit's gradient rule, in the same float64 op order
    scaled = fraction * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_setting(setting: TSetting, tensor_name: str, fraction: float) -> float | None:
    """The value of a mergekit-style setting for one tensor.

    ``fraction`` is the tensor's layer position in ``[0, 1]`` (``i / (layers - 1)``; 0 for
    embeddings, final norm and lm_head). A list of numbers is a gradient interpolated piecewise
    linearly; a list of conditions picks the first whose ``filter`` is absent, ``*`` or a
    substring of the name. None when no condition matches.
    """
    if isinstance(setting, (int, float)):
        return float(setting)
    if not setting:
        return None
    if all(isinstance(e, (int, float)) for e in setting):
        return float(_interpolate([float(e) for e in setting], fraction))
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
            return resolve_setting(cond.value, tensor_name, fraction)
    return None


def _check_t(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"must be a number between 0 and 1 (got {x!r})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"must be between 0 and 1 (got {x!r})")
    return float(x)


def _parse_t(v: Any) -> Any:
    """t as a number, a gradient list or a list of ``{filter, value}``, every value in [0, 1]."""
    if not isinstance(v, (list, tuple)):
        return _check_t(v)
    if not v:
        raise ValueError("empty schedule")
    if all(not isinstance(e, (dict, TCondition)) for e in v):
        return [_check_t(e) for e in v]
    out = []
    for e in v:
        if not isinstance(e, (dict, TCondition)):
            raise ValueError(f"mix of numbers and {{filter, value}} entries (got {e!r})")
        cond = TCondition.model_validate(e)
        values = cond.value if isinstance(cond.value, list) else [cond.value]
        if not values:
            raise ValueError(f"empty gradient for filter {cond.filter!r}")
        for x in values:
            _check_t(x)
        out.append(cond)
    return out


class MergeSpec(BaseModel):
    """Everything that determines a SLERP merge of two causal LMs; each field's ``description``
    states its unit, default and range (the command's options table lists them:
    docs/command.md).

    ``t`` is a number in [0, 1] or a mergekit-style schedule (gradient list and/or ``filter``
    conditions, see :func:`resolve_setting`) resolved per tensor by :meth:`t_for`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: Literal[1] = SPEC_SCHEMA_VERSION
    model_1: ModelRef = Field(description="the model at t = 0: a local folder or a Hub id org/name[@rev]")
    model_2: ModelRef = Field(description="the model at t = 1: a local folder or a Hub id org/name[@rev]")
    model_names: tuple[str, str] = Field(("model_1", "model_2"), description="the models' names in messages")
    tokenizer: ModelRef | None = Field(None, description="tokenizer source (default: model_1)")
    t: Annotated[TSetting, BeforeValidator(lambda v: _parse_t(v))] = Field(
        description="interpolation factor in [0, 1]: 0 gives model_1, 1 gives model_2; or a schedule")
    DOT_THRESHOLD: float = Field(DEFAULT_DOT_THRESHOLD, gt=0.0, le=1.0,
                                 description="|cos| above it uses LERP (default 0.9995; 0 < τ ≤ 1)")
    epsilon: float = Field(DEFAULT_EPSILON, gt=0.0,
                           description="norms at or below it are not normalised (default 1e-8)")
    norm_precision: Literal["float64", "float32"] = Field(
        "float64", description="how d is taken: float64 (default: exact products and float64 sums, the same "
        "on every machine), or float32 whole-tensor norms as FusionBench does, reproducing its branch "
        "choices on this machine (tensors that fit buffer_memory)")
    dtype: Annotated[DType | None, BeforeValidator(_normalise_dtype)] = Field(
        None, description="dtype the models are loaded in (default: as stored)")
    out_dtype: Annotated[DType | None, BeforeValidator(_normalise_dtype)] = Field(
        None, description="dtype stored (default: dtype, else each tensor keeps model_1's)")
    on_shape_mismatch: Literal["keep", "error"] = Field(
        "keep", description="keep model_1's tensor, warning (FusionBench), or refuse (mergekit)")
    output: Path = Field(description="the merged model's folder")
    max_shard_size: Annotated[int, BeforeValidator(parse_size)] = Field(
        DEFAULT_MAX_SHARD_SIZE, description="bytes per output shard (default 5GB)")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda or cuda:N")
    show_pbar: bool = Field(False, description="progress bar even when stderr is not a terminal")
    overwrite: bool = Field(False, description="replace an earlier merge at output (never anything else)")
    chunk_elements: int = Field(DEFAULT_CHUNK_ELEMENTS, ge=1024,
                                description="elements per kernel chunk; scratch memory scales with it")
    buffer_memory: Annotated[int, BeforeValidator(parse_size)] = Field(
        DEFAULT_BUFFER_MEMORY, description="bytes of input block buffers (default 192MB); tensors that fit "
        "stay in memory between the two passes instead of being read twice")
    threads: int | None = Field(None, ge=1, description="torch compute threads of a CPU merge "
                                "(default: usable CPUs − 2, at least 1)")
    direct_io: bool = Field(True, description="read and write weights with O_DIRECT where the filesystem "
                            "allows it")
    allow_bin: bool = Field(False, description="download pickled .bin weights from the Hub and convert them")
    push_to_hub: str | None = Field(None, description="Hub repo to upload the merged model to")
    private: bool = Field(False, description="create push_to_hub as a private repo")
    stream: bool = Field(False, description="Hub parents to push_to_hub with bounded disk: parents read by "
                         "range as needed, each output shard uploaded once written, then deleted")
    disk_budget: Annotated[int | None, BeforeValidator(_optional_size)] = Field(
        None, description="bytes of disk a streaming merge may use at once (default: three output shards in "
        "flight with their inputs, plus the gate's copies kept aside); in a sweep, the most its work "
        "shards (and spooled inputs) take at once (default: 1GB, or up to 8 layers where layers are larger)")
    connections: Literal["auto"] | int = Field(
        "auto", description="ranged GETs in flight per Hub parent in a streaming merge or a sweep (CDNs "
        "limit each connection's rate): 1–64, or auto (default: found by measuring, from 2 up to 32)")
    gate: bool = Field(True, description="a streaming merge is evaluated as its shards are merged and "
                       "published only if its perplexity passes the gate of slerp-merge validate (false: "
                       "spot checks only)")
    gate_margin: float = Field(0.10, ge=0.0, description="the gate: the merge's perplexity may exceed the "
                               "worse parent's by this fraction (default 0.10)")
    gate_max_tokens: int = Field(1024, ge=2, description="the gate's evaluation tokens, the first of the "
                                 "bundled text (default 1024, as slerp-merge validate --max-tokens)")

    @field_validator("model_1", "model_2", "tokenizer", mode="before")
    @classmethod
    def _parse_ref(cls, v: Any) -> Any:
        return None if v is None else ModelRef.parse(v)

    @field_validator("connections", mode="before")
    @classmethod
    def _check_connections(cls, v: Any) -> Any:
        n = v
        if isinstance(v, str) and v.strip().isdigit():
            n = int(v)
        if v == "auto" or (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64):
            return n
        raise ValueError(f"connections must be 1 to 64 or auto, got {v!r}")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    def t_for(self, tensor_name: str, fraction: float) -> float:
        """The t of one tensor (see :func:`resolve_setting`).

        Raises:
            ConfigError: no filter of the schedule matches the tensor.
        """
        value = resolve_setting(self.t, tensor_name, fraction)
        if value is None:
            raise ConfigError(f"t: no filter matches tensor {tensor_name!r}; add an entry without filter")
        return value

    @property
    def stored_dtype(self) -> str | None:
        """The dtype the output is stored in, if the spec fixes one."""
        return self.out_dtype or self.dtype

    @property
    def tokenizer_ref(self) -> ModelRef:
        return self.tokenizer or self.model_1

    @classmethod
    def build(cls, **fields: Any) -> MergeSpec:
        """Validate ``fields`` into a spec.

        Args:
            **fields: the spec's fields by name (``model_1``, ``model_2``, ``t``, ``output``, ...);
                sizes may be text (``"2GB"``), models ``"org/name@rev"`` or a folder.

        Returns:
            The validated spec.

        Raises:
            ConfigError: one line per invalid field, naming the field and the rule.
        """
        try:
            return cls(**fields)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    """A pydantic error as one line: ``field: message; field: message``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        elif "input" in err and err["type"] not in ("missing", "value_error"):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    return redact_secrets("invalid merge config: " + "; ".join(parts))
