"""Safetensors headers, chunked reads and the streamed shard writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from slerp_plugin.errors import CheckpointError
from slerp_plugin.io.reader import TensorReader
from slerp_plugin.io.safetensors import Checkpoint, read_header


@pytest.fixture
def st_file(tmp_path):
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.randn(5, 7).to(torch.bfloat16),
        "c": torch.tensor(3.0, dtype=torch.float64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_header_and_chunked_reads_match_safetensors(st_file):
    path, tensors = st_file
    infos, meta = read_header(path)
    assert meta == {"format": "pt"}
    by_name = {i.name: i for i in infos}
    assert set(by_name) == set(tensors)
    with TensorReader() as r:
        for name, t in tensors.items():
            info = by_name[name]
            assert info.shape == tuple(t.shape)
            whole = r.read_tensor(info)
            assert torch.equal(whole.reshape(t.shape), t)
            flat = t.reshape(-1)
            if flat.numel() > 3:
                assert torch.equal(r.read_tensor(info, 2, 3), flat[2:5])


def test_truncated_file_is_reported(st_file):
    path, _ = st_file
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(path)


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x01\x02", "truncated"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 5) + b"{nope", "corrupt safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
)
def test_corrupt_headers_are_reported(tmp_path, payload, match):
    p = tmp_path / "model.safetensors"
    p.write_bytes(payload)
    with pytest.raises(CheckpointError, match=match):
        read_header(p)


def test_inconsistent_offsets_are_reported(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="do not fit"):
        read_header(p)


def test_sharded_checkpoint_with_missing_shard(demo_bf16, tmp_path):
    import shutil

    a, _ = demo_bf16
    copy = tmp_path / "a"
    shutil.copytree(a, copy)
    ck = Checkpoint.open(copy)
    assert len(ck.files) > 1
    ck.files[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint.open(copy)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled PyTorch weights"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(tmp_path / "nope")




def write_raw(path, header: str | bytes, data: bytes = b""):
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


ENTRY = '"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'


@pytest.mark.parametrize("header,data,match", [
    ('{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"y":{"dtype":"U8","shape":[2],'
     '"data_offsets":[1,3]}}', b"abc", "overlaps the tensor before it"),
    ("{" + ENTRY + "}", b"abcd", "2 bytes after the last tensor"),
    ('{"x":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"abc", "leaves a gap"),
    ('{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2.0]}}', b"ab", "data_offsets must be two"),
    ('{"x":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"ab", "shape must be a list"),
    ('{"x":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,2]}}', b"ab", "Infinity is not JSON"),
    ('{"x":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}', b"ab", "shape must be a list"),
    ('{"x":{"dtype":["U8"],"shape":[2],"data_offsets":[0,2]}}', b"ab", "dtype is not a name"),
    ('{"x":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"ab", "appears twice"),
    ('{"__metadata__":{"a":1},' + ENTRY + "}", b"ab", "__metadata__ must map strings to strings"),
    ('{"__metadata__":[],' + ENTRY + "}", b"ab", "__metadata__ must map strings to strings"),
    ('{"\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"ab", "corrupt safetensors header"),
    ("[" * 100_000 + "]" * 100_000, b"", "nested too deeply|not a JSON object"),
    ('{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2,4]}}', b"ab", "data_offsets must be two"),
    ('{"x":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,2]}}', b"ab", "shape must be"),
    ('{"x":"F32"}', b"", "needs dtype, shape and data_offsets"),
])
def test_headers_the_library_rejects_are_refused_in_one_line(tmp_path, header, data, match):
    path = write_raw(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        read_header(path)
    assert "\n" not in str(e.value) and e.value.path == path
    assert library_rejects(path)


def test_a_repeated_tensor_name_is_refused(tmp_path):
    """The library takes the last of two entries of one name silently; which one a merge would
    read is then a guess, so it is refused here."""
    path = write_raw(tmp_path / "model.safetensors", "{" + ENTRY + "," + ENTRY + "}", b"ab")
    with pytest.raises(CheckpointError, match="key 'x' appears twice"):
        read_header(path)


def library_rejects(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception:  # the library's own error type
        return True
    return False


def test_what_the_library_accepts_is_read_the_same(tmp_path):
    path = write_raw(tmp_path / "model.safetensors",
                     ' {"__metadata__":null,"y":{"dtype":"BF16","shape":[1],"data_offsets":[2,4],"extra":1},'
                     '"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}\t ', b"abcd")
    infos, meta = read_header(path)
    got = [(i.name, i.dtype, i.shape, i.nbytes) for i in infos]
    assert got == [("x", "U8", (2,), 2), ("y", "BF16", (1,), 2)]
    assert meta == {} and not library_rejects(path)


@pytest.mark.parametrize("weight_map,match", [
    ({"x": "../../etc/passwd"}, "outside the model folder"),
    ({"x": "/etc/passwd"}, "outside the model folder"),
    ({"x": 7}, "is not a file name"),
    ({}, "no weight_map"),
])
def test_an_index_naming_files_outside_the_folder_is_refused(tmp_path, weight_map, match):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=match):
        Checkpoint.open(tmp_path)


# --------------------------------------------------------------------------- property-based

def _header_strategy():
    from hypothesis import strategies as st

    names = st.sampled_from(["a", "b", "__metadata__", "\u00e9", "x.y"])
    ints = st.one_of(st.integers(-3, 12), st.sampled_from([2**64, 2**63]))
    numbers = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())
    values = st.one_of(numbers, st.sampled_from(["U8", "F32", "BF16", "I64", "U16", "nope", ""]),
                       st.lists(ints, max_size=4), st.lists(numbers, max_size=3))
    entry = st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), values, max_size=4)
    good = st.fixed_dictionaries({"dtype": st.sampled_from(["U8", "F32", "BF16", "U16"]),
                                  "shape": st.lists(st.integers(0, 3), max_size=2),
                                  "data_offsets": st.lists(st.integers(0, 12), min_size=2, max_size=2)})
    return st.dictionaries(names, st.one_of(good, entry, values, st.dictionaries(st.text(max_size=2), values,
                                                                                   max_size=2)), max_size=4)


def test_fuzzed_headers_never_crash_and_never_accept_what_the_library_rejects(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(doc=_header_strategy(), data_len=st.integers(0, 16), raw=st.binary(max_size=24),
           use_raw=st.booleans())
    def check(doc, data_len, raw, use_raw):
        header = raw if use_raw else json.dumps(doc, allow_nan=True).encode()
        path = write_raw(folder / "model.safetensors", header, b"\x01" * data_len)
        try:
            infos, _ = read_header(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
            return
        assert not library_rejects(path), header  # never a silent accept of what the library rejects
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(i.name for i in infos)

    check()
