"""Structural checks of a merged model: every shard of the index parses; key set, shapes and
dtypes as planned; no NaN/Inf (streamed in chunks); config and tokenizer load."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, first_line
from ..formats.manifest import Manifest
from ..io.reader import TensorReader
from ..io.safetensors import Checkpoint
from .report import StructuralResult


def expected_tensors(
    folder: Path, manifest: Manifest | None, model_1: Path
) -> dict[str, tuple[tuple[int, ...], str]]:
    if manifest is not None:
        return {t.name: (tuple(t.shape), t.dtype) for t in manifest.tensors}
    ck = Checkpoint.open(model_1)
    return {n: (i.shape, i.dtype) for n, i in ck.tensors.items()}


def check_structure(folder: Path, expected: dict[str, tuple[tuple[int, ...], str]],
                    chunk_elements: int = 1 << 22) -> tuple[StructuralResult, Checkpoint | None]:
    """Shards, key set, shapes, dtypes, finiteness (streamed), config and tokenizer loading."""
    problems: list[str] = []
    try:
        ckpt = Checkpoint.open(folder)
    except CheckpointError as e:
        return StructuralResult(passed=False, problems=[str(e)]), None
    missing = sorted(set(expected) - set(ckpt.tensors))
    extra = sorted(set(ckpt.tensors) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {', '.join(missing[:5])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:5])}")
    scanned = 0
    nonfinite = []
    with TensorReader() as reader:
        for name, info in ckpt.tensors.items():
            if name in expected:
                shape, dtype = expected[name]
                if info.shape != tuple(shape):
                    problems.append(f"{name}: shape {list(info.shape)}, expected {list(shape)}")
                if info.dtype != dtype:
                    problems.append(f"{name}: dtype {info.dtype}, expected {dtype}")
            if not info.torch_dtype.is_floating_point:
                continue
            bad = 0
            for start in range(0, info.numel, chunk_elements):
                count = min(chunk_elements, info.numel - start)
                try:
                    chunk = reader.read_tensor(info, start, count)
                except CheckpointError as e:
                    problems.append(str(e))
                    break
                bad += int((~torch.isfinite(chunk)).sum())
                scanned += chunk.nbytes
            if bad:
                nonfinite.append(f"{name} ({bad} NaN/Inf)")
    if nonfinite:
        problems.append(f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:5])}")
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types; the message is what matters
        problems.append(f"config/tokenizer do not load: {first_line(e)}")
    return (
        StructuralResult(passed=not problems, problems=problems, tensors=len(ckpt.tensors),
                         bytes_scanned=scanned),
        ckpt,
    )
