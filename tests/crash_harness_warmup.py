"""Imported once by the crash harness's fork server (tests/crash_harness.py): imports what a run
loads lazily and composes the command's bundled config, so that every run forked from the server
starts with Hydra's imports and caches warm (a third of a run's time otherwise). Nothing is
computed: no torch thread starts before the server forks."""

import contextlib
import io

import accelerate  # noqa: F401  (the gate's evaluators build the model class on the meta device)
import huggingface_hub.hf_api  # noqa: F401  (the library loads these lazily, in every run)
import huggingface_hub.lfs  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import slerp_plugin.stream.evaluation  # noqa: F401
import slerp_plugin.stream.remote  # noqa: F401
import slerp_plugin.validate.spot  # noqa: F401
from slerp_plugin.cli.main import main

with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main(["--cfg", "job"])
