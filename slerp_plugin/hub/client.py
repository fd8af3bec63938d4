"""Hugging Face Hub I/O: pinned, verified downloads and idempotent uploads.

- :func:`resolve_revision` turns a branch/tag/sha into the commit sha (recorded in manifests).
- :func:`download_model` fetches only what a merge needs (safetensors shards and index, config
  and generation config, tokenizer files; never pickled ``.bin`` weights unless ``allow_bin``, which
  converts them to safetensors locally) into the Hub cache (resumable, reused), then checks every
  file's size and hash against what the Hub reports.
- :func:`upload_folder` creates the repo if needed and uploads a merged folder in one commit whose
  message names the parents (with shas) and t, using ``parent_commit`` so that a retried upload can
  neither apply twice nor make an empty commit; it returns the commit sha and URL.

The token comes from ``token=``, ``HF_TOKEN`` or the Hub client's login; it never appears in logs,
errors, manifests or cards. Errors are :class:`~slerp_plugin.errors.HubError` subclasses with
one-line messages; ``error.transient`` tells whether retrying can help (network, 5xx, 429,
truncated download) or not (unknown repo/revision, auth, gated, disk full). Transient errors are
retried here ``retries`` times with exponential backoff before they are raised.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..errors import (
    CheckpointError,
    DiskFullError,
    HubAuthError,
    HubError,
    HubIntegrityError,
    HubUnavailableError,
    RepoNotFoundError,
    RevisionNotFoundError,
    redact_secrets,
)
from ..formats.public import public_files
from ..io.hashing import cached_sha256
from ..io.model_files import CONFIG_FILES, OUTPUT_MARKER, TOKENIZER_FILES

log = logging.getLogger(__name__)

T = TypeVar("T")
SHA_RE = re.compile(r"[0-9a-f]{40}")
INDEX_FILES = ("model.safetensors.index.json",)
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 1.0
LARGE_FOLDER_BYTES = 100 * 10**9
UPLOAD_RECORD = "hub_upload.json"  #: where a merge folder records its upload (local only)
#: files of a merge folder that are never uploaded: this tool's output marker and upload record
NOT_UPLOADED = [OUTPUT_MARKER, UPLOAD_RECORD]


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub repo at a commit: path, size, LFS sha256 (None for regular files), git oid."""

    name: str
    size: int
    sha256: str | None
    blob_id: str | None


@dataclass
class Download:
    """A downloaded model: the snapshot folder and the commit it is pinned to."""

    repo_id: str
    revision: str | None
    commit: str
    path: Path
    files: list[HubFile] = field(default_factory=list)

    def hashes(self) -> dict[Path, str]:
        """SHA-256 of the verified LFS files by local path (so they need not be hashed again)."""
        return {self.path / f.name: f.sha256 for f in self.files if f.sha256}


@dataclass(frozen=True)
class Upload:
    """Where an upload landed. ``new_commit`` is False when the folder was already there."""

    repo_id: str
    commit: str
    url: str
    new_commit: bool


def _token_text(token: str | None) -> str | None:
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:
        return None


def _redact(text: str, token: str | None) -> str:
    text = text.splitlines()[0] if text else text
    tok = _token_text(token)
    if tok and len(tok) >= 4:
        text = text.replace(tok, "***")
    return redact_secrets(text)


def _translate(exc: BaseException, what: str, token: str | None) -> HubError:
    """Map huggingface_hub / network / OS errors to our typed one-line errors."""
    import httpx2
    import requests
    import urllib3
    from huggingface_hub import errors as hf

    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFoundError(f"{what}: revision not found")
    if isinstance(exc, hf.GatedRepoError):
        return HubAuthError(f"{what}: the repo is gated; accept its terms on the Hub and set HF_TOKEN")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return RepoNotFoundError(
            f"{what}: repository not found (or private: set HF_TOKEN to a token with access)")
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        server = _redact(exc.server_message or "", token)
        detail = f"HTTP {status}" + (f": {server}" if server else "")
        if status in (401, 403):
            return HubAuthError(f"{what}: not authorised ({detail}); check HF_TOKEN")
        if status is not None and (status >= 500 or status in (408, 429)):
            return HubUnavailableError(f"{what}: the Hub is unavailable ({detail}); retry later")
        return HubError(f"{what}: {detail}")
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError,
                        httpx2.RemoteProtocolError,  # the connection dropped mid-response
                        requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                        urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,  # ranged reads
                        hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return HubUnavailableError(f"{what}: cannot reach the Hub ({type(exc).__name__}); check the network")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError(f"{what}: no space left on device ({exc.filename or 'cache'})")
    return HubError(f"{what}: {type(exc).__name__}: {_redact(str(exc), token)}")


