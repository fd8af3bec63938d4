"""What a merge runs on: the device, usable CPUs and torch compute threads."""

from __future__ import annotations

import os

import torch

from slerp_plugin.engine.resources import compute_threads, usable_cpus


def test_compute_threads_sets_and_restores():
    before = torch.get_num_threads()
    with compute_threads(torch.device("cpu"), 1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with compute_threads(torch.device("cpu"), None) as n:
        assert n == max(1, usable_cpus() - 2)
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
