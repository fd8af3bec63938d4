"""mergekit runs of ``slerp_for_causal_lm`` get our manifest and model card.

:func:`patch_mergekit` wraps ``mergekit.merge.run_merge`` (and the name ``mergekit-yaml`` calls):
for our method only, it records the kernel's per-tensor decisions, skips mergekit's own model card
(which looks local paths up on the Hub) and writes ``merge_manifest.json`` and a ``README.md`` as
rich as the streaming path's. Other methods run untouched.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

import yaml

from ...errors import SlerpPluginError
from ...formats.manifest import InputRecord, Manifest, ShardRecord, TensorRecord, describe_input
from ...formats.mergekit_yaml import spec_from_mergekit
from ...formats.modelcard import render_model_card
from ...io.hashing import sha256_file
from ...io.model_files import model_files, tokenizer_files
from ...io.safetensors import Checkpoint
from ...spec import ModelRef
from .method import METHOD_NAME, RECORDER

log = logging.getLogger(__name__)

_PATCHED = "__slerp_plugin_wrapped__"


def _wrap_run_merge(original):
    if getattr(original, _PATCHED, False):
        return original

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options=None, config_source=None, **kwargs):
        if getattr(merge_config, "merge_method", None) != METHOD_NAME or options is None:
            return original(merge_config, out_path, options, config_source, **kwargs)
        write_card = options.write_model_card
        quiet_options = options.model_copy(update={"write_model_card": False})
        started = time.perf_counter()
        RECORDER.start()
        try:
            result = original(merge_config, out_path, quiet_options, config_source, **kwargs)
        finally:
            records = RECORDER.stop()
        source = config_source or merge_config.to_yaml()
        write_outputs(Path(out_path), source, records, time.perf_counter() - started, write_card)
        return result

    setattr(run_merge, _PATCHED, True)
    return run_merge


def patch_mergekit(import_merge: bool = True) -> None:
    """Wrap ``run_merge`` in ``mergekit.merge`` and ``mergekit.scripts.run_yaml`` where loaded.

    ``import_merge`` imports ``mergekit.merge`` first; the import hook passes False, since it may
    run while mergekit is still importing (it patches each module once that has loaded).
    """
    if import_merge and "mergekit.merge" not in sys.modules:
        import mergekit.merge  # noqa: F401
    for name in ("mergekit.merge", "mergekit.scripts.run_yaml"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "run_merge"):
            module.run_merge = _wrap_run_merge(module.run_merge)


def _input(ref: ModelRef) -> InputRecord:
    folder = Path(ref.ref)
    if folder.is_dir():
        return describe_input(ref, folder.resolve(), model_files(folder.resolve()))
    return InputRecord(ref=ref.ref, revision=ref.revision, path="")


def write_outputs(
    out: Path, config_yaml: str, records: dict, seconds: float, write_card: bool = True
) -> Manifest:
    """Write ``merge_manifest.json`` (and, with ``write_card``, ``README.md`` and
    ``mergekit_config.yml``) into a finished mergekit output folder."""
    doc = yaml.safe_load(config_yaml)
    warnings: list[str] = []
    try:
        spec = spec_from_mergekit(doc, out).model_dump(mode="json")
        m1, m2 = ModelRef(**spec["model_1"]), ModelRef(**spec["model_2"])
        tok = ModelRef(**spec["tokenizer"]) if spec.get("tokenizer") else m1
    except SlerpPluginError as e:
        warnings.append(f"config not representable as a MergeSpec: {e}")
        spec = {"mergekit_config": doc}
        m1 = ModelRef(ref=str(doc.get("base_model")))
        m2 = m1
        tok = m1
    inputs = {"model_1": _input(m1), "model_2": _input(m2)}
    tok_dir = Path(tok.ref)
    inputs["tokenizer"] = (
        describe_input(tok, tok_dir.resolve(), tokenizer_files(tok_dir.resolve()))
        if tok_dir.is_dir() else InputRecord(ref=tok.ref, revision=tok.revision, path="")
    )
    ckpt = Checkpoint.open(out)
    shards, tensors = [], []
    for f in ckpt.files:
        infos = [i for i in ckpt.tensors.values() if i.file == f]
        shards.append(ShardRecord(file=f.name, size=f.stat().st_size, sha256=sha256_file(f),
                                  tensors=len(infos)))
        for info in sorted(infos, key=lambda i: i.offset):
            if info.name not in records:
                warnings.append(
                    f"{info.name}: not produced by the slerp_for_causal_lm kernel in this process")
                continue
            t, coeff = records[info.name]
            tensors.append(TensorRecord(name=info.name, shape=list(info.shape), dtype=info.dtype,
                                        shard=f.name, t=t, **coeff.as_record()))
    manifest = Manifest.create(
        spec=spec, inputs=inputs, shards=shards, total_size=ckpt.total_bytes, tensors=tensors,
        warnings=warnings, timings={"total_s": round(seconds, 3)}, engine="mergekit",
    )
    manifest.write(out)
    if write_card:
        (out / "README.md").write_text(render_model_card(manifest, config_yaml=config_yaml))
        (out / "mergekit_config.yml").write_text(config_yaml)
    log.info("wrote %s and the model card (%d tensors recorded)", out / "merge_manifest.json", len(tensors))
    return manifest
