"""A model evaluated from tensors handed over shard by shard gives the perplexity of the model in
its folder; what a later module reads is kept aside, counted, and deleted at the end."""

from __future__ import annotations

import pytest
import torch

from slerp_plugin.io.safetensors import Checkpoint
from slerp_plugin.validate import EvalSettings
from slerp_plugin.validate.fed import FedEvaluator
from slerp_plugin.validate.functional import eval_tokens
from slerp_plugin.validate.streaming import StreamedCausalLM

CPU = torch.device("cpu")


class Account:
    def __init__(self):
        self.held = self.peak = 0

    def hold(self, n):
        self.held += n
        self.peak = max(self.peak, self.held)

    def give(self, n):
        self.held -= n


@pytest.mark.parametrize("fixture", ["demo_bf16", "demo_fp32_tied"])
def test_fed_shard_by_shard_equals_the_folder(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)[0]
    _, ids = eval_tokens(folder, EvalSettings(max_tokens=300))
    with StreamedCausalLM(folder, CPU) as model:
        want = model.perplexity(ids, 128)
    tensors = Checkpoint.open(folder).tensors
    account = Account()
    ev = FedEvaluator("model", folder, tensors, CPU, None, tmp_path / "aside", account)
    ev.start(ids, 128)
    embed = {n: i for n, i in tensors.items() if "embed" in n}
    rest = {n: i for n, i in tensors.items() if n not in embed}
    ev.take(embed)  # the first "shard": the embedding
    tied = "lm_head.weight" not in tensors
    assert (account.held > 0) == tied  # a tied head reads the table again at the end
    ev.take(rest)
    ev.close()
    assert ev.problem() is None and ev.evaluation().perplexity == pytest.approx(want, rel=1e-5)
    assert account.held == 0 and not list(tmp_path.glob("aside/*"))  # copies deleted, their bytes given back


def test_a_tensor_never_offered_is_reported(demo_bf16, tmp_path):
    folder = demo_bf16[0]
    _, ids = eval_tokens(folder, EvalSettings(max_tokens=64))
    tensors = Checkpoint.open(folder).tensors
    ev = FedEvaluator("model", folder, tensors, CPU, None, tmp_path / "aside")
    ev.start(ids, 64)
    ev.take({n: i for n, i in tensors.items() if n != "lm_head.weight"})
    ev.close()
    assert ev.problem() == "it reads a tensor no shard holds"
