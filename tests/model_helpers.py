"""Helpers shared by the tests: read and write small model folders."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slerp_plugin.engine import compute_threads
from slerp_plugin.io.model_files import OUTPUT_MARKER
from slerp_plugin.kernel import slerp, slerp_reference
from slerp_plugin.spec import MergeSpec
from slerp_plugin.validate import ulp_distance

HUB_TOKEN = "hf_test_token_write"
#: how far the engine's d may lie from an independent float64 computation of it, on any host
EXACT_D = 1e-12
#: how far a test's DOT_THRESHOLD lies from the pair's float64 d when it pins a branch: 10⁶× EXACT_D,
#: and above float32's half-ulp near 1 (3e-8), since the branch compares d rounded to float32
BRANCH_MARGIN = 1e-6
ROOT = Path(__file__).resolve().parents[1]  #: the repository
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: the devices a kernel or engine test runs on: the CPU always, CUDA where present
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder (every *.safetensors file)."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_model(folder: Path, state: dict[str, torch.Tensor], like: Path) -> Path:
    """A model folder holding ``state`` (single file) with config and tokenizer copied from ``like``."""
    folder.mkdir(parents=True)
    for f in like.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, folder / f.name)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (recursively) → bytes, for bit-identity checks; the output marker,
    which names the folder's own path, is left out."""
    files = sorted(Path(folder).rglob("*"))
    return {str(p.relative_to(folder)): p.read_bytes() for p in files
            if p.is_file() and p.name != OUTPUT_MARKER}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def spec_for(pair, out, **kw) -> MergeSpec:
    """A spec merging ``pair`` into ``out`` (t = 0.3 unless given)."""
    a, b = pair
    return MergeSpec.build(model_1=str(a), model_2=str(b), output=str(out), **{"t": 0.3, **kw})


def assert_matches_kernel(pair, out, t, chunk, out_dtype=None):
    """Every tensor of the merge ``out`` is bit for bit the kernel's, within one bf16 ulp of
    FusionBench's op order."""
    a, b, m = load_state(pair[0]), load_state(pair[1]), load_state(out)
    assert set(m) == set(b) == set(a)
    for k in b:
        # clone(): the engine reads into fresh (aligned) buffers, and BLAS dot rounding depends
        # on alignment (the loaded tensors are mapped at arbitrary offsets) and on the thread count
        with compute_threads(torch.device("cpu"), None):
            want = slerp(t, a[k].clone(), b[k].clone(), chunk_elements=chunk).to(out_dtype or a[k].dtype)
        assert m[k].dtype == want.dtype and m[k].shape == a[k].shape
        assert torch.equal(m[k], want), k
        ref = slerp_reference(t, a[k], b[k]).to(want.dtype)
        if want.dtype == torch.bfloat16:
            assert int(ulp_distance(m[k], ref).max()) <= 1, k


def rewrite(folder: Path, fn) -> None:
    """Apply ``fn(state)`` to the tensors of every shard, in place (shard layout kept)."""
    for shard in sorted(folder.glob("*.safetensors")):
        state = load_file(shard)
        fn(state)
        save_file(state, shard, metadata={"format": "pt"})


CLI = [sys.executable, "-m", "slerp_plugin"]


def run_cli(args, cwd, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``slerp-merge ARGS`` in ``cwd``, output captured: the command's :func:`main` in a process forked
    from a server that has imported the package once (a new interpreter's start-up, seconds of
    imports per run, is what :data:`CLI` runs test)."""
    from crash_harness import run_command

    return run_command(list(args), cwd, env)


def seed_args(pair, *extra):
    """The seed's config pointed at ``pair``, with ``extra`` overrides."""
    a, b = pair
    return [
        "--config-path", str(ROOT / "config/_get_started"), "--config-name", "llm_slerp",
        f"modelpool.models.model_1={a}", f"modelpool.models.model_2={b}", f"modelpool.tokenizer={a}",
        *extra,
    ]


def float64_cosine(a: torch.Tensor, b: torch.Tensor, epsilon: float = 1e-8) -> float:
    """FusionBench's ``d`` of a tensor pair in float64, independently of the kernel: float64
    products (exact for elements of float32 precision or less) summed by numpy's pairwise
    summation, which the kernel does not use."""
    x = a.detach().cpu().to(torch.float64).reshape(-1).numpy()
    y = b.detach().cpu().to(torch.float64).reshape(-1).numpy()
    na, nb = math.sqrt(float(np.add.reduce(x * x))), math.sqrt(float(np.add.reduce(y * y)))
    scale = (na if na > epsilon else 1.0) * (nb if nb > epsilon else 1.0)
    return float(np.add.reduce(x * y)) / scale


def near_parallel_pair(seed: int = 0, rows: int = 2048, cols: int = 1536,
                       noise: float = 3e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 tensors of ``rows × cols`` elements whose cosine is about ``1 − noise²/2`` (≈ 1 − 5e-6):
    float32 reductions over them are off by 1e-6–1e-4 depending on the host, float64 ones are not."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    b = (a.float() + noise * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)
    return a, b


def fusionbench_d(a: torch.Tensor, b: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """``d`` by FusionBench's own op order on whole tensors (float32 for 16-bit inputs), run here:
    whatever this machine's float32 reductions give."""
    if a.dtype not in (torch.float32, torch.float64):
        a, b = a.float(), b.float()
    norm_a, norm_b = torch.linalg.norm(a), torch.linalg.norm(b)
    na = a / norm_a if norm_a > epsilon else a
    nb = b / norm_b if norm_b > epsilon else b
    return torch.sum(na * nb)


def permuted_twin(folder, out):
    """``folder``'s model with each layer's MLP neurons in another order: the same function (and
    perplexity), but its neurons no longer line up with the original's, so merging them breaks both."""
    state = load_state(folder)
    g = torch.Generator().manual_seed(0)
    for key in [k for k in state if k.endswith("mlp.gate_proj.weight")]:
        prefix = key.removesuffix("gate_proj.weight")
        perm = torch.randperm(state[key].shape[0], generator=g)
        state[prefix + "gate_proj.weight"] = state[prefix + "gate_proj.weight"][perm].clone()
        state[prefix + "up_proj.weight"] = state[prefix + "up_proj.weight"][perm].clone()
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, perm].clone()
    return write_model(out, state, folder)


def fine_tuned(folder, out, steps: int = 3, lr: float = 5e-4):
    """``folder``'s model after ``steps`` steps of AdamW on a few sentences (none of the evaluation
    text): a real fine-tune of it, stored in the same dtype, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    text = ("Merging two language models by spherical interpolation keeps the norm of their weights. "
            "A short fine-tune moves every weight a little away from where it started.")
    ids = tokenizer(text, return_tensors="pt").input_ids
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.to(load_state(folder)["model.embed_tokens.weight"].dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