def _with_retries(fn: Callable[[], T], what: str, token: str | None, retries: int, backoff: float) -> T:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # translated below; only our transient ones are retried
            err = _translate(e, what, token)
            if not err.transient or attempt == retries:
                raise err from None
            delay = backoff * (2 ** attempt)
            log.warning("%s (attempt %d of %d); retrying in %.1f s", err, attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _backoff() -> float:
    return float(os.environ.get("SLERP_PLUGIN_HUB_BACKOFF", DEFAULT_BACKOFF_S))


def _endpoint(endpoint: str | None) -> str | None:
    # read at call time (huggingface_hub reads HF_ENDPOINT once, at import)
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(endpoint), token=token, library_name="slerp_plugin")


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; no ``@`` → revision None."""
    repo_id, _, rev = ref.partition("@")
    return repo_id, (rev or None)


def resolve_revision(
    repo_id: str, revision: str | None = None, *, token: str | None = None, endpoint: str | None = None,
    retries: int = DEFAULT_RETRIES,
) -> str:
    """The commit sha that ``revision`` (branch, tag or sha; default ``main``) points to.

    Raises:
        RepoNotFoundError, RevisionNotFoundError, HubAuthError: permanent.
        HubUnavailableError: still failing after ``retries`` retries.
    """
    what = f"{repo_id}@{revision or 'main'}"
    info = _with_retries(lambda: _api(token, endpoint).model_info(repo_id, revision=revision or "main"),
                         what, token, retries, _backoff())
    return info.sha


def list_files(repo_id: str, commit: str, *, token: str | None = None, endpoint: str | None = None,
               retries: int = DEFAULT_RETRIES) -> list[HubFile]:
    """Every file of the repo at ``commit`` with its size and hashes."""
    from huggingface_hub.hf_api import RepoFile

    def call():
        return [
            HubFile(f.path, f.size, f.lfs.sha256 if f.lfs else None, f.blob_id)
            for f in _api(token, endpoint).list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        ]

    return _with_retries(call, f"{repo_id}@{commit[:12]}", token, retries, _backoff())


def select_files(files: list[HubFile], *, allow_bin: bool = False, tokenizer: bool = True,
                 weights: bool = True) -> list[HubFile]:
    """What a merge needs: safetensors weights and index, configs, tokenizer files.

    Raises:
        HubError: the repo has no safetensors weights (and ``allow_bin`` is off, or no .bin either).
    """
    top = [f for f in files if "/" not in f.name]
    wanted = set(CONFIG_FILES) | (set(TOKENIZER_FILES) if tokenizer else set())
    chosen = [f for f in top if f.name in wanted]
    if weights:
        st = [f for f in top if f.name.endswith(".safetensors") or f.name in INDEX_FILES]
        if not any(f.name.endswith(".safetensors") for f in st):
            bins = [f for f in top if fnmatch.fnmatch(f.name, "*.bin") or f.name == BIN_INDEX]
            if not bins:
                raise HubError("the repo holds no safetensors (or .bin) weights")
            if not allow_bin:
                raise HubError(
                    "the repo holds only pickled .bin weights; pass allow_bin to download and convert "
                    "them to safetensors locally (pickles can run code: trust the repo first)"
                )
            st = bins
        chosen += st
    return chosen


def download_model(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: Path | str | None = None,
    allow_bin: bool = False,
    tokenizer: bool = True,
    weights: bool = True,
    token: str | None = None,
    endpoint: str | None = None,
    retries: int = DEFAULT_RETRIES,
) -> Download:
    """Download what a merge needs from ``repo_id`` at ``revision``, pinned and verified.

    The revision is resolved to a commit sha first and everything is fetched at that sha into the
    Hub cache (``cache_dir`` or ``HF_HUB_CACHE``), so a re-run reuses finished files and resumes
    partial ones. Returns the snapshot folder (with ``.bin`` weights converted if ``allow_bin``).

    Raises:
        HubError (subclasses): see the module docstring.
    """
    from huggingface_hub import snapshot_download

    commit = resolve_revision(repo_id, revision, token=token, endpoint=endpoint, retries=retries)
    files = select_files(list_files(repo_id, commit, token=token, endpoint=endpoint, retries=retries),
                         allow_bin=allow_bin, tokenizer=tokenizer, weights=weights)
    what = f"{repo_id}@{commit[:12]}"
    total = sum(f.size for f in files)
    log.info("downloading %d files (%.1f MB) of %s", len(files), total / 1e6, what)

    def fetch() -> Path:
        path = Path(snapshot_download(
            repo_id, revision=commit, cache_dir=cache_dir or os.environ.get("HF_HUB_CACHE"),
            allow_patterns=[f.name for f in files], token=token, endpoint=_endpoint(endpoint),
        ))
        _verify(path, files, what)
        return path

    path = _with_retries(fetch, what, token, retries, _backoff())
    download = Download(repo_id, revision, commit, path, files)
    if any(f.name.endswith(".bin") for f in files):
        download.path = _convert_bin(download, cache_dir)
    return download


def _verify(folder: Path, files: list[HubFile], what: str) -> None:
    from huggingface_hub.utils.sha import git_hash

    for f in files:
        local = folder / f.name
        size = local.stat().st_size if local.exists() else -1
        ok = size == f.size
        if ok and f.sha256:
            ok = cached_sha256(local) == f.sha256
        elif ok and f.blob_id:
            ok = git_hash(local.read_bytes()) == f.blob_id
        if not ok:
            blob = local.resolve()
            local.unlink(missing_ok=True)
            if blob != local:
                blob.unlink(missing_ok=True)
            raise HubIntegrityError(
                f"{what}: {f.name} does not match the Hub's size/hash (got {size} of {f.size} bytes); "
                "removed it"
            )


def _convert_bin(download: Download, cache_dir: Path | str | None) -> Path:
    """Pickled ``.bin`` weights → a local safetensors folder next to the snapshot (once).

    The pickles are loaded with ``weights_only=True``: plain tensors only, nothing that runs code.

    Raises:
        CheckpointError: a pickle holds more than plain tensors, or cannot be read.
    """
    import pickle
    import shutil

    import torch
    from safetensors.torch import save_file

    out = download.path.parent.parent / "slerp_plugin_safetensors" / download.commit
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True)
    try:
        state: dict[str, torch.Tensor] = {}
        for f in sorted(download.path.glob("*.bin")):
            try:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
                raise CheckpointError(f"{download.repo_id}@{download.commit[:12]}: {f.name} refused: it is "
                                      "not a pickle of plain tensors (it could run code, or it is damaged)",
                                      path=f, repo_id=download.repo_id, revision=download.commit) from e
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for f in download.path.iterdir():
            if not f.name.endswith(".bin") and f.name != BIN_INDEX:
                shutil.copyfile(f, tmp / f.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, named for this process; gone once renamed
    return out


# --------------------------------------------------------------------------- upload


def commit_message_for(folder: Path) -> str:
    """``SLERP merge of A@sha and B@sha (t=0.3)`` from the folder's manifest, else a plain message."""
    from ..formats.manifest import Manifest

    try:
        m = Manifest.read(folder)
    except (OSError, ValueError):
        return f"Upload merged model {folder.name}"

    def name(role: str) -> str:
        r = m.inputs[role]
        return f"{r.ref}@{r.commit[:12]}" if r.commit else r.ref

    return f"SLERP merge of {name('model_1')} and {name('model_2')} (t={m.spec.get('t')})"


