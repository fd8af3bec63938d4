"""HTTP range reads of a Hub repo's files at one commit: byte ranges streamed, resumed, retried.

:class:`RangeReader` is how a streaming merge takes its parents' bytes without downloading whole
files: a safetensors header is one or two small reads, a tensor one ranged GET or several. A
connection that drops mid-range is resumed from the last byte received; connection errors, 5xx
and 429 are retried with exponential backoff (``retries`` times without progress); anything else
(404, auth) fails at once. Nothing goes to the Hub cache.

The bodies are read with requests (environment proxies, CA bundles and redirects as the Hub client
honours them; ``Authorization`` is dropped on a redirect to another host, such as the CDN) in
reads of :data:`READ_BYTES` into one buffer per GET: a few Python steps per megabyte, so that
several GETs in flight stay within the link's rate on a small CPU.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

from ..errors import HubAuthError, HubError, HubUnavailableError, RepoNotFoundError, RevisionNotFoundError
from .client import DEFAULT_RETRIES, _backoff, _endpoint, _redact, _translate

log = logging.getLogger(__name__)

#: what one GET may take before it is given up and retried, in seconds (connect, then each read)
TIMEOUT_S = 60.0
#: bytes asked of the socket per read of a body (and the most one ``sink`` call receives). urllib3
#: reads each through a temporary of this size, which stays below a MB: with the gate's evaluators
#: the process maps every block of a MB or more afresh
#: (:func:`~slerp_plugin.validate.fed.return_large_blocks`) and its page faults would cost more CPU
#: than the read.
READ_BYTES = 512 << 10

Sink = Callable[[int, memoryview], None]


class RangeReader:
    """Byte ranges of the files of ``repo_id`` at ``commit`` (a sha: the bytes cannot change).

    Raises (from every method):
        HubUnavailableError: still failing after ``retries`` attempts without progress.
        HubError: a permanent error (unknown file, not authorised), one line.
    """

    def __init__(self, repo_id: str, commit: str, *, token: str | None = None, endpoint: str | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        self.repo_id, self.commit = repo_id, commit
        self.token, self.endpoint, self.retries = token, _endpoint(endpoint), retries
        self.bytes_read = 0

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)

    def read(self, name: str, start: int, length: int) -> bytes:
        """The ``length`` bytes of file ``name`` from byte ``start``."""
        out = bytearray(length)

        def sink(pos: int, chunk: memoryview) -> None:
            out[pos - start : pos - start + len(chunk)] = chunk

        self.stream(name, start, start + length, sink)
        return bytes(out)

    def stream(self, name: str, start: int, stop: int, sink: Sink, *,
               on_throttled: Callable[[], None] | None = None) -> None:
        """Bytes ``[start, stop)`` of file ``name``, in order, as ``sink(position, chunk)`` calls.

        A dropped connection resumes where it stopped, so each byte reaches ``sink`` exactly once.
        ``on_throttled()`` is called when the Hub answers 429 (too many requests), before the retry.
        """
        reached = [start]  # where the bytes received so far end, also when a GET breaks off
        failures = 0
        what = f"{self.repo_id}@{self.commit[:12]}/{name}"
        while reached[0] < stop:
            before = reached[0]
            try:
                self._get(name, stop, sink, reached)
            except Exception as e:  # translated: only transient errors are retried
                if on_throttled is not None and isinstance(e, _Throttled):
                    on_throttled()
                err = _translate(e, what, self.token)
                if not err.transient:
                    raise err from None
                failures = 0 if reached[0] > before else failures + 1
                if failures > self.retries:
                    raise err from None
                delay = _backoff() * (2 ** max(failures - 1, 0))
                log.warning("%s: %s at byte %d of [%d, %d); retrying in %.1f s", what, err.message,
                            reached[0], start, stop, delay)
                time.sleep(delay)
            else:
                if reached[0] < stop:  # the body ended early without an error: resume as after a reset
                    failures += 1
                    if failures > self.retries:
                        raise HubUnavailableError(f"{what}: the Hub keeps ending the download at byte "
                                                  f"{reached[0]}")

    def _get(self, name: str, stop: int, sink: Sink, reached: list[int]) -> None:
        """One ranged GET from ``reached[0]`` to ``stop``, advancing ``reached[0]`` read by read."""
        from huggingface_hub.utils import build_hf_headers

        start = reached[0]
        headers = build_hf_headers(token=self.token, library_name="slerp_plugin")
        headers["Range"] = f"bytes={start}-{stop - 1}"
        headers["Accept-Encoding"] = "identity"
        pos = start
        with _session().get(self.url(name), headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            _check_status(response, f"{self.repo_id}/{name}", start, self.token)
            buffer = memoryview(bytearray(min(READ_BYTES, stop - start)))
            while pos < stop:
                n = response.raw.readinto(buffer[: min(len(buffer), stop - pos)])
                if not n:
                    break
                sink(pos, buffer[:n])
                pos += n
                reached[0] = pos
                self.bytes_read += n


class _Throttled(HubUnavailableError):
    """The Hub answered 429: too many requests."""


#: connections kept alive per host between GETs (beyond it, a GET opens one that is closed after)
POOL_SIZE = 128


@functools.cache
def _session():
    """The process's requests session for range reads: its connections are kept alive and shared
    by every thread's GETs (urllib3's pool is thread-safe; nothing here sets cookies or adapters)."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(pool_connections=8, pool_maxsize=POOL_SIZE))
    return session


def _check_status(response, what: str, start: int, token: str | None) -> None:
    """Raise the typed error that a response's status means (for a ranged GET from ``start``), as
    huggingface_hub's own checks would for its requests."""
    status = response.status_code
    if status in (200, 206):
        if status == 200 and start > 0:
            raise HubError(f"{what}: the server does not answer range requests (HTTP {status})")
        return
    code = response.headers.get("X-Error-Code", "")
    if code == "RepoNotFound":
        raise RepoNotFoundError(f"{what}: repository not found (or private: set HF_TOKEN to a token with "
                                "access)")
    if code == "GatedRepo":
        raise HubAuthError(f"{what}: the repo is gated; accept its terms on the Hub and set HF_TOKEN")
    if code == "RevisionNotFound":
        raise RevisionNotFoundError(f"{what}: revision not found")
    said = _redact(" ".join(response.headers.get("X-Error-Message", "").split())[:200], token)
    detail = f"HTTP {status}" + (f": {said}" if said else "")
    if status == 403 and response.history:  # a CDN's signed URL that expired
        raise HubUnavailableError(f"{what}: the download URL the Hub redirected to was refused ({detail}, "
                                  "expired); asking the Hub for a new one")
    if status == 429:
        raise _Throttled(f"{what}: the Hub is unavailable ({detail}); retry later")
    if status >= 500 or status == 408:
        raise HubUnavailableError(f"{what}: the Hub is unavailable ({detail}); retry later")
    if status in (401, 403):
        raise HubAuthError(f"{what}: not authorised ({detail}); check HF_TOKEN")
    if status == 404:
        raise HubError(f"{what}: not found ({detail})")
    raise HubError(f"{what}: {detail}")
