"""Nightly recipes: validated YAML files, errors naming the file, one DAG id each."""

from __future__ import annotations

import pytest

from slerp_plugin.errors import ConfigError
from slerp_plugin.integrations.airflow.recipes import load_recipes


def test_recipes_load_with_defaults(tmp_path):
    (tmp_path / "b.yaml").write_text("name: dragon-momo\nmodel_1: org/a\nmodel_2: org/b\nt: 0.5\n")
    (tmp_path / "a.yml").write_text("name: x\nschedule: '*/5 * * * *'\nmodel_1: /m/a\nmodel_2: /m/b\nt: 0\n")
    (tmp_path / "notes.txt").write_text("ignored")
    first, second = load_recipes(tmp_path)
    assert (first.name, first.schedule, first.dag_id) == ("x", "*/5 * * * *", "slerp_nightly_x")
    assert second.dag_id == "slerp_nightly_dragon_momo" and second.schedule == "0 2 * * *"
    assert second.params()["t"] == 0.5 and "schedule" not in second.params()


@pytest.mark.parametrize("text,match", [
    ("name: x\nmodel_1: a\nmodel_2: b\nt: 3\n", r"bad\.yaml: .*t: Input should be less than or equal to 1"),
    ("name: x\nmodel_1: a\nt: 0.5\n", r"bad\.yaml: .*model_2: Field required"),
    ("name: x\nmodel_1: a\nmodel_2: b\nt: 0.5\nsurprise: 1\n", r"surprise: unknown option"),
    ("name: [unclosed\n", r"bad\.yaml: not valid YAML"),
])
def test_a_bad_recipe_is_one_line_naming_the_file(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipes(tmp_path)


def test_two_recipes_may_not_share_a_dag(tmp_path):
    for f in ("a.yaml", "b.yaml"):
        (tmp_path / f).write_text("name: same\nmodel_1: a\nmodel_2: b\nt: 0.5\n")
    with pytest.raises(ConfigError, match="share a name"):
        load_recipes(tmp_path)
