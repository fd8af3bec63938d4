"""HTTP range reads of a Hub repo's files at one commit: byte ranges streamed, resumed, retried.

:class:`RangeReader` is how a streaming merge takes its parents' bytes without downloading whole
files: a safetensors header is two small reads, a tensor is one ranged GET. A connection that
drops mid-range is resumed from the last byte received; connection errors, 5xx and 429 are
retried with exponential backoff (``retries`` times without progress); anything else (404,
auth) fails at once. Nothing goes to the Hub cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..errors import HubError, HubUnavailableError
from .client import DEFAULT_RETRIES, _backoff, _endpoint, _translate

log = logging.getLogger(__name__)

#: what one GET may take before it is given up and retried, in seconds (connect, then each read)
TIMEOUT_S = 60.0

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
                response = getattr(e, "response", None)
                if on_throttled is not None and getattr(response, "status_code", None) == 429:
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
        """One ranged GET from ``reached[0]`` to ``stop``, advancing ``reached[0]`` chunk by chunk."""
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        start = reached[0]
        headers = build_hf_headers(token=self.token, library_name="slerp_plugin")
        headers["Range"] = f"bytes={start}-{stop - 1}"
        headers["Accept-Encoding"] = "identity"
        pos = start
        with get_session().stream("GET", self.url(name), headers=headers, follow_redirects=True,
                                  timeout=TIMEOUT_S) as response:
            if response.status_code == 403 and response.history:  # a CDN's signed URL that expired
                raise HubUnavailableError(f"{self.repo_id}/{name}: the download URL the Hub redirected to "
                                          "was refused (HTTP 403, expired); asking the Hub for a new one")
            hf_raise_for_status(response)
            if response.status_code != 206 and start > 0:
                raise HubError(f"{self.repo_id}/{name}: the server does not answer range requests "
                               f"(HTTP {response.status_code})")
            for raw in response.iter_bytes():  # as received: no re-chunking copies
                chunk = memoryview(raw)[: stop - pos]
                if not len(chunk):
                    break
                sink(pos, chunk)
                pos += len(chunk)
                reached[0] = pos
                self.bytes_read += len(chunk)
                if pos >= stop:
                    break
