"""Structural checks of a merged model: every shard of the index parses; key set, shapes and
dtypes as planned; no NaN/Inf (streamed in chunks) (:func:`check_tensors`); config and tokenizer
load (:func:`load_config_and_tokenizer`)."""

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


def check_tensors(folder: Path, expected: dict[str, tuple[tuple[int, ...], str]],
                  chunk_elements: int = 1 << 22) -> StructuralResult:
    """Shards, key set, shapes, dtypes and finiteness (read ``chunk_elements`` at a time)."""
    problems: list[str] = []
    try:
        ckpt = Checkpoint.open(folder)
    except CheckpointError as e:
        return StructuralResult(passed=False, problems=[str(e)])
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
                if not _surely_finite(chunk):
                    bad += int((~torch.isfinite(chunk)).sum())
                scanned += chunk.nbytes
            if bad:
                nonfinite.append(f"{name} ({bad} NaN/Inf)")
    if nonfinite:
        problems.append(f"non-finite values in {len(nonfinite)} tensor(s): {', '.join(nonfinite[:5])}")
    return StructuralResult(passed=not problems, problems=problems, tensors=len(ckpt.tensors),
                            bytes_scanned=scanned)


_SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
               torch.float64: torch.float64}


def _surely_finite(chunk: torch.Tensor) -> bool:
    """True when ``chunk`` has no NaN/Inf, told from its sum (a tenth of the time of testing every
    element); False when it may have some (the sum also overflows on huge finite values)."""
    dtype = _SUM_DTYPES.get(chunk.dtype)
    return dtype is not None and bool(torch.isfinite(chunk.sum(dtype=dtype)))


def load_config_and_tokenizer(folder: Path) -> tuple[object | None, str | None]:
    """The tokenizer of ``folder`` once its config and tokenizer load as transformers loads them;
    or None and the problem (one line)."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder), None
    except Exception as e:  # transformers raises many types; the message is what matters
        return None, f"config/tokenizer do not load: {first_line(e)}"
