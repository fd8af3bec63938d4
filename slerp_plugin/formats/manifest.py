"""The merge manifest (``merge_manifest.json``), written into every merged model folder.

Schema version 1. Resume, the Hub commit message, the model card, the nightly skip check and the
dashboard read it. Fields:

- ``spec``: the :class:`~slerp_plugin.spec.MergeSpec` as run (JSON form);
- ``inputs``: per role (``model_1``, ``model_2``, ``tokenizer``): reference, revision, the Hub
  commit it resolved to (None for local folders), resolved local path, and every file used with
  its size and SHA-256;
- ``output``: each shard's file name, size, SHA-256 and tensor count; total tensor bytes; dtype(s);
- ``tensors``: per output tensor: name, shape, dtype, shard and the SLERP ``branch``
  (``slerp`` | ``lerp`` | ``unnormalised`` | ``shape-kept``) with ``d``, ``s0``, ``s1``;
- ``branch_counts``, ``warnings``, ``versions`` (Python packages), ``timings`` (seconds, bytes,
  MB/s), ``resume`` (shards reused from an interrupted run), ``plan_fingerprint`` (a hash of
  the inputs' identity, the options and the shard plan).
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..io.atomic import write_json_atomic
from ..io.hashing import cached_sha256
from ..spec import ModelRef

MANIFEST_NAME = "merge_manifest.json"
MANIFEST_SCHEMA_VERSION = 1

BranchName = Literal["slerp", "lerp", "unnormalised", "shape-kept"]


class InputFile(BaseModel):
    """One file of an input model."""

    name: str
    size: int
    sha256: str | None = None


class InputRecord(BaseModel):
    """One input (model or tokenizer) as it was resolved."""

    ref: str
    revision: str | None = None
    commit: str | None = Field(None, description="the Hub commit sha the revision resolved to")
    path: str
    files: list[InputFile] = Field(default_factory=list)
    content_sha256: str | None = Field(
        None, description="published manifests, local inputs: SHA-256 of the files' names, sizes and "
        "SHA-256s (the folder's path is not published)")


class ShardRecord(BaseModel):
    """One written output shard; also the resume journal entry for it."""

    file: str
    size: int
    sha256: str
    tensors: int


class TensorRecord(BaseModel):
    """What happened to one output tensor."""

    name: str
    shape: list[int]
    dtype: str
    shard: str
    branch: BranchName
    t: float | None = None
    d: float | str | None = Field(
        None, description="the cosine of the pair as computed (see norm_precision); the branch compared it, "
        "rounded to the compute dtype, with DOT_THRESHOLD")
    s0: float | str | None = None
    s1: float | str | None = None
    norm_precision: Literal["float64", "float32"] | None = Field(
        None, description="how d was taken: float64 (exact products, float64 sums over chunks: the same "
        "on every machine), or float32 whole-tensor norms and sum (FusionBench's, as on the machine that "
        "merged)")


class OutputRecord(BaseModel):
    shards: list[ShardRecord]
    total_size: int
    dtypes: dict[str, int]


class Manifest(BaseModel):
    """The JSON document described in this module's docstring."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    tool: dict[str, str]
    created_at: str
    spec: dict[str, Any]
    inputs: dict[str, InputRecord]
    output: OutputRecord
    tensors: list[TensorRecord]
    branch_counts: dict[str, int]
    warnings: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    resume: dict[str, int] = Field(default_factory=dict)
    plan_fingerprint: str | None = Field(None, description="identifies inputs+options+plan (resume)")

    @classmethod
    def create(
        cls,
        *,
        spec: dict[str, Any],
        inputs: dict[str, InputRecord],
        shards: list[ShardRecord],
        total_size: int,
        tensors: list[TensorRecord],
        warnings: list[str] | None = None,
        timings: dict[str, float] | None = None,
        resume: dict[str, int] | None = None,
        plan_fingerprint: str | None = None,
        engine: str = "slerp_plugin",
    ) -> Manifest:
        """A manifest for a finished merge; branch counts, dtypes and versions are derived here."""
        from .. import __version__

        counts: dict[str, int] = {}
        dtypes: dict[str, int] = {}
        for t in tensors:
            counts[t.branch] = counts.get(t.branch, 0) + 1
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        return cls(
            tool={"name": "slerp_plugin", "version": __version__, "engine": engine},
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            spec=spec,
            inputs=inputs,
            output=OutputRecord(shards=shards, total_size=total_size, dtypes=dtypes),
            tensors=tensors,
            branch_counts=counts,
            warnings=list(warnings or []),
            versions=package_versions(),
            timings=dict(timings or {}),
            resume=dict(resume or {}),
            plan_fingerprint=plan_fingerprint,
        )

    def write(self, folder: Path) -> Path:
        """Write ``merge_manifest.json`` into ``folder`` (through a temporary file and a rename).

        Args:
            folder: the merged model's folder.

        Returns:
            The manifest's path.
        """
        return write_json_atomic(folder / MANIFEST_NAME, self.model_dump(mode="json"))

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        """Read the manifest of a merged model folder.

        Args:
            folder: the merged model's folder.

        Returns:
            The manifest, validated.

        Raises:
            OSError: there is no manifest; ``pydantic.ValidationError``: it is not a valid one.
        """
        return cls.model_validate_json((Path(folder) / MANIFEST_NAME).read_text())


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages that shape a merge's result."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("slerp_plugin", "torch", "safetensors", "transformers", "numpy", "mergekit"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def describe_input(
    ref: ModelRef, folder: Path, files: list[Path], hashes: dict[Path, str] | None = None
) -> InputRecord:
    """A manifest record of one input: reference, folder and each file's size and SHA-256
    (from ``hashes`` or computed, cached)."""
    hashes = hashes or {}
    return InputRecord(
        ref=ref.ref,
        revision=ref.revision,
        path=str(folder),
        files=[
            InputFile(name=str(f.relative_to(folder)), size=f.stat().st_size,
                      sha256=hashes.get(f) or cached_sha256(f))
            for f in files
        ],
    )
