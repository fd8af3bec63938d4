"""A causal LM evaluated with its weights left on disk, in bounded memory at any size.

:class:`StreamedCausalLM` builds the model's own transformers class on the meta device (no
weights) and runs the model's own forward, with each module given its weights just as it runs:

- an embedding reads only the rows of the tokens it looks up;
- a linear layer is applied in blocks of output rows, each block read, converted and multiplied
  in turn (:data:`READ_BLOCK_ELEMENTS` elements at a time), so no weight matrix is ever whole in
  memory in the compute dtype;
- other modules (norms) read their small parameters whole;
- the LM head is applied the same way in blocks of vocabulary rows, and the next-token loss is
  reduced block by block (a running log-sum-exp), so no row of logits over the whole vocabulary
  is ever held. ``final_logit_softcapping``, ``logit_scale`` and ``logits_scaling`` in the config
  are applied as transformers does.

Memory is therefore a block of weights plus the activations of the evaluation tokens: ~1 GB for
a 72B Qwen-family model on 1024 tokens, on CPU or GPU. The weights come from a folder or, during a
streaming merge, from a :class:`~slerp_plugin.validate.weights.TensorFeed` that offers each shard's
tensors as it is merged. With :meth:`StreamedCausalLM.resident` all weights are read once and kept,
for work that runs the model many times (greedy generation).

A run stopped part way can go on from a decoder layer's output: :attr:`StreamedCausalLM.reached`
is the output of the last decoder layer run (while only the input embedding and decoder layers up
to it have run), and :meth:`StreamedCausalLM.skip_through` makes a new model take up from such an
output, reading no tensor of the modules before it.

Weights are read with ``pread`` (nothing is mapped, so the process does not grow with the files)
and converted to the dtype transformers gives each parameter: float32 on CPU, the checkpoint's
dtype on GPU, unless another is asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..errors import ValidationInputError, first_line
from ..io.reader import TensorReader
from ..io.safetensors import Checkpoint, TensorInfo
from .weights import FolderWeights

log = logging.getLogger(__name__)

#: the head's logits (float32) are computed for this many bytes at a time
LOGITS_BUDGET_BYTES = 64 << 20
#: weights are read and converted this many elements at a time
READ_BLOCK_ELEMENTS = 1 << 22


def hidden_state_bytes(hidden_size: int, tokens: int, max_length: int, itemsize: int) -> int:
    """Bytes of one set of hidden states of ``tokens`` tokens evaluated in windows of
    ``max_length``, ``hidden_size`` values of ``itemsize`` bytes each per token."""
    windows = -(-tokens // max(max_length, 1))
    return windows * min(tokens, max_length) * hidden_size * itemsize


class WeightSource(Protocol):
    """Where a module's tensors are, asked for just before it runs (see :mod:`.weights`)."""

    def acquire(self, names: list[str]) -> list[TensorInfo]: ...

    def release(self, names: list[str]) -> None: ...


@dataclass(frozen=True)
class _Source:
    """Where one parameter of a module comes from."""

    name: str  #: the parameter's name in its module
    key: str  #: the tensor's name in the checkpoint
    info: TensorInfo  #: its shape and stored dtype (where it lies is asked of the source)
    placeholder: nn.Parameter  #: the meta parameter put back after the module ran


@dataclass(frozen=True)
class LayerOutput:
    """The hidden states a decoder layer returned, for every evaluation window."""

    layer: int  #: the decoder layer's index
    hidden: torch.Tensor  #: windows × positions × hidden size, in the compute dtype


