"""The seed's FusionBench YAML → MergeSpec: allow-listed targets, validation, one-line errors."""

from __future__ import annotations

import re

import pytest
import yaml
from model_helpers import ROOT

from slerp_plugin.errors import ConfigError
from slerp_plugin.formats.fusionbench import METHOD_KEYS, spec_from_fusionbench
from slerp_plugin.spec import ModelRef

SEED_DOC = ROOT.parent / "shared" / "seed" / "fusionbench_llm_slerp_tutorial.txt"


def seed_cfg() -> dict:
    return yaml.safe_load((ROOT / "config/_get_started/llm_slerp.yaml").read_text())


def test_seed_config_is_verbatim():
    ours = (ROOT / "config/_get_started/llm_slerp.yaml").read_text()
    assert ours == (ROOT / "slerp_plugin/cli/conf/llm_slerp.yaml").read_text()
    if not SEED_DOC.is_file():
        pytest.skip("seed document not beside the checkout")
    doc = SEED_DOC.read_text()
    block = doc[doc.index("_target_: fusion_bench.programs"): doc.index("  1. Program Configuration")]
    assert yaml.safe_load(block) == yaml.safe_load(ours)
    assert ours.strip() == block.strip()


def test_seed_config_maps_to_spec():
    spec = spec_from_fusionbench(seed_cfg(), default_output="outputs/x/merged")
    assert spec.t == 0.5 and spec.DOT_THRESHOLD == 0.9995 and spec.epsilon == 1e-8
    assert spec.model_1 == ModelRef(ref="ibivibiv/alpaca-dragon-72b-v1")
    assert spec.model_2 == ModelRef(ref="moreh/MoMo-72B-lora-1.8.7-DPO")
    assert spec.tokenizer == spec.model_1
    assert str(spec.output) == "outputs/x/merged"


def test_method_options_and_model_mappings():
    cfg = seed_cfg()
    cfg["method"].update(DOT_THRESHOLD=0.9, epsilon=1e-6, model_save_path="/o", show_pbar=True,
                         max_shard_size="2GB", dtype="bf16")
    cfg["modelpool"]["models"] = {
        "first": {"_target_": "transformers.AutoModelForCausalLM.from_pretrained",
                  "pretrained_model_name_or_path": "org/a", "revision": "v1"},
        "second": "org/b@abc123",
    }
    spec = spec_from_fusionbench(cfg)
    assert (spec.DOT_THRESHOLD, spec.epsilon, spec.show_pbar) == (0.9, 1e-6, True)
    assert spec.max_shard_size == 2_000_000_000 and spec.dtype == "bfloat16"
    assert spec.model_1 == ModelRef(ref="org/a", revision="v1")
    assert spec.model_2 == ModelRef(ref="org/b", revision="abc123")
    assert spec.model_names == ("first", "second")


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda c: c["method"].update(t=1.5), r"t: must be between 0 and 1 \(got 1.5\)"),
        (lambda c: c["method"].update(t=-0.1), r"t: must be between 0 and 1"),
        (lambda c: c["method"].pop("t"), r"method.t: missing"),
        (lambda c: c["method"].update(DOT_THRESHOLD=0), r"DOT_THRESHOLD: .*greater than 0"),
        (lambda c: c["method"].update(DOT_THRESHOLD=1.01), r"DOT_THRESHOLD: .*less than or equal to 1"),
        (lambda c: c["method"].update(epsilon=0), r"epsilon: .*greater than 0"),
        (lambda c: c["method"].update(tt=0.3), r"method.tt: unknown option"),
        (lambda c: c["modelpool"]["models"].update(model_3="x/y"), r"exactly two models, got 3"),
        (lambda c: c["modelpool"]["models"].pop("model_2"), r"exactly two models, got 1"),
        (lambda c: c["method"].update(_target_="os.system"), r"method._target_: 'os.system' is not allowed"),
        (lambda c: c.update(_target_="builtins.exec"), r"config._target_: 'builtins.exec' is not allowed"),
        (lambda c: c["modelpool"].update(_target_="subprocess.run"), r"modelpool._target_"),
        (lambda c: c["modelpool"]["models"].update(
            model_1={"_target_": "os.system", "pretrained_model_name_or_path": "x"}), r"is not allowed"),
        (lambda c: c["method"].update(max_shard_size="lots"), r"not a size"),
        (lambda c: c["method"].update(device="tpu"), r"device must be"),
        (lambda c: c.update(surprise=1), r"unknown key"),
    ],
)
def test_invalid_configs_give_one_line_errors(mutate, match):
    cfg = seed_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        spec_from_fusionbench(cfg, default_output="o")
    assert re.search(match, str(e.value)), str(e.value)
    assert "\n" not in str(e.value)




def test_the_command_guide_lists_every_method_option():
    guide = (ROOT / "docs" / "command.md").read_text()
    listed = set(re.findall(r"^\| `method\.(\w+)` \|", guide, re.M))
    assert listed == set(METHOD_KEYS)
    readme = set(re.findall(r"^\| `method\.(\w+)` \|", (ROOT / "README.md").read_text(), re.M))
    assert readme and readme <= set(METHOD_KEYS)  # the README's short table names real options
