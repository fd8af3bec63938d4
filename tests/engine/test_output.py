"""Where a merge writes: an existing output or an input folder is never replaced by accident."""

from __future__ import annotations

import pytest
from model_helpers import spec_for

from slerp_plugin.engine import plan_merge
from slerp_plugin.errors import (
    OutputExistsError,
)
from slerp_plugin.formats.manifest import MANIFEST_NAME
from slerp_plugin.merge import run_merge


def test_existing_output_is_kept_unless_overwrite(demo_bf16, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="already exists"):
        run_merge(spec_for(demo_bf16, out))
    assert (out / "precious.txt").read_text() == "user data"
    run_merge(spec_for(demo_bf16, out, overwrite=True))
    assert not (out / "precious.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_output_inside_an_input_is_refused(demo_bf16):
    with pytest.raises(OutputExistsError, match="overlaps"):
        plan_merge(spec_for(demo_bf16, demo_bf16[0] / "merged"))