class StreamedCausalLM:
    """A transformers causal LM whose modules read their weights just as they run (see the module
    docstring).

    Args:
        folder: the model's folder: its ``config.json``, and its weights unless ``weights`` is given.
        device: where the model computes.
        dtype: the compute dtype (default: float32 on CPU, the checkpoint's floating dtype elsewhere).
        weights: where the tensors are read from (default: ``folder``'s safetensors files); a
            :class:`~slerp_plugin.validate.weights.TensorFeed` has its :meth:`expect` called here.
        layout: the tensors' names, shapes and dtypes, needed with ``weights`` (default: those of
            ``folder``'s checkpoint).

    Raises:
        ValidationInputError: the folder's config or weights cannot be read, or a parameter the
            model class expects is not in the checkpoint or has another shape.
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype | None = None, *,
                 weights: WeightSource | None = None, layout: Mapping[str, TensorInfo] | None = None) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.device = device
        if layout is None:
            layout = Checkpoint.open(self.folder).tensors
        self.layout = layout
        self.weights: WeightSource = weights if weights is not None else FolderWeights(layout)
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
        self._buffers: dict[str, torch.Tensor] = {}
        self._resident = False
        self._sources = self._map_sources()
        self._head = self.model.get_output_embeddings()
        self._embed = self.model.get_input_embeddings()
        self._layers = _decoder_layers(self.model)
        self._owner = {m: i for i, layer in enumerate(self._layers)
                       for m in layer.modules() if m in self._sources}  # module → its decoder layer
        self._skipped: set[nn.Module] = set()
        self._highest = -1  # the last decoder layer a module run so far belongs to (the embedding: -1)
        self._foreign = False  # a module outside the embedding and the decoder layers has run
        #: the output of the last decoder layer run, while :meth:`skip_through` could go on from it
        self.reached: LayerOutput | None = None
        self._active: dict[nn.Module, list[TensorInfo]] = {}
        self._move_buffers()
        for module in self._sources:
            if self._blocked(module):
                module.forward = functools.partial(self._linear, module)  # type: ignore[method-assign]
            if isinstance(module, nn.Embedding):
                module.padding_idx = None  # only training uses it; the tables here hold only some rows
        self._hooks = [h for m in self._sources if m is not self._head for h in (
            m.register_forward_pre_hook(self._load, with_kwargs=True), m.register_forward_hook(self._drop))]
        self._hooks += [layer.register_forward_hook(functools.partial(self._after_layer, i))
                        for i, layer in enumerate(self._layers)]
        self._expect()

    # ------------------------------------------------------------------ set-up

    def _checkpoint_dtype(self) -> torch.dtype:
        counts: dict[torch.dtype, int] = {}
        for info in self.layout.values():
            if info.torch_dtype.is_floating_point:
                counts[info.torch_dtype] = counts.get(info.torch_dtype, 0) + info.numel
        return max(counts, key=counts.get) if counts else torch.float32  # type: ignore[arg-type]

    def _map_sources(self) -> dict[nn.Module, list[_Source]]:
        """Each module that owns parameters → which tensor each of them is."""
        tied = dict(getattr(self.model, "all_tied_weights_keys", None) or {})
        tensors = self.layout
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
                sources.setdefault(module, []).append(_Source(pname, found, info, param))
        return sources

    def _expect(self) -> None:
        """Tell a feed how many modules still to run read each tensor."""
        expect = getattr(self.weights, "expect", None)
        if expect is not None:
            readers: dict[str, int] = {}
            for module, sources in self._sources.items():
                if module not in self._skipped:
                    for s in sources:
                        readers[s.key] = readers.get(s.key, 0) + 1
            expect(readers)

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.device.type != "meta":
                    module._buffers[name] = buf.to(self.device)

    def _blocked(self, module: nn.Module) -> bool:
        """Whether ``module`` is applied block by block (a plain linear layer)."""
        return isinstance(module, nn.Linear) and {s.name for s in self._sources[module]} <= {"weight", "bias"}

    # ------------------------------------------------------------------ the hooks

    def _keys(self, module: nn.Module) -> list[str]:
        return [s.key for s in self._sources[module]]

    def _load(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._resident:
            return None
        owner = self._owner.get(module, -1 if module is self._embed else None)
        if owner is None:
            self._foreign = True
        else:
            self._highest = max(self._highest, owner)
        if module in self._skipped:
            return self._zero_embedding(module, args, kwargs)
        infos = self.weights.acquire(self._keys(module))
        if self._blocked(module):
            self._active[module] = infos
            return None
        ids = args[0] if args else kwargs.get("input")
        if isinstance(module, nn.Embedding) and isinstance(ids, torch.Tensor):
            rows = self._fill_rows(module, infos[0], ids)
            return ((rows, *args[1:]), kwargs) if args else (args, {**kwargs, "input": rows})
        for src, info in zip(self._sources[module], infos, strict=True):
            module._parameters[src.name] = nn.Parameter(self._read(src, info), requires_grad=False)
        return None

    def _drop(self, module: nn.Module, _args: object, _output: object) -> None:
        if self._resident:
            return
        self._active.pop(module, None)
        self._empty(module)
        if module not in self._skipped:
            self.weights.release(self._keys(module))

    def _after_layer(self, index: int, _module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and not self._foreign and self._highest <= index:
            self.reached = LayerOutput(index, output)
        else:
            self.reached = None

    def _zero_embedding(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A skipped input embedding looks up zeros (the layers after it return the saved output)."""
        (src,) = self._sources[module]
        zeros = torch.zeros((1, src.info.shape[1]), dtype=src.placeholder.dtype, device=self.device)
        module._parameters[src.name] = nn.Parameter(zeros, requires_grad=False)
        ids = args[0] if args else kwargs["input"]
        local = torch.zeros_like(ids)
        return ((local, *args[1:]), kwargs) if args else (args, {**kwargs, "input": local})

    def _read(self, src: _Source, info: TensorInfo) -> torch.Tensor:
        """The whole parameter in its dtype on the device, read in blocks of ``READ_BLOCK_ELEMENTS``
        so that the stored bytes never sit in memory beside the converted tensor."""
        value = torch.empty(info.shape, dtype=src.placeholder.dtype, device=self.device)
        flat = value.view(-1)
        for start in range(0, info.numel, READ_BLOCK_ELEMENTS):
            count = min(READ_BLOCK_ELEMENTS, info.numel - start)
            flat[start:start + count].copy_(self._reader.read_tensor(info, start, count))
        return value

    def _rows(self, info: TensorInfo, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[start, stop)`` of a 2-D tensor, converted to ``dtype`` on the device: a view of
        this model's block buffers, valid until the next call."""
        width = info.shape[1]
        count = (stop - start) * width
        raw = self._buffer("raw", count * info.itemsize, torch.uint8, torch.device("cpu"))
        self._reader.read(info, start * width * info.itemsize, memoryview(raw.numpy()))
        stored = raw.view(info.torch_dtype).view(stop - start, width)
        out = self._buffer(f"rows-{dtype}", count, dtype, self.device).view(stop - start, width)
        return out.copy_(stored)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable buffer of at least ``numel`` elements (blocks are the same size all along,
        so they are allocated once, not once per block)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            size = max(numel, READ_BLOCK_ELEMENTS)
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel]

    def _fill_rows(self, module: nn.Embedding, info: TensorInfo, ids: torch.Tensor) -> torch.Tensor:
        """A table of only the rows ``ids`` looks up; returns ``ids`` re-numbered into it."""
        (src,) = self._sources[module]
        rows, local = torch.unique(ids.detach().cpu(), return_inverse=True)
        if rows.numel() and not 0 <= int(rows[0]) <= int(rows[-1]) < info.shape[0]:
            bad = int(rows[-1]) if int(rows[-1]) >= info.shape[0] else int(rows[0])
            raise ValidationInputError(f"{self.folder}: token id {bad} is outside the embedding table "
                                       f"({info.shape[0]} rows); the tokenizer does not match the model")
        table = torch.empty((rows.numel(), info.shape[1]), dtype=src.placeholder.dtype, device=self.device)
        for i, row in enumerate(rows.tolist()):
            table[i].copy_(self._rows(info, row, row + 1, table.dtype)[0])
        module._parameters[src.name] = nn.Parameter(table, requires_grad=False)
        return local.to(ids.device)

    def _empty(self, module: nn.Module) -> None:
        for src in self._sources[module]:
            module._parameters[src.name] = src.placeholder

    def _linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` with its weight read in blocks of output rows (whole when resident)."""
        if module.weight.device.type != "meta":
            return nn.functional.linear(x, module.weight, module.bias)
        sources = {s.name: s for s in self._sources[module]}
        infos = dict(zip(sources, self._active[module], strict=True))
        weight = infos["weight"]
        step = max(1, READ_BLOCK_ELEMENTS // max(weight.shape[1], 1))
        if step >= weight.shape[0]:
            out = torch.matmul(x, self._rows(weight, 0, weight.shape[0], x.dtype).t())
        else:
            out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
            for start in range(0, weight.shape[0], step):
                stop = min(weight.shape[0], start + step)
                out[..., start:stop] = self._product(x, self._rows(weight, start, stop, x.dtype))
        if "bias" in infos:
            out += self._read(sources["bias"], infos["bias"]).to(x.dtype)
        return out

    def _product(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``x @ rows.T`` in a reusable buffer, valid until the next call (the same product, bit for
        bit, as a new tensor; blocks of a MB or more would otherwise be mapped afresh each time while
        :func:`~slerp_plugin.validate.fed.return_large_blocks` holds)."""
        shape = (*x.shape[:-1], rows.shape[0])
        out = self._buffer(f"product-{x.dtype}", math.prod(shape), x.dtype, x.device).view(shape)
        return torch.matmul(x, rows.t(), out=out)

    # ------------------------------------------------------------------ use

    def keys_after(self, layer: int) -> set[str]:
        """The tensors read by the modules that run after decoder layer ``layer`` (a tied head reads
        the embedding table)."""
        return {s.key for m, sources in self._sources.items()
                if m is not self._embed and self._owner.get(m, layer + 1) > layer for s in sources}

    def hidden_bytes(self, tokens: int, max_length: int) -> int:
        """Bytes of one set of hidden states of :meth:`negative_log_likelihood` over ``tokens``
        tokens in windows of ``max_length`` (what :attr:`reached` holds)."""
        width = getattr(self.config.get_text_config(), "hidden_size", 0)
        return hidden_state_bytes(width, tokens, max_length, self.dtype.itemsize)

    def check_reached(self, reached: LayerOutput) -> None:
        """Whether :meth:`skip_through` can go on from ``reached``.

        Raises:
            ValueError: the model has no such decoder layer, or the hidden states do not fit it.
        """
        width = getattr(self.config.get_text_config(), "hidden_size", None)
        hidden = reached.hidden
        if not 0 <= reached.layer < len(self._layers) or self._embed not in self._sources:
            raise ValueError(f"decoder layer {reached.layer}: the model has {len(self._layers)} decoder "
                             "layers to go on from")
        if hidden.dim() != 3 or hidden.shape[-1] != width or hidden.dtype != self.dtype:
            raise ValueError(f"hidden states {list(hidden.shape)} {hidden.dtype} do not fit a hidden size "
                             f"of {width} in {self.dtype}")

    def skip_through(self, reached: LayerOutput) -> None:
        """Go on from ``reached`` (a :attr:`reached` of an earlier run of the same model on the same
        tokens): the input embedding and decoder layers up to ``reached.layer`` read nothing, and
        that layer returns ``reached.hidden``. Call before the model runs.

        Raises:
            ValueError: see :meth:`check_reached`.
        """
        self.check_reached(reached)
        self._skipped = {m for m in self._sources
                         if m is self._embed or self._owner.get(m, reached.layer + 1) <= reached.layer}
        saved = reached.hidden.to(self.device)
        for layer in self._layers[:reached.layer + 1]:
            layer.forward = functools.partial(_saved_output, saved)  # type: ignore[method-assign]
        self._expect()

    @property
    def shared_bytes(self) -> int:
        """Bytes (as stored) of the tensors more than one module reads: a tied head reads the
        embedding table last, so a model fed shard by shard keeps a copy of it aside."""
        seen: dict[str, int] = {}
        for sources in self._sources.values():
            for s in sources:
                seen[s.key] = seen.get(s.key, 0) + 1
        return sum(self.layout[k].nbytes for k, n in seen.items() if n > 1)

    @property
    def weight_bytes(self) -> int:
        """Bytes all weights take in the compute dtypes (what :meth:`resident` holds)."""
        return sum(s.info.numel * s.placeholder.element_size()
                   for sources in self._sources.values() for s in sources)

    @contextlib.contextmanager
    def resident(self) -> Iterator[StreamedCausalLM]:
        """All weights read once and kept until the block ends."""
        for module, sources in self._sources.items():
            infos = self.weights.acquire(self._keys(module))
            for src, info in zip(sources, infos, strict=True):
                module._parameters[src.name] = nn.Parameter(self._read(src, info), requires_grad=False)
        self._resident = True
        try:
            yield self
        finally:
            self._resident = False
            for module in self._sources:
                self._empty(module)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The model's logits for a batch of token ids (inside :meth:`resident` only: outside it,
        the head is never applied whole)."""
        with torch.inference_mode():
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask,
                              position_ids=position_ids, use_cache=False).logits

    def negative_log_likelihood(self, input_ids: torch.Tensor, max_length: int) -> tuple[float, int]:
        """Summed next-token NLL (nats) over ``input_ids`` cut into windows of ``max_length``
        tokens, and the number of predicted tokens.

        All windows run as one batch (one pass over the weights); a shorter last window is padded
        at its end, which changes nothing before the padding in a causal model, and its padded
        positions are not scored. The head and the loss run block by block (see the module
        docstring).
        """
        windows = [input_ids[i:i + max_length] for i in range(0, input_ids.numel(), max_length)]
        windows = [w for w in windows if w.numel() >= 2]
        if not windows:
            return 0.0, 0
        width = max(w.numel() for w in windows)
        batch = torch.zeros((len(windows), width), dtype=torch.long)
        scored = torch.zeros((len(windows), width), dtype=torch.bool)
        for row, w in enumerate(windows):
            batch[row, :w.numel()] = w
            scored[row, 1:w.numel()] = True
        decoder = getattr(self.model, self.model.base_model_prefix)
        with torch.inference_mode():
            hidden = decoder(input_ids=batch.to(self.device), use_cache=False).last_hidden_state
            self.reached = None
            mask = scored[:, 1:].to(hidden.device)
            states = hidden[:, :-1][mask]
            del hidden
            targets = batch[:, 1:][scored[:, 1:]].to(states.device)
            return self._head_nll(states, targets), int(targets.numel())

    def _head_nll(self, states: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed cross-entropy of the head's logits at ``states`` (positions × hidden) against
        ``targets``, over blocks of vocabulary rows with a running log-sum-exp."""
        head = self._head
        sources = {s.name: s for s in self._sources[head]}
        keys = [s.key for s in sources.values()]
        infos = dict(zip(sources, self.weights.acquire(keys), strict=True))
        weight = infos["weight"]
        vocab, hidden = weight.shape
        step = max(1, min(READ_BLOCK_ELEMENTS // max(hidden, 1),
                          LOGITS_BUDGET_BYTES // (4 * max(states.shape[0], 1))))
        states = states.to(self.dtype)
        bias = None
        if "bias" in infos:
            bias = head.bias if self._resident else self._read(sources["bias"], infos["bias"])
        running = torch.full((states.shape[0],), -math.inf, dtype=torch.float32, device=states.device)
        picked = torch.zeros_like(running)
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            rows = head.weight[start:stop] if self._resident else self._rows(weight, start, stop, self.dtype)
            logits = self._product(states, rows)
            if bias is not None:
                logits += bias[start:stop]
            logits = self._after_head(logits.float())
            running = torch.logaddexp(running, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < stop)
            picked[inside] = logits[inside, targets[inside] - start]
        self.weights.release(keys)
        return float((running - picked).sum())

    def _after_head(self, logits: torch.Tensor) -> torch.Tensor:
        """What the architecture does to the head's output (transformers' own rules)."""
        config = self.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        divisor = getattr(config, "logits_scaling", None)
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
            logits = logits / divisor
        cap = getattr(config, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)) and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

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
        self._buffers.clear()
        _trim_heap()

    def __enter__(self) -> StreamedCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers the model runs one after the other (none found: an empty list)."""
    decoder = getattr(model, model.base_model_prefix, None)
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if decoder is None or not count:
        return []
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == count:
            return list(child)
    return []


def _saved_output(saved: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor:
    return saved


def _trim_heap() -> None:
    """glibc keeps freed blocks of a few MB in its heap; the weights of the next model would then
    be allocated beside them. ``malloc_trim`` returns them (a no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
