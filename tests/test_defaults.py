"""The shared defaults: FusionBench's, importable without torch, the same everywhere they are used."""

from __future__ import annotations

import subprocess
import sys

from slerp_plugin import defaults, kernel
from slerp_plugin.spec import MergeSpec


def test_defaults_are_fusionbench_s_and_shared():
    assert (defaults.DEFAULT_DOT_THRESHOLD, defaults.DEFAULT_EPSILON) == (0.9995, 1e-8)
    assert kernel.DEFAULT_DOT_THRESHOLD is defaults.DEFAULT_DOT_THRESHOLD
    spec = MergeSpec(model_1="a", model_2="b", t=0.5, output="o")
    assert (spec.DOT_THRESHOLD, spec.epsilon, spec.chunk_elements) == (
        defaults.DEFAULT_DOT_THRESHOLD, defaults.DEFAULT_EPSILON, defaults.DEFAULT_CHUNK_ELEMENTS)


def test_the_spec_and_headers_need_no_torch():
    code = ("import sys, slerp_plugin.spec, slerp_plugin.io.safetensors, slerp_plugin.formats.manifest; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