def upload_folder(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    retries: int = DEFAULT_RETRIES,
    large_folder_bytes: int = LARGE_FOLDER_BYTES,
) -> Upload:
    """Upload ``folder`` to ``repo_id`` (created if needed) in one commit on ``revision``.

    Each attempt pins ``parent_commit`` to the branch head it saw: if an earlier attempt's commit
    landed although its response was lost, the head's message is ours and that commit is returned
    instead of a second one; an identical folder makes no commit at all (``new_commit`` False).
    Folders above ``large_folder_bytes`` go through the Hub client's resumable large-folder upload
    (which may split the work into several commits). Local bookkeeping (:data:`NOT_UPLOADED`)
    stays local, and a merge's records are published without local paths, host or user names
    (:func:`slerp_plugin.formats.public.public_files`).

    Raises:
        HubError (subclasses): see the module docstring; also a missing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder}: not a folder")
    api = _api(token, endpoint)
    message = commit_message or commit_message_for(folder)
    _with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                  f"create {repo_id}", token, retries, _backoff())
    from huggingface_hub.utils import filter_repo_objects

    # the files the library's own upload_folder would send (the same ignore rule)
    files = list(filter_repo_objects(sorted(p for p in folder.rglob("*") if p.is_file()),
                                     ignore_patterns=NOT_UPLOADED,
                                     key=lambda p: p.relative_to(folder).as_posix()))
    rewritten = public_files(folder, repo_id, files)  # no local path, host or user name is published
    size = sum(p.stat().st_size for p in files)
    if size > large_folder_bytes:
        log.info("uploading %.1f GB with the resumable large-folder upload", size / 1e9)
        _with_retries(lambda: api.upload_large_folder(repo_id, folder, repo_type="model", revision=revision,
                                                       private=private,
                                                       ignore_patterns=NOT_UPLOADED + sorted(rewritten)),
                      f"upload to {repo_id}", token, retries, _backoff())
        files = []  # the rest: the rewritten files, in one commit
        if not rewritten:
            head = resolve_revision(repo_id, revision, token=token, endpoint=endpoint, retries=retries)
            return Upload(repo_id, head, f"{api.endpoint}/{repo_id}/commit/{head}", True)

    def attempt(head: str):
        from huggingface_hub import CommitOperationAdd

        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data)
                      for rel, data in rewritten.items()]
        operations += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for p in files
                       if (rel := p.relative_to(folder).as_posix()) not in rewritten]
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 parent_commit=head, repo_type="model")

    upload = commit_once(api, repo_id, message, attempt, revision=revision, token=token, endpoint=endpoint,
                         retries=retries)
    log.info("uploaded %s to %s: %s", folder, repo_id, upload.commit if upload.new_commit else
             "unchanged, no new commit")
    return upload


def commit_once(api, repo_id: str, message: str, attempt: Callable[[str], object], *, revision: str = "main",
                token: str | None = None, endpoint: str | None = None,
                retries: int = DEFAULT_RETRIES) -> Upload:
    """Run ``attempt(head)`` (a commit with ``parent_commit=head``, returning the Hub's CommitInfo)
    until one lands exactly once.

    If the branch moved (a 409/412 answer, or a head that changed since the last attempt) and its
    newest commit carries ``message``, an earlier attempt landed although its answer was lost: that
    commit is returned instead of a second one. Transient errors are retried with backoff.

    Raises:
        HubError (subclasses): a permanent error, or still failing after ``retries`` retries.
    """
    previous = None
    for n in range(retries + 1):
        head = resolve_revision(repo_id, revision, token=token, endpoint=endpoint, retries=retries)
        if previous is not None and head != previous:  # moved since our last attempt: was it us?
            landed = _landed(api, repo_id, revision, message, token, retries)
            if landed is not None:
                return landed
        previous = head
        try:
            info = attempt(head)
            return Upload(repo_id, info.oid, info.commit_url, info.oid != head)
        except Exception as e:
            err = _translate(e, f"upload to {repo_id}", token)
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (409, 412):  # the branch moved under this attempt: was it an earlier one of ours?
                landed = _landed(api, repo_id, revision, message, token, retries)
                if landed is not None:
                    return landed
                previous = None  # checked: someone else's commit, try again on top of it
                continue
            if not err.transient or n == retries:
                raise err from None
            delay = _backoff() * (2 ** n)
            log.warning("%s (attempt %d of %d); retrying in %.1f s", err, n + 1, retries + 1, delay)
            time.sleep(delay)
    raise HubError(f"upload to {repo_id}: the branch kept moving during {retries + 1} attempts")


def _landed(api, repo_id: str, revision: str, message: str, token: str | None,
            retries: int) -> Upload | None:
    """The branch's newest commit if it carries ``message`` (an attempt of ours landed), else None."""
    latest = _with_retries(lambda: api.list_repo_commits(repo_id, revision=revision)[0],
                           f"{repo_id} commits", token, retries, _backoff())
    if latest.title != message:
        return None
    log.info("an earlier attempt already committed %s to %s", latest.commit_id, repo_id)
    return Upload(repo_id, latest.commit_id, f"{api.endpoint}/{repo_id}/commit/{latest.commit_id}", True)


def fetch_file(repo_id: str, filename: str, revision: str = "main", *, token: str | None = None,
               endpoint: str | None = None, retries: int = DEFAULT_RETRIES) -> str | None:
    """The text of one file of a repo, or None when the repo or the file does not exist."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    def call() -> str | None:
        try:
            path = hf_hub_download(repo_id, filename, revision=revision, token=token,
                                   endpoint=_endpoint(endpoint), cache_dir=os.environ.get("HF_HUB_CACHE"))
        except (hf.RepositoryNotFoundError, hf.EntryNotFoundError, hf.RevisionNotFoundError):
            return None
        return Path(path).read_text()

    return _with_retries(call, f"{repo_id}/{filename}", token, retries, _backoff())


def is_hub_id(ref: str) -> bool:
    """True for ``org/name`` (optionally ``@rev``) strings that are not local paths."""
    repo_id, _ = parse_repo_ref(ref)
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", repo_id)) and not Path(ref).exists()
