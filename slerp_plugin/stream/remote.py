"""A parent on the Hub, opened for a streaming merge without downloading its weights.

:func:`open_parent` pins the revision to a commit, lists the repo's files with their sizes and
SHA-256, fetches the small files (configs, index, tokenizer; each checked against the Hub) into a
local folder, and reads every safetensors header by one range read (two when it is longer than
:data:`HEAD_PROBE_BYTES`). The result's
:class:`~slerp_plugin.io.safetensors.Checkpoint` names each weight file by its name in the repo;
its bytes are fetched later, range by range (:mod:`slerp_plugin.stream.spool`).
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, ConfigError, HubError, HubIntegrityError
from ..hub.client import HubFile, is_hub_id, list_files, resolve_revision, select_files
from ..hub.ranges import RangeReader
from ..io.atomic import write_bytes_atomic
from ..io.index import INDEX_NAME, InvalidIndex, read_weight_map
from ..io.safetensors import MAX_HEADER_BYTES, Checkpoint, TensorInfo, parse_header
from ..spec import ModelRef

log = logging.getLogger(__name__)

#: bytes of a weight file's first read: its header's length and, when it fits, the whole header in
#: one GET; at most 1/:data:`HEAD_PROBE_SHARE` of the file, so that a small file costs no extra bytes
HEAD_PROBE_BYTES = 64 << 10
HEAD_PROBE_SHARE = 64


@dataclass
class RemoteParent:
    """A Hub model at a pinned ``commit``: its small files in ``folder``, its weights' headers in
    ``checkpoint`` (files named as in the repo), and a reader of their bytes."""

    ref: ModelRef
    repo_id: str
    commit: str
    folder: Path
    files: dict[str, HubFile]
    checkpoint: Checkpoint
    reader: RangeReader
    #: each weight file's first bytes (length and header), already read
    heads: dict[str, bytes] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        return sum(self.files[p.name].size for p in self.checkpoint.files)

    @property
    def content_id(self) -> str:
        """The model's identity for the evaluation cache
        (:func:`~slerp_plugin.validate.cache.content_id`, from the Hub's SHA-256 of each weight
        file): the same as the model's once downloaded."""
        from ..validate.cache import content_id

        weights = [(f.name, self.files[f.name].sha256 or "") for f in self.checkpoint.files]
        config = self.folder / "config.json"
        return content_id(weights, config.read_bytes() if config.is_file() else b"")


def open_parent(ref: ModelRef, role: str, folder: Path, *, weights: bool = True, tokenizer: bool = True,
                token: str | None = None) -> RemoteParent:
    """Open Hub model ``ref`` (``role`` names it in errors) for streaming; small files go to ``folder``.

    Raises:
        ConfigError: ``ref`` is not a Hub id.
        RepoNotFoundError, RevisionNotFoundError, HubAuthError, HubUnavailableError: from the Hub.
        HubIntegrityError: a small file does not match the Hub's size or hash.
        CheckpointError: a corrupt safetensors header or index.
    """
    if not is_hub_id(ref.ref):
        raise ConfigError(f"{role}: {ref} is not a Hub id (org/name[@revision]); method.stream=true "
                          "streams Hub models only")
    try:
        commit = resolve_revision(ref.ref, ref.revision, token=token)
        listing = select_files(list_files(ref.ref, commit, token=token), weights=weights, tokenizer=tokenizer)
    except HubError as e:
        raise e.with_context(role) from e
    weights_listed = [f for f in listing if f.name.endswith(".safetensors")]
    if weights and any(f.name.endswith(".bin") for f in listing):
        raise ConfigError(f"{role}: {ref.ref} holds only pickled .bin weights; streaming needs safetensors")
    reader = RangeReader(ref.ref, commit, token=token)
    folder.mkdir(parents=True, exist_ok=True)
    for f in listing:
        if f not in weights_listed:
            _fetch_small(reader, f, folder / f.name)
    parent = RemoteParent(ref, ref.ref, commit, folder, {f.name: f for f in listing},
                          Checkpoint(folder, []), reader)
    if weights:
        parent.checkpoint = _checkpoint(parent, weights_listed)
    return parent


def _fetch_small(reader: RangeReader, f: HubFile, dest: Path) -> None:
    """One small file into ``dest`` unless it is there already; either way checked against the Hub."""
    if dest.is_file() and dest.stat().st_size == f.size and _matches(dest.read_bytes(), f):
        return
    data = reader.read(f.name, 0, f.size) if f.size else b""
    if not _matches(data, f):
        raise HubIntegrityError(f"{reader.repo_id}@{reader.commit[:12]}: {f.name} does not match the Hub's "
                                "size/hash")
    write_bytes_atomic(dest, data, crash_points=False)  # the run's temporary folder: not the output


def _matches(data: bytes, f: HubFile) -> bool:
    if len(data) != f.size:
        return False
    if f.sha256:
        return hashlib.sha256(data).hexdigest() == f.sha256
    if f.blob_id:
        from huggingface_hub.utils.sha import git_hash

        return git_hash(data) == f.blob_id
    return True


def _checkpoint(parent: RemoteParent, weights: list[HubFile]) -> Checkpoint:
    """The parent's tensors from its index (if any) and the headers of its weight files."""
    what = f"{parent.repo_id}@{parent.commit[:12]}"
    index = parent.folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = read_weight_map(index)
        except InvalidIndex as e:
            raise CheckpointError(f"{what}: {e}", repo_id=parent.repo_id) from e
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if n not in parent.files]
        if missing:
            raise CheckpointError(f"{what}: shard {missing[0]} listed in {INDEX_NAME} is not in the repo",
                                  repo_id=parent.repo_id)
    elif len(weights) == 1:
        weight_map, names = None, [weights[0].name]
    else:
        raise CheckpointError(f"{what}: {len(weights)} safetensors files and no {INDEX_NAME}",
                              repo_id=parent.repo_id)
    files = [Path(n) for n in names]
    return Checkpoint.assemble(parent.folder, files, weight_map, lambda p: _header(parent, p))


def _header(parent: RemoteParent, path: Path) -> list[TensorInfo]:
    """A weight file's tensors from its header: its first bytes (:data:`HEAD_PROBE_BYTES`), then the
    rest of a longer header."""
    f = parent.files[path.name]
    what = Path(f"{parent.repo_id}@{parent.commit[:12]}/{f.name}")
    if f.size < 8:
        raise CheckpointError(f"{what}: truncated safetensors file ({f.size} bytes)", repo_id=parent.repo_id)
    head = parent.reader.read(f.name, 0, max(8, min(HEAD_PROBE_BYTES, f.size // HEAD_PROBE_SHARE)))
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > f.size:
        raise CheckpointError(f"{what}: corrupt or truncated safetensors header (header length {n}, file "
                              f"size {f.size})", repo_id=parent.repo_id)
    header = head[8 : 8 + n]
    if len(header) < n:  # a header longer than the probe
        header += parent.reader.read(f.name, len(head), n - len(header))
    parent.heads[f.name] = struct.pack("<Q", n) + header
    infos, _ = parse_header(what, header, f.size)
    return [TensorInfo(i.name, i.dtype, i.shape, path, i.offset, i.nbytes) for i in infos]
