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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

#: safetensors dtype name → (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST: dict[torch.dtype, str] = {v[0]: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return TORCH_TO_ST[dtype]
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
        return DTYPES[self.dtype][0]

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
    """Parse and check one safetensors file's header.

    Returns the tensors in data order and the ``__metadata__`` dict.

    Raises:
        CheckpointError: missing, unreadable, corrupt or truncated file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header "
                    f"(header length {n}, file size {size})"
                )
            header_bytes = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found", path=path) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}", path=path) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}", path=path,
                                  tensor=name) from e
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        info = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        if begin < 0 or end < begin or info.numel * info.itemsize != end - begin or any(
            s < 0 for s in shape
        ):
            raise CheckpointError(
                f"{path}: tensor {name!r}: offsets {begin}..{end} do not fit {dtype} {list(shape)}"
            )
        if end > data_len:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data, "
                f"but the file holds only {data_len} data bytes"
            )
        infos.append(info)
    infos.sort(key=lambda i: i.offset)
    return infos, {str(k): str(v) for k, v in metadata.items()}


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
            raise CheckpointError(f"{folder}: not a directory")
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
                    f"{folder}: sharded weights ({sharded[0].name}, ...) without {INDEX_NAME}"
                )
            if len(files) != 1:
                raise CheckpointError(_no_weights_message(folder, files))
        ckpt = cls(folder, files)
        for info in read_header(files[0])[0]:
            ckpt.tensors[info.name] = info
        return ckpt

    @classmethod
    def _open_indexed(cls, folder: Path, index_path: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index (no weight_map)", path=index_path) from e
        file_names = list(dict.fromkeys(weight_map.values()))
        files = []
        for fname in file_names:
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"{folder}: shard {fname} listed in {INDEX_NAME} is missing")
            files.append(p)
        ckpt = cls(folder, files)
        for p in files:
            infos = {i.name: i for i in read_header(p)[0]}
            for name, fname in weight_map.items():
                if fname == p.name:
                    if name not in infos:
                        raise CheckpointError(
                            f"{p}: tensor {name!r} listed in {INDEX_NAME} is not in this shard"
                        )
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
