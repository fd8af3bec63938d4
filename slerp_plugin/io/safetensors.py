"""The safetensors format: headers read and checked, headers built, model folders indexed.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + the data buffer. The
header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to
the data buffer, plus an optional ``"__metadata__"`` of strings. A merge plans from headers alone
(:class:`Checkpoint`); tensor bytes are read by offset (:mod:`slerp_plugin.io.reader`) and output
shards written as a stream (:mod:`slerp_plugin.io.writer`) after a header computed up front
(:func:`build_header`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, first_line
from .index import INDEX_NAME, SINGLE_NAME, InvalidIndex, read_weight_map

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  #: the limit the safetensors library itself enforces

#: safetensors dtype name → (torch dtype name, bytes per element); names, so that reading a header
#: needs no torch
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_BY_TORCH_NAME = {torch_name: name for name, (torch_name, _) in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"BF16"`` → ``torch.bfloat16``)."""
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype: torch.dtype | str) -> str:
    """The safetensors name of a torch dtype or its name (``torch.bfloat16``, ``"bfloat16"`` → ``"BF16"``).

    Raises:
        CheckpointError: a dtype safetensors cannot store.
    """
    key = str(dtype).removeprefix("torch.")
    try:
        return _BY_TORCH_NAME[key]
    except KeyError as e:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from e


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, absolute byte ``offset`` and ``nbytes``, its dtype/shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header, as strictly as the safetensors library.

    The header is UTF-8 JSON: an object of tensor entries (``dtype``, a ``shape`` of non-negative
    integers, two integer ``data_offsets``) and an optional ``__metadata__`` object of strings; no
    key twice (the library itself takes a repeated tensor name silently; here it is refused). The
    tensors' byte ranges must follow one another from 0 without gaps or overlaps, each the size its
    dtype and shape give, and end exactly where the file ends. Returns the tensors in data order and
    the metadata.

    Raises:
        CheckpointError: missing, unreadable, corrupt or truncated file, with the reason.
    """
    size, header = _header_bytes(path)
    return parse_header(path, header, size)


def parse_header(path: Path, header: bytes, size: int) -> tuple[list[TensorInfo], dict[str, str]]:
    """:func:`read_header` of header bytes already read (``header``: the ``N`` bytes after the
    length) of a file of ``size`` bytes; ``path`` names the file in the result and in errors.

    Raises:
        CheckpointError: as :func:`read_header`.
    """
    doc = _parse_header_json(path, header)
    metadata = _metadata(path, doc.pop("__metadata__", None))
    data_start = 8 + len(header)
    infos = sorted((_tensor_info(path, name, entry, data_start) for name, entry in doc.items()),
                   key=lambda i: (i.offset, i.offset + i.nbytes))
    _check_layout(path, infos, data_start, size)
    return infos, metadata


def _header_bytes(path: Path) -> tuple[int, bytes]:
    """The file's size and its header's bytes (length checked against the file and the limit)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)", path=path)
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})", path=path)
            return size, f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found", path=path) from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{path}: is a folder, not a safetensors file", path=path) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse_header_json(path: Path, header: bytes) -> dict[str, object]:
    try:
        doc = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_no_constant)
        _check_strings(doc)
    except RecursionError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: nested too deeply", path=path) from e
    except (UnicodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {first_line(e)}", path=path) from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object", path=path)
    return doc


def _check_strings(node: object, depth: int = 0) -> None:
    """Every string of the header is valid Unicode (JSON escapes can encode lone surrogates)."""
    if depth > 4:  # deeper than any valid header: the entry checks reject it with a clearer reason
        return
    if isinstance(node, str):
        node.encode("utf-8")
    elif isinstance(node, dict):
        for key, value in node.items():
            key.encode("utf-8")
            _check_strings(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_strings(value, depth + 1)


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings",
                              path=path)
    return dict(metadata)


