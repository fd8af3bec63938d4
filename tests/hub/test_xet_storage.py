"""The test Hub's Xet storage, as huggingface_hub and hf_xet meet it: files uploaded through the CAS
come back bit for bit from any byte range, tokens are refreshed through the Hub, and a file whose
bytes do not have the SHA-256 its upload claimed is refused."""

from __future__ import annotations

import hashlib
import os
import re

import httpx
import pytest
from xet_cas import unpack_chunk

from slerp_plugin.errors import HubError
from slerp_plugin.hub import client as H
from slerp_plugin.hub import lfs

pytestmark = pytest.mark.parametrize("hub_storage", ["xet"])


def _content() -> bytes:
    """Some megabytes that chunk and compress every way: random, zeros, and a float-like pattern."""
    rnd = os.urandom(3_000_000)
    floats = bytes(b % 7 for b in rnd[:1_000_000])  # compressible once grouped by byte position
    return rnd + bytes(2_000_000) + floats


def _read(url: str, token: str, first: int, last: int) -> bytes:
    """Bytes [first, last] of a file through the CAS's reconstruction API, as a Xet client reads them."""
    auth = {"Authorization": f"Bearer {token}"}
    rec = httpx.get(url, headers={**auth, "Range": f"bytes={first}-{last}"}).json()
    out = bytearray()
    for term in rec["terms"]:
        want = term["range"]
        fetch = next(f for f in rec["fetch_info"][term["hash"]]
                     if f["range"]["start"] <= want["start"] and f["range"]["end"] >= want["end"])
        r = fetch["url_range"]
        data = httpx.get(fetch["url"], headers={"Range": f"bytes={r['start']}-{r['end']}"}).content
        off, index = 0, fetch["range"]["start"]
        while index < term["range"]["end"]:
            stored = int.from_bytes(data[off + 1:off + 4], "little")
            size = int.from_bytes(data[off + 5:off + 8], "little")
            if index >= term["range"]["start"]:
                out += unpack_chunk(data[off + 4], data[off + 8:off + 8 + stored], size)
            off, index = off + 8 + stored, index + 1
    start = rec["offset_into_first_range"]
    return bytes(out[start:start + last - first + 1])


def test_a_file_uploaded_through_xet_is_served_whole_and_by_any_range(hub, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    data = _content()
    (folder / "model.safetensors").write_bytes(data)
    (folder / "config.json").write_text("{}")
    up = H.upload_folder(folder, "org/xet")
    assert hub.state.upload_requests() >= 1  # xorbs went to the CAS
    entry = hub.state.repos["org/xet"].resolve("main").files["model.safetensors"]
    assert entry.xet_hash and entry.sha256 == hashlib.sha256(data).hexdigest()

    head = httpx.head(f"{hub.url}/org/xet/resolve/main/model.safetensors")
    assert head.headers["X-Xet-Hash"] == entry.xet_hash and 'rel="xet-auth"' in head.headers["Link"]
    d = H.download_model("org/xet", revision=up.commit)
    assert (d.path / "model.safetensors").read_bytes() == data
    assert any(p.startswith("/xet-cas/v1/reconstructions/") for _, p, _ in hub.state.requests)

    token = httpx.get(f"{hub.url}/api/models/org/xet/xet-read-token/main",
                      headers={"Authorization": "Bearer hf_test_token_write"}).json()
    url = f"{token['casUrl']}/v1/reconstructions/{entry.xet_hash}"
    n = len(data)
    for first, last in [(0, n - 1), (1, 70_000), (2_999_990, 3_100_000), (n - 5, n + 99)]:
        assert _read(url, token["accessToken"], first, last) == data[first:last + 1], (first, last)
    assert httpx.get(url, headers={"Range": "bytes=0-10"}).status_code == 401  # no token


def test_expired_tokens_are_refreshed_through_the_hub(hub, tmp_path):
    hub.state.xet_token_ttl = 1.0
    hub.state.per_connection = 1e6  # each xorb takes a few seconds: tokens expire meanwhile
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(_content())
    H.upload_folder(folder, "org/slow")
    tokens = [p for _, p, _ in hub.state.requests if re.search(r"/xet-write-token/", p)]
    assert len(tokens) >= 2


def test_a_file_whose_bytes_are_not_the_sha256_claimed_is_refused(hub, tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"abc" * 1000)
    lfs.ensure_repo("org/bad")
    with pytest.raises(HubError) as e:
        lfs.preupload("org/bad", f, f.name, "0" * 64)
    assert "\n" not in str(e.value)
    assert "0" * 64 not in hub.state.xet.by_sha256
