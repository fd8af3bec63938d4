"""Shared fixtures: tiny local model pairs built offline, the Hub test server (helpers: model_helpers)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
from model_helpers import HUB_TOKEN

# Nothing in the tests may reach a real Hub: the default endpoint is a closed local port; the
# `hub` fixture points it at the test server. Xet is off unless a test's Hub stores with Xet.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("HF_TOKEN", None)


#: the test files that take longest (``--durations``), roughly longest first: parallel workers take a
#: file's tests (a test class's, where a file has classes) in collection order (``--dist loadscope
#: --no-loadscope-reorder``), so these start first and the short files fill in around them instead of
#: one long file starting last
LONGEST_FIRST = (
    "dags/test_standalone.py",
    "cluster/test_topology.py",
    "stream/test_stream_crash_points.py",
    "dags/test_dags.py",
    "sweep/test_runner.py",
    "engine/test_crash_points.py",
    "stream/test_evaluation.py",
    "validate/test_functional.py",
    "cli/test_sweep_command.py",
    "stream/test_pipeline.py",
    "integrations/airflow/test_demo.py",
    "hub/test_client.py",
    "test_kernel.py",
    "integrations/mergekit/test_run.py",
    "test_public_api.py",
    "validate/test_streaming.py",
)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    rank = {here / name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(item.fspath), len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLERP_PLUGIN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def demo_bf16(tmp_path_factory) -> tuple[Path, Path]:
    """bf16 Llama pair, sharded (several input shards), untied embeddings."""
    from slerp_plugin.demo.pair import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("bf16"), max_shard_size="100KB")


@pytest.fixture(scope="session")
def demo_fp32_tied(tmp_path_factory) -> tuple[Path, Path]:
    """float32 Llama pair, single-file checkpoints, tied embeddings."""
    from slerp_plugin.demo.pair import build_demo_pair

    return build_demo_pair(tmp_path_factory.mktemp("fp32"), dtype="float32", tie_word_embeddings=True)


#: the tests that run once per storage of the test Hub (LFS and Xet): those of these folders that use it
BOTH_STORAGES = ("hub", "stream")


def pytest_generate_tests(metafunc):
    folder = Path(metafunc.definition.fspath).parent
    ours = folder.name in BOTH_STORAGES and folder.parent == Path(__file__).parent
    chosen = any("hub_storage" in m.args[0] for m in metafunc.definition.iter_markers("parametrize"))
    if "hub" in metafunc.fixturenames and ours and not chosen:
        metafunc.parametrize("hub_storage", ["lfs", "xet"])


@pytest.fixture
def hub_storage() -> str:
    """How the test Hub stores large files: ``lfs``, or ``xet`` (hf_xet through the Hub's CAS)."""
    return "lfs"


@pytest.fixture
def hub(tmp_path, monkeypatch, hub_storage):
    """The Hub-compatible test server on 127.0.0.1, with HF_ENDPOINT/HF_TOKEN/HF_HUB_CACHE set, storing
    large files the ``hub_storage`` way; huggingface_hub (here and in the processes the test starts)
    uploads and downloads through Xet when that is ``xet``."""
    from hub_server import HubServer
    from huggingface_hub import constants

    xet = hub_storage == "xet"
    monkeypatch.setenv("SLERP_PLUGIN_HUB_BACKOFF", "0.01")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet-cache"))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "0" if xet else "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    with HubServer(tmp_path / "hub-blobs", xet=xet) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


@pytest.fixture
def refuse_direct_transfers(monkeypatch):
    """Direct descriptors open, but every transfer on them fails with EINVAL (as on filesystems
    that check alignment differently); counts the refusals."""
    refused = {"n": 0}
    preadv, pwrite = os.preadv, os.pwrite

    def check(fd):
        if _is_direct(fd):
            refused["n"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")

    def fake_preadv(fd, bufs, pos):
        check(fd)
        return preadv(fd, bufs, pos)

    def fake_pwrite(fd, data, pos):
        check(fd)
        return pwrite(fd, data, pos)

    monkeypatch.setattr(os, "preadv", fake_preadv)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    return refused


@pytest.fixture
def refuse_direct_open(monkeypatch):
    """``open(..., O_DIRECT)`` fails with EINVAL, as on filesystems without direct I/O."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
