"""A causal LM evaluated with its weights left on disk.

:class:`StreamedCausalLM` builds the model's own transformers class on the meta device (no
weights), then reads each module's parameters from the safetensors files just before the module
runs and drops them right after. Memory is therefore one module's weights (the largest is usually
the embedding or the LM head) plus the activations, at any model size, on CPU or GPU. With
:meth:`StreamedCausalLM.resident` all weights are read once and kept, for work that runs the model
many times (greedy generation).

Weights are read with ``pread`` (nothing is mapped, so the process does not grow with the files)
and converted to the dtype transformers gives each parameter: float32 on CPU, the checkpoint's
dtype on GPU, unless another is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ValidationInputError, first_line
from ..io.reader import TensorReader
from ..io.safetensors import Checkpoint, TensorInfo

log = logging.getLogger(__name__)

#: the head's logits (float32) are computed for this many bytes' worth of positions at a time
LOGITS_BUDGET_BYTES = 64 << 20
#: weights are read and converted this many elements at a time
READ_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class _Source:
    """Where one parameter of a module comes from."""

    name: str  #: the parameter's name in its module
    info: TensorInfo
    placeholder: nn.Parameter  #: the meta parameter put back after the module ran


class StreamedCausalLM:
    """A transformers causal LM whose modules read their weights from ``folder`` when they run.

    ``dtype`` (default: float32 on CPU, the checkpoint's floating dtype elsewhere) is the dtype
    the model computes in.

    Raises:
        ValidationInputError: the folder's config or weights cannot be read, or a parameter the
            model class expects is not in the checkpoint.
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.device = device
        self.checkpoint = Checkpoint.open(self.folder)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else self._checkpoint_dtype()
        self.dtype = dtype
        try:
            config = AutoConfig.from_pretrained(self.folder)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as e:  # transformers raises many types; the first line says what is wrong
            raise ValidationInputError(f"{self.folder}: the model cannot be built: {first_line(e)}",
                                       path=self.folder) from e
        self.model = model.eval()
        self.config = config
        self._reader = TensorReader()
        self._resident = False
        self._pins: set[nn.Module] = set()
        self._sources = self._map_sources()
        self._move_buffers()
        self._hooks = [h for m in self._sources for h in (
            m.register_forward_pre_hook(self._load, with_kwargs=True), m.register_forward_hook(self._drop))]

    # ------------------------------------------------------------------ set-up

    def _checkpoint_dtype(self) -> torch.dtype:
        counts: dict[torch.dtype, int] = {}
        for info in self.checkpoint.tensors.values():
            if info.torch_dtype.is_floating_point:
                counts[info.torch_dtype] = counts.get(info.torch_dtype, 0) + info.numel
        return max(counts, key=counts.get) if counts else torch.float32

    def _map_sources(self) -> dict[nn.Module, list[_Source]]:
        """Each module that owns parameters → where each of them is in the checkpoint."""
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        tensors = self.checkpoint.tensors
        sources: dict[nn.Module, list[_Source]] = {}
        for prefix, module in self.model.named_modules():
            for pname, param in module.named_parameters(recurse=False):
                key = f"{prefix}.{pname}" if prefix else pname
                found = key if key in tensors else tied.get(key)
                if found not in tensors:
                    raise ValidationInputError(
                        f"{self.folder}: {key} is not in the checkpoint; this layout cannot be evaluated "
                        "layer by layer", path=self.folder)
                info = tensors[found]
                if tuple(info.shape) != tuple(param.shape):
                    raise ValidationInputError(
                        f"{self.folder}: {found} has shape {list(info.shape)}, the model expects "
                        f"{list(param.shape)}", path=self.folder)
                sources.setdefault(module, []).append(_Source(pname, info, param))
        return sources

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)

    # ------------------------------------------------------------------ the hooks

    def _load(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._resident or module in self._pins:
            return
        ids = args[0] if args else kwargs.get("input")
        if type(module) is nn.Embedding and isinstance(ids, torch.Tensor):
            self._fill_rows(module, ids)
        else:
            self._fill(module)

    def _drop(self, module: nn.Module, _args: object, _output: object) -> None:
        if not self._resident and module not in self._pins:
            self._empty(module)

    def _fill(self, module: nn.Module) -> None:
        for src in self._sources[module]:
            module._parameters[src.name] = nn.Parameter(self._read(src), requires_grad=False)

    def _read(self, src: _Source) -> torch.Tensor:
        """The whole parameter in its dtype on the device, read in blocks of ``READ_BLOCK_ELEMENTS``
        so that the stored bytes never sit in memory beside the converted tensor."""
        value = torch.empty(src.info.shape, dtype=src.placeholder.dtype, device=self.device)
        flat = value.view(-1)
        for start in range(0, src.info.numel, READ_BLOCK_ELEMENTS):
            count = min(READ_BLOCK_ELEMENTS, src.info.numel - start)
            flat[start:start + count].copy_(self._reader.read_tensor(src.info, start, count))
        return value

    def _fill_rows(self, module: nn.Embedding, ids: torch.Tensor) -> None:
        """An embedding table with only the rows ``ids`` reads filled: the lookup touches no other."""
        (src,) = self._sources[module]
        width = src.info.numel // max(src.info.shape[0], 1)
        table = torch.empty(src.info.shape, dtype=src.placeholder.dtype, device=self.device)
        for row in torch.unique(ids.detach().cpu()).tolist():
            if 0 <= row < src.info.shape[0]:
                table[row].copy_(self._reader.read_tensor(src.info, row * width, width))
        module._parameters[src.name] = nn.Parameter(table, requires_grad=False)

    def _empty(self, module: nn.Module) -> None:
        for src in self._sources[module]:
            module._parameters[src.name] = src.placeholder

    # ------------------------------------------------------------------ use

    @property
    def weight_bytes(self) -> int:
        """Bytes all weights take in the compute dtypes (what :meth:`resident` holds)."""
        return sum(s.info.numel * s.placeholder.element_size()
                   for sources in self._sources.values() for s in sources)

    @contextlib.contextmanager
    def resident(self) -> Iterator[StreamedCausalLM]:
        """All weights read once and kept until the block ends."""
        for module in self._sources:
            self._fill(module)
        self._resident = True
        try:
            yield self
        finally:
            self._resident = False
            for module in self._sources:
                self._empty(module)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits for a batch of token ids (one pass over the weights)."""
        with torch.inference_mode():
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False).logits

    def negative_log_likelihood(self, input_ids: torch.Tensor, max_length: int) -> tuple[float, int]:
        """Summed next-token NLL (nats) over ``input_ids`` cut into windows of ``max_length``
        tokens, and the number of predicted tokens.

        Windows of equal length run as one batch through the decoder (one pass over its weights);
        the head then runs on a few positions at a time (its logits stay under
        :data:`LOGITS_BUDGET_BYTES`), through the model's own forward so that whatever the
        architecture does after the head (soft-capping, scaling) is kept.
        """
        windows = [input_ids[i:i + max_length] for i in range(0, input_ids.numel(), max_length)]
        windows = [w for w in windows if w.numel() >= 2]
        nll, count = 0.0, 0
        for length in sorted({w.numel() for w in windows}, reverse=True):
            batch = torch.stack([w for w in windows if w.numel() == length]).to(self.device)
            nll += self._batch_nll(batch)
            count += batch.shape[0] * (length - 1)
        return nll, count

    def _batch_nll(self, batch: torch.Tensor) -> float:
        prefix = self.model.base_model_prefix
        decoder = getattr(self.model, prefix)
        head = [m for m in self._sources if not any(m is d for d in decoder.modules())]
        vocab = int(self.config.get_text_config().vocab_size)
        step = max(1, LOGITS_BUDGET_BYTES // (batch.shape[0] * vocab * 4))
        total = 0.0
        with torch.inference_mode():
            hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
            with self._pinned(head):
                for start in range(0, batch.shape[1] - 1, step):
                    stop = min(batch.shape[1] - 1, start + step)
                    setattr(self.model, prefix, _Hidden(hidden[:, start:stop]))
                    try:
                        logits = self.model(input_ids=batch[:, start:stop], use_cache=False).logits
                    finally:
                        setattr(self.model, prefix, decoder)
                    target = batch[:, start + 1:stop + 1]
                    total += float(nn.functional.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        return total

    @contextlib.contextmanager
    def _pinned(self, modules: list[nn.Module]) -> Iterator[None]:
        """``modules`` keep their weights until the block ends (read once, not once per call)."""
        fresh = [m for m in modules if not self._resident and m not in self._pins]
        for m in fresh:
            self._fill(m)
            self._pins.add(m)
        try:
            yield
        finally:
            for m in fresh:
                self._pins.discard(m)
                self._empty(m)

    def perplexity(self, input_ids: torch.Tensor, max_length: int) -> float:
        """``exp`` of the mean next-token NLL (see :meth:`negative_log_likelihood`)."""
        nll, count = self.negative_log_likelihood(input_ids, max_length)
        return math.exp(nll / max(count, 1))

    def greedy(self, prompts: list[torch.Tensor], max_new_tokens: int, eos: int | None,
               pad: int) -> list[list[int]]:
        """Greedy continuations (token ids) of ``prompts``, batched with left padding, each ending
        at ``eos``. Runs the model once per new token: only inside :meth:`resident`.

        Raises:
            RuntimeError: called outside :meth:`resident`.
        """
        if not self._resident:
            raise RuntimeError("greedy() needs the weights resident: use it inside resident()")
        width = max(p.numel() for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - p.numel():] = p
            mask[row, width - p.numel():] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                      eos_token_id=eos)
        new = []
        for row in out[:, width:].tolist():
            tokens = []
            for token in row:
                tokens.append(token)
                if token == eos:
                    break
            new.append(tokens)
        return new

    def close(self) -> None:
        """Remove the hooks, close the weight files, and hand freed heap memory back to the OS."""
        for h in self._hooks:
            h.remove()
        self._reader.close()
        _trim_heap()

    def __enter__(self) -> StreamedCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Hidden(nn.Module):
    """Stands in for the decoder while the head runs: returns its final hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *_args: object, **_kwargs: object) -> object:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=self.hidden)


def _trim_heap() -> None:
    """glibc keeps freed blocks of a few MB in its heap; the weights of the next model would then
    be allocated beside them. ``malloc_trim`` returns them (a no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
