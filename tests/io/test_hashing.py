"""Input checksums: streamed from reads in order, completed from the file, cached by identity."""

from __future__ import annotations

import hashlib
import os

import pytest

from slerp_plugin.io.hashing import (
    ResumableSha256,
    StreamHasher,
    cache_dir,
    cached_sha256,
    has_cached_sha256,
    remember_sha256,
    sha256_file,
)


def test_stream_hasher_takes_reads_in_order_and_reads_the_rest(tmp_path):
    data = os.urandom(100_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = StreamHasher(path)
    h.feed(0, memoryview(data[:1000]))
    h.feed(5000, memoryview(data[5000:6000]))  # a jump ahead: not hashed
    h.feed(500, memoryview(data[500:3000]))  # overlaps: only the new part counts
    assert h.pos == 3000
    assert h.hexdigest() == hashlib.sha256(data).hexdigest() == sha256_file(path)
    assert h.pos == len(data)


def test_cache_remembers_a_file_as_it_is_and_forgets_it_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "sha256"
    path = tmp_path / "f"
    path.write_bytes(b"one")
    assert not has_cached_sha256(path)
    assert cached_sha256(path) == hashlib.sha256(b"one").hexdigest() and has_cached_sha256(path)
    remember_sha256(path, "0" * 64)  # what the cache says is believed while the file is unchanged
    assert cached_sha256(path) == "0" * 64
    path.write_bytes(b"two!")
    assert not has_cached_sha256(path) and cached_sha256(path) == hashlib.sha256(b"two!").hexdigest()


def test_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(blocker))
    path = tmp_path / "f"
    path.write_bytes(b"data")
    assert cached_sha256(path) == hashlib.sha256(b"data").hexdigest()


def test_resumable_sha256_goes_on_from_a_saved_state():
    data = os.urandom(300_001)
    h = ResumableSha256(data[:7])
    h.update(memoryview(data)[7:100_000])  # a slice of a larger buffer
    saved = h.state()
    assert len(saved) < 200 and h.hexdigest() == hashlib.sha256(data[:100_000]).hexdigest()
    h.update(memoryview(data[100_000:]))  # a whole buffer
    resumed = ResumableSha256.from_state(saved)
    resumed.update(data[100_000:])
    assert resumed.hexdigest() == h.hexdigest() == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError):
        ResumableSha256.from_state(b"not a state")


@pytest.mark.parametrize("backend", ["openssl", "rehashes"])
def test_a_state_is_restored_by_the_backend_that_saved_it(monkeypatch, backend):
    """States of runs that saved them with rehashes (or where libcrypto cannot be loaded) still
    restore where OpenSSL is used, and the reverse is refused with one line."""
    from slerp_plugin.io import hashing

    if backend == "rehashes":
        monkeypatch.setattr(hashing, "_libcrypto", lambda: None)
    elif hashing._libcrypto() is None:
        pytest.skip("OpenSSL's libcrypto cannot be loaded here")
    data = os.urandom(70_000)
    h = ResumableSha256(data[:1000])
    h.update(memoryview(bytearray(data))[1000:50_000])  # a writable buffer: hashed where it is
    saved = h.state()
    assert saved.startswith(hashing._OPENSSL_TAG) == (backend == "openssl") and len(saved) <= 140
    monkeypatch.undo()
    resumed = ResumableSha256.from_state(saved)
    resumed.update(data[50_000:])
    assert resumed.hexdigest() == hashlib.sha256(data).hexdigest()
    if backend == "openssl":
        monkeypatch.setattr(hashing, "_libcrypto", lambda: None)
        with pytest.raises(ValueError, match="cannot be loaded here"):
            ResumableSha256.from_state(saved)