def _is_count(x: object) -> bool:
    return type(x) is int and 0 <= x < 1 << 64


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry checked: a known dtype, a shape of counts, two offsets of a matching span."""
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {reason}", path=path, tensor=name)

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise bad("corrupt header entry (needs dtype, shape and data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise bad(f"dtype is not a name ({dtype!r})")
    if dtype not in DTYPES:
        raise bad(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise bad(f"data_offsets must be two non-negative integers, got {offsets!r}")
    begin, end = offsets
    numel = 1
    for s in shape:
        numel *= s
    if numel * DTYPES[dtype][1] >= 1 << 64:
        raise bad(f"shape {shape} is too large")
    if end < begin or end - begin != numel * DTYPES[dtype][1]:
        raise bad(f"offsets {begin}..{end} do not fit {dtype} {shape}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)


def _check_layout(path: Path, infos: list[TensorInfo], data_start: int, size: int) -> None:
    """The tensors' byte ranges (in data order) follow one another from 0 to the end of the file."""
    expected = data_start
    for info in infos:
        if info.offset != expected:
            what = "overlaps the tensor before it" if info.offset < expected else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor {info.name!r} {what} (data offset "
                                  f"{info.offset - data_start}, expected {expected - data_start})",
                                  path=path, tensor=info.name)
        expected = info.offset + info.nbytes
    if expected > size:
        last = infos[-1]
        raise CheckpointError(f"{path}: truncated: tensor {last.name!r} ends at byte "
                              f"{expected - data_start} of the data, but the file holds only "
                              f"{size - data_start} data bytes", path=path, tensor=last.name)
    if expected < size:
        raise CheckpointError(f"{path}: corrupt: {size - expected} bytes after the last tensor that no "
                              "tensor refers to", path=path)


@dataclass
class Checkpoint:
    """The tensors of a model folder (single-file or sharded safetensors), from headers only."""

    folder: Path
    files: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path | str) -> Checkpoint:
        """Read the index (if any) and every shard header of ``folder``.

        Raises:
            CheckpointError: no safetensors weights, a shard missing, or a corrupt file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a directory", path=folder)
        index_path = folder / INDEX_NAME
        if index_path.is_file():
            return cls._open_indexed(folder, index_path)
        single = folder / SINGLE_NAME
        if single.is_file():
            files = [single]
        else:
            files = sorted(folder.glob("*.safetensors"))
            sharded = [f for f in files if re.fullmatch(r".*-\d{5}-of-\d{5}\.safetensors", f.name)]
            if sharded:
                raise CheckpointError(
                    f"{folder}: sharded weights ({sharded[0].name}, ...) without {INDEX_NAME}", path=folder
                )
            if len(files) != 1:
                raise CheckpointError(_no_weights_message(folder, files), path=folder)
        return cls.assemble(folder, files, None, lambda p: read_header(p)[0])

    @classmethod
    def _open_indexed(cls, folder: Path, index_path: Path) -> Checkpoint:
        try:
            weight_map = read_weight_map(index_path)
        except InvalidIndex as e:
            raise CheckpointError(str(e), path=index_path) from e
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"{folder}: shard {fname} listed in {INDEX_NAME} is missing", path=p)
            files.append(p)
        return cls.assemble(folder, files, weight_map, lambda p: read_header(p)[0])

    @classmethod
    def assemble(cls, folder: Path, files: list[Path], weight_map: dict[str, str] | None,
                 headers: Callable[[Path], list[TensorInfo]]) -> Checkpoint:
        """A checkpoint of ``files`` whose headers ``headers(file)`` gives, each tensor taken from
        the file ``weight_map`` (an index's, by file name) names; every tensor of the single file
        where there is no index.

        Raises:
            CheckpointError: a tensor the index lists is not in its file; a corrupt header.
        """
        ckpt = cls(folder, files)
        if weight_map is None:
            for info in headers(files[0]):
                ckpt.tensors[info.name] = info
            return ckpt
        for p in files:
            infos = {i.name: i for i in headers(p)}
            for name, fname in weight_map.items():
                if fname == p.name:
                    if name not in infos:
                        raise CheckpointError(f"{p}: tensor {name!r} listed in {INDEX_NAME} is not in "
                                              "this shard", path=p, tensor=name)
                    ckpt.tensors[name] = infos[name]
        return ckpt

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def _no_weights_message(folder: Path, files: Sequence[Path]) -> str:
    if files:
        return f"{folder}: several safetensors files and no {INDEX_NAME}: {[f.name for f in files]}"
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        return (
            f"{folder}: only pickled PyTorch weights (.bin/.pt); convert them to safetensors "
            "(e.g. transformers save_pretrained) first"
        )
    return f"{folder}: no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})"


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of an output shard: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for s in self.shape:
            n *= s
        return n


def build_header(tensors: Iterable[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes that start a safetensors file holding ``tensors`` in this order.

    The JSON is padded with spaces so the data buffer starts 8-byte aligned, as safetensors does.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body
