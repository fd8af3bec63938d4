"""MergeSpec: the one typed description of a merge that every input format is converted into.

The seed's FusionBench YAML (with Hydra overrides), Python calls and, later, mergekit YAML and
Airflow params all become a :class:`MergeSpec`, validated here and nowhere else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .slerp import DEFAULT_CHUNK_ELEMENTS, DEFAULT_DOT_THRESHOLD, DEFAULT_EPSILON

SPEC_SCHEMA_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # "5GB", as transformers' save_pretrained

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
        """A reference from ``"path"``, ``"org/name@rev"`` or a mapping."""
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


class MergeSpec(BaseModel):
    """Everything that determines a SLERP merge of two causal LMs.

    ``t``: 0 ≤ t ≤ 1 (0 → model_1, 1 → model_2). ``DOT_THRESHOLD``: 0 < τ ≤ 1, |cos| above it
    uses LERP. ``epsilon`` > 0: norms at or below it are not normalised. ``dtype``: the dtype the
    models are loaded in and the output is stored in (None = each tensor keeps model_1's dtype).
    ``max_shard_size``: bytes per output shard (default 5 GB). ``device``: ``auto`` (cuda when
    present), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    schema_version: Literal[1] = SPEC_SCHEMA_VERSION
    model_1: ModelRef
    model_2: ModelRef
    model_names: tuple[str, str] = ("model_1", "model_2")
    tokenizer: ModelRef | None = Field(None, description="tokenizer source; None = model_1")
    t: float = Field(ge=0.0, le=1.0)
    DOT_THRESHOLD: float = Field(DEFAULT_DOT_THRESHOLD, gt=0.0, le=1.0)
    epsilon: float = Field(DEFAULT_EPSILON, gt=0.0)
    dtype: Annotated[DType | None, BeforeValidator(_normalise_dtype)] = None
    output: Path
    max_shard_size: Annotated[int, BeforeValidator(parse_size)] = DEFAULT_MAX_SHARD_SIZE
    device: str = "auto"
    show_pbar: bool = False
    overwrite: bool = False
    chunk_elements: int = Field(DEFAULT_CHUNK_ELEMENTS, ge=1024)

    @field_validator("model_1", "model_2", "tokenizer", mode="before")
    @classmethod
    def _parse_ref(cls, v: Any) -> Any:
        return None if v is None else ModelRef.parse(v)

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @property
    def tokenizer_ref(self) -> ModelRef:
        return self.tokenizer or self.model_1

    @classmethod
    def build(cls, **fields: Any) -> MergeSpec:
        """Validate ``fields`` into a spec.

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
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "invalid merge config: " + "; ".join(parts)
