"""Large files sent to the Hub ahead of the commit that publishes them (LFS pre-upload).

A streaming merge uploads each output shard as soon as it is written (:func:`preupload`), deletes
it locally, and publishes every shard with the small files in one commit at the end
(:func:`commit_uploaded`). An uploaded shard is known by its SHA-256 and size alone
(:func:`uploaded_file`), so a re-run can publish shards an earlier run uploaded; which of those
the Hub still holds, :func:`lfs_present` asks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from .client import (
    DEFAULT_RETRIES,
    Upload,
    _api,
    _backoff,
    _with_retries,
    commit_once,
)

log = logging.getLogger(__name__)


def ensure_repo(repo_id: str, *, private: bool = False, token: str | None = None, endpoint: str | None = None,
                retries: int = DEFAULT_RETRIES) -> None:
    """Create model repo ``repo_id`` unless it exists.

    Raises:
        HubError (subclasses): e.g. not authorised to create it.
    """
    _with_retries(lambda: _api(token, endpoint).create_repo(repo_id, private=private, exist_ok=True,
                                                             repo_type="model"),
                  f"create {repo_id}", token, retries, _backoff())


def uploaded_file(path_in_repo: str, sha256: str, size: int):
    """The commit operation of a file already pre-uploaded as LFS object ``sha256`` of ``size`` bytes.

    It is the state :meth:`HfApi.preupload_lfs_files` leaves an operation in (content freed,
    marked uploaded), rebuilt from the journal, so that a later process can commit it.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
    op.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op


def preupload(repo_id: str, path: Path, path_in_repo: str, sha256: str, *, revision: str = "main",
              token: str | None = None, endpoint: str | None = None, retries: int = DEFAULT_RETRIES) -> None:
    """Upload file ``path`` (whose SHA-256 is ``sha256``) as a large file of ``repo_id``, without a
    commit: through Xet storage when huggingface_hub can (hf_xet installed, ``HF_HUB_DISABLE_XET``
    unset), else as an LFS object. The Hub checks the SHA-256. Nothing is sent when the Hub holds
    the object already.

    Raises:
        HubError (subclasses): still failing after ``retries`` retries (5xx, 429, network), or a
            permanent error.
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    def attempt() -> None:
        # made empty, then pointed at the file: made with the path, the operation reads the file's
        # SHA-256 from it (huggingface_hub before 2.x at once, whole), which the caller already has
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
        op.path_or_fileobj = str(path)
        with open(path, "rb") as f:
            sample = f.read(512)
        op.upload_info = UploadInfo(size=path.stat().st_size, sample=sample, sha256=bytes.fromhex(sha256))
        op._upload_mode = "lfs"  # weights are always large files (LFS or Xet); the Hub decides nothing here
        _api(token, endpoint).preupload_lfs_files(repo_id, [op], repo_type="model", revision=revision,
                                                  num_threads=1)

    _with_retries(attempt, f"upload {path_in_repo} to {repo_id}", token, retries, _backoff())


def lfs_present(repo_id: str, objects: Iterable[tuple[str, int]], *, token: str | None = None,
                endpoint: str | None = None, retries: int = DEFAULT_RETRIES) -> set[str]:
    """Which of ``objects`` (SHA-256, size) the Hub already stores for ``repo_id``.

    Raises:
        HubError (subclasses): the Hub cannot be asked.
    """
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    infos = [UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha)) for sha, size in objects]
    if not infos:
        return set()
    api = _api(token, endpoint)

    def call() -> set[str]:
        actions, _, _ = post_lfs_batch_info(infos, token=token, repo_type="model", repo_id=repo_id,
                                            endpoint=api.endpoint)
        return {a["oid"] for a in actions if not a.get("actions")}

    return _with_retries(call, f"{repo_id} LFS objects", token, retries, _backoff())


def commit_uploaded(repo_id: str, operations: list, message: str, *, revision: str = "main",
                    token: str | None = None, endpoint: str | None = None,
                    retries: int = DEFAULT_RETRIES) -> Upload:
    """One commit of ``operations`` (pre-uploaded files and small ones) on ``revision`` of
    ``repo_id``, pinned to the head it saw (see :func:`~slerp_plugin.hub.client.commit_once`).

    Raises:
        HubError (subclasses): as :func:`~slerp_plugin.hub.client.commit_once`.
    """
    api = _api(token, endpoint)

    def attempt(head: str):
        for op in operations:  # an attempt that failed has marked them committed
            op._is_committed = False
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 parent_commit=head, repo_type="model")

    upload = commit_once(api, repo_id, message, attempt, revision=revision, token=token, endpoint=endpoint,
                         retries=retries)
    log.info("published %d file(s) to %s in commit %s", len(operations), repo_id, upload.commit)
    return upload
