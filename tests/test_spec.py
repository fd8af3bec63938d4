"""MergeSpec: sizes, JSON round trip."""

from __future__ import annotations

import pytest

from slerp_plugin.spec import MergeSpec, parse_size


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("0", "-1GB", "5 parsecs", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_spec_round_trips_through_json():
    spec = MergeSpec.build(model_1="a", model_2="b", t=0.25, output="o")
    assert MergeSpec.model_validate_json(spec.model_dump_json()) == spec
