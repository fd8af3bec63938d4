"""What a merge will need before it starts (``slerp-merge plan``): the parents' sizes, the disk and
memory it takes, and how long it should take at given bandwidths.

A local merge keeps both parents and the output on disk: the Hub downloads in the Hub cache, the
output next to its folder. :func:`require_disk` refuses such a merge before anything is downloaded
when a filesystem has less room than it needs, counting what is already there (files in the Hub
cache, shards an interrupted run finished). A streaming merge (``method.stream=true``) holds at
most its disk budget, and its download, merge and upload overlap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .engine.output import output_path, partial_path
from .errors import HubError, ModelNotFoundError, OutputWriteError, ValidationInputError
from .hub.client import list_files, resolve_revision, select_files
from .hub.connections import AUTO_MOST
from .hub.sources import looks_like_hub_id
from .io.model_files import local_model
from .spec import MergeSpec, ModelRef

log = logging.getLogger(__name__)

DOWNLOAD_BPS = 100e6  #: default download bandwidth for the estimate, bytes/s
UPLOAD_BPS = 50e6  #: default upload bandwidth, bytes/s
MERGE_BPS = 400e6  #: output bytes/s of a local merge (a disk-bound rate; see docs/performance.md)
BASE_MEMORY = 512 << 20  #: resident memory of a merge besides its buffers, bytes
DISK_MARGIN = 256 << 20  #: room kept for configs, tokenizer, manifest and filesystem slack, bytes
#: output shards a streaming merge holds by default: one being fetched, one merged, one uploaded
STREAM_SHARDS_IN_FLIGHT = 3
#: files huggingface_hub's snapshot download fetches at once (its ``max_workers``), one connection each
DOWNLOAD_FILES_AT_ONCE = 8
_DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


@dataclass
class ParentSize:
    """One parent's weights: ``size`` bytes in ``files`` files; ``to_download`` of them not on
    this machine yet (0 for a local folder); ``config``: its ``config.json`` where this machine has
    it."""

    role: str
    ref: str
    revision: str | None
    size: int
    files: int
    to_download: int
    dtype: str | None = None
    config: str | None = None


@dataclass
class MergeEstimate:
    """Sizes in bytes, times in seconds. ``disk`` maps each filesystem (a folder on it) to the bytes
    a local merge still writes there and the bytes free; ``problems`` says what does not fit,
    ``unwritable`` which of those folders cannot be written at all (read-only, permission)."""

    parents: list[ParentSize]
    output_bytes: int
    memory_bytes: int
    disk: dict[str, dict[str, int]] = field(default_factory=dict)
    download_s: float = 0.0
    merge_s: float = 0.0
    upload_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    unwritable: list[str] = field(default_factory=list)
    #: a streaming merge's disk (its budget) and time (the slowest of the overlapped stages)
    stream_disk_bytes: int = 0
    #: of that disk, what the gate keeps aside (its copies of a tied head, its saved points); None:
    #: not known, and not counted (``stream_aside_unknown`` says why)
    stream_aside_bytes: int | None = 0
    stream_aside_unknown: str | None = None
    stream_s: float = 0.0
    #: connections the stream reads each parent over (``method.connections``; ``auto``: up to
    #: :data:`~slerp_plugin.hub.connections.AUTO_MOST`, as many as still gain), and each one's limit
    #: in bytes/s (None: only the link limits)
    connections: int | str = 1
    connection_bps: float | None = None

    @property
    def sequential_s(self) -> float:
        """Download, merge and upload one after the other."""
        return self.download_s + self.merge_s + self.upload_s

    def as_record(self) -> dict:
        return {**asdict(self), "sequential_s": self.sequential_s}

    def lines(self) -> list[str]:
        """The estimate as lines for a terminal."""
        out = [f"{p.role}: {p.ref}{'@' + p.revision if p.revision else ''}: {_gb(p.size)} in {p.files} "
               f"file(s), {_gb(p.to_download)} to download" for p in self.parents]
        out.append(f"output: {_gb(self.output_bytes)}; memory: {_gb(self.memory_bytes)}")
        for where, d in self.disk.items():
            out.append(f"disk at {where}: needs {_gb(d['needed'])}, {_gb(d['free'])} free")
        out.append(f"time: download {_duration(self.download_s)}, merge {_duration(self.merge_s)}, "
                   f"upload {_duration(self.upload_s)}; {_duration(self.sequential_s)} in all")
        aside = ""
        if self.stream_aside_bytes is None:
            aside = f"; the gate's copies kept aside not counted: {self.stream_aside_unknown}"
        elif self.stream_aside_bytes:
            aside = f", {_gb(self.stream_aside_bytes)} of it kept aside by the gate"
        out.append(f"streaming Hub to Hub (method.stream=true): disk {_gb(self.stream_disk_bytes)}{aside}, "
                   f"memory {_gb(self.memory_bytes)}, about {_duration(self.stream_s)} (download, merge and "
                   f"upload overlap; each parent read over {self._connections_text()}, method.connections)")
        if self.connection_bps:
            gets = f"{2 * stream_connections(self.connections)}"
            gets = f"up to {gets}" if self.connections == "auto" else gets
            out.append(f"each connection at most {self.connection_bps / 1e6:g} MB/s: downloads of "
                       f"{DOWNLOAD_FILES_AT_ONCE} files at once, the stream's {gets} ranged GETs")
        out += [f"cannot write: {p}" for p in self.unwritable]
        out += [f"does not fit: {p}" for p in self.problems]
        return out


    def _connections_text(self) -> str:
        if self.connections == "auto":
            return f"as many connections as still gain, up to {AUTO_MOST} (auto)"
        return f"{self.connections} connection(s)"


def stream_connections(setting: int | str) -> int:
    """The most ranged GETs per parent a stream keeps in flight with ``method.connections=setting``."""
    return AUTO_MOST if setting == "auto" else int(setting)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _duration(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def estimate(
    spec: MergeSpec,
    *,
    download_bps: float = DOWNLOAD_BPS,
    upload_bps: float = UPLOAD_BPS,
    merge_bps: float = MERGE_BPS,
    connection_bps: float | None = None,
    aside: Callable[[Path], int] | None = None,
) -> MergeEstimate:
    """What ``spec`` needs as a local merge, and as a streaming one. Reads only listings and sizes
    (Hub API calls for Hub parents, no download).

    Args:
        spec: the merge.
        download_bps, upload_bps: the link's rates, bytes/s.
        merge_bps: a local merge's output rate, bytes/s.
        connection_bps: what one connection may carry, bytes/s (CDNs limit each); None: only the
            link limits. A download takes :data:`DOWNLOAD_FILES_AT_ONCE` connections, a stream
            ``spec.connections`` per parent.
        aside: the disk a gated stream keeps aside besides its shards, told from model_1's
            ``config.json`` (the gate's own estimate); None: not counted.

    Raises:
        ModelNotFoundError: a parent is neither a local folder nor a Hub id.
        HubError: the Hub cannot list a parent.
        ConfigError: a bandwidth is not positive.
    """
    from .errors import ConfigError

    if min(download_bps, upload_bps, merge_bps, connection_bps or 1) <= 0:
        raise ConfigError("bandwidths must be more than 0 bytes/s")
    refs = (spec.model_1, spec.model_2)
    parents = [parent_size(name, ref) for name, ref in zip(spec.model_names, refs, strict=True)]
    output_bytes = _output_bytes(spec, parents[0])
    est = MergeEstimate(parents, output_bytes, BASE_MEMORY + spec.buffer_memory, connections=spec.connections,
                        connection_bps=connection_bps)
    downloads = sum(p.to_download for p in parents)
    files = sum(p.files for p in parents if p.to_download)
    est.download_s = downloads / _rate(download_bps, connection_bps, min(files, DOWNLOAD_FILES_AT_ONCE))
    est.merge_s = output_bytes / merge_bps
    est.upload_s = output_bytes / upload_bps if spec.push_to_hub else 0.0
    if spec.gate and aside is not None and not spec.disk_budget:  # a budget bounds the copies too
        _count_aside(est, aside, parents[0].config)
    est.stream_disk_bytes = stream_disk(spec, parents, output_bytes, est.stream_aside_bytes or 0)
    full_download = sum(p.size for p in parents) / _rate(download_bps, connection_bps,
                                                         2 * stream_connections(spec.connections))
    est.stream_s = max(full_download, est.merge_s, output_bytes / upload_bps)
    _disk(spec, est, downloads)
    return est


def _count_aside(est: MergeEstimate, aside: Callable[[Path], int], config: str | None) -> None:
    """Set what the gate keeps aside, or why it is not known."""
    est.stream_aside_bytes = None
    if config is None:
        est.stream_aside_unknown = "model_1's config.json is not on this machine"
        return
    try:
        est.stream_aside_bytes = aside(Path(config))
    except ValidationInputError as e:
        est.stream_aside_unknown = str(e)


def _rate(link_bps: float, connection_bps: float | None, connections: int) -> float:
    """Bytes/s of ``connections`` connections at once on a link of ``link_bps``."""
    return min(link_bps, connection_bps * max(connections, 1)) if connection_bps else link_bps


def stream_disk(spec: MergeSpec, parents: list[ParentSize], output_bytes: int, aside: int = 0) -> int:
    """The disk a streaming merge of ``spec`` holds at most: ``spec.disk_budget``, else
    :data:`STREAM_SHARDS_IN_FLIGHT` output shards, each with the parents' bytes it is merged from,
    and ``aside`` (what the gate keeps aside) (bytes)."""
    if spec.disk_budget:
        return spec.disk_budget
    shard = min(spec.max_shard_size, output_bytes)
    inputs = sum(p.size for p in parents) / max(output_bytes, 1)
    return int(STREAM_SHARDS_IN_FLIGHT * shard * (1 + inputs)) + aside


def require_disk(spec: MergeSpec, *, aside: Callable[[Path], int] | None = None) -> MergeEstimate:
    """:func:`estimate`, raising when a local merge of ``spec`` cannot fit on disk.

    ``aside`` (as :func:`estimate`'s) is asked only when the merge does not fit and its parents are
    on the Hub: the refusal then suggests a streaming merge with the disk it needs, the gate's
    copies kept aside included where model_1's config.json is on this machine.

    Raises:
        OutputWriteError: a filesystem is read-only or not writable by this user, or has less room
            than the merge needs (nothing was written).
        ModelNotFoundError, HubError: as :func:`estimate`.
    """
    est = estimate(spec)
    if est.unwritable:
        raise OutputWriteError(f"cannot write the merge: {est.unwritable[0]} (nothing was downloaded or "
                               "written; choose an output, or set HF_HUB_CACHE, on a writable disk)",
                               path=spec.output)
    if est.problems:
        hub = all(p.revision for p in est.parents)  # Hub parents (local folders have none)
        stream = ""
        if hub:
            if spec.gate and aside is not None and not spec.disk_budget:
                _count_aside(est, aside, est.parents[0].config)
                est.stream_disk_bytes = stream_disk(spec, est.parents, est.output_bytes,
                                                    est.stream_aside_bytes or 0)
            more = ", more for the gate's copies kept aside" if est.stream_aside_bytes is None else ""
            stream = (f", or stream Hub to Hub with method.stream=true +push_to_hub=org/name (about "
                      f"{_gb(est.stream_disk_bytes)} of disk{more})")
        raise OutputWriteError(f"not enough disk space: {est.problems[0]} (nothing was downloaded or "
                               f"written; free space, or set HF_HUB_CACHE or the output elsewhere{stream})",
                               path=spec.output)
    return est


def parent_size(role: str, ref: ModelRef) -> ParentSize:
    """The size of parent ``role``'s weights: a local folder's files, or, for a Hub id not on this
    machine, the weight files the Hub lists at the revision (nothing is downloaded).

    Raises:
        ModelNotFoundError: ``ref`` is neither a folder nor a Hub id.
        HubError (subclasses): the Hub cannot list it (with ``role`` as context).
    """
    try:
        folder = local_model(ref, role).path
    except ModelNotFoundError:
        if not looks_like_hub_id(ref.ref):
            raise
        try:
            return _hub_parent_size(role, ref)
        except HubError as e:
            raise e.with_context(role) from e
    from .io.safetensors import Checkpoint

    files = list(Checkpoint.open(folder).files)
    config = folder / "config.json"
    return ParentSize(role, str(folder), None, sum(f.stat().st_size for f in files), len(files), 0,
                      _config_dtype(config), str(config) if config.is_file() else None)


def _hub_parent_size(role: str, ref: ModelRef) -> ParentSize:
    from huggingface_hub import try_to_load_from_cache

    commit = resolve_revision(ref.ref, ref.revision)
    chosen = select_files(list_files(ref.ref, commit), tokenizer=False)
    weights = [f for f in chosen if f.name.endswith((".safetensors", ".bin"))]
    cache = os.environ.get("HF_HUB_CACHE")
    missing = sum(f.size for f in chosen
                  if not isinstance(try_to_load_from_cache(ref.ref, f.name, cache_dir=cache, revision=commit),
                                    str))
    config = try_to_load_from_cache(ref.ref, "config.json", cache_dir=cache, revision=commit)
    config = config if isinstance(config, str) else None
    dtype = _config_dtype(Path(config)) if config else None
    return ParentSize(role, ref.ref, commit[:12], sum(f.size for f in weights), len(weights), missing, dtype,
                      config)


def _config_dtype(path: Path) -> str | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    dtype = (config.get("torch_dtype") or config.get("dtype")) if isinstance(config, dict) else None
    return dtype if dtype in _DTYPE_BYTES else None


def _output_bytes(spec: MergeSpec, model_1: ParentSize) -> int:
    """model_1's bytes in the stored dtype (each tensor keeps model_1's dtype unless one is set)."""
    stored = spec.out_dtype or spec.dtype
    if stored is None or model_1.dtype is None:
        return model_1.size
    return model_1.size * _DTYPE_BYTES[str(stored)] // _DTYPE_BYTES[model_1.dtype]


def _disk(spec: MergeSpec, est: MergeEstimate, downloads: int) -> None:
    """Bytes still to write per filesystem (Hub cache and output), against the room free there."""
    output = output_path(spec)
    partial = partial_path(output)
    done = sum(f.stat().st_size for f in partial.glob("*.safetensors")) if partial.is_dir() else 0
    needs = {_existing(output.parent): max(est.output_bytes - done, 0) + DISK_MARGIN}
    if downloads:
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = _existing(Path(os.environ.get("HF_HUB_CACHE") or HF_HUB_CACHE))
        same = {os.stat(p).st_dev: p for p in needs}
        key = same.get(os.stat(cache).st_dev, cache)
        needs[key] = needs.get(key, 0) + downloads
    for where, needed in needs.items():
        free = shutil.disk_usage(where).free
        est.disk[str(where)] = {"needed": needed, "free": free}
        reason = _unwritable(where)
        if reason:
            est.unwritable.append(f"{where} {reason}")
        elif needed > free:
            est.problems.append(f"{where} needs {_gb(needed)} for a local merge, {_gb(free)} free")


def _unwritable(folder: Path) -> str | None:
    """Why this process cannot write into ``folder``, or None (a read-only filesystem reports no
    free space, so this is asked before the space is)."""
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return "is on a read-only filesystem"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable by this user (permission denied)"
    return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where the filesystem is known)."""
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
