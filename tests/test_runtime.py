"""workbench.runtime — what train and removal share — against formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.removal import RemovalConfig
from workbench.runtime import Dist, evaluate, resolve_device, warmup_cosine
from workbench.train import TrainConfig


def test_warmup_cosine_is_the_written_out_schedule():
    peak, m = 2.0, 0.1
    for step in range(3):
        assert warmup_cosine(step, peak, 3, 10, 20, m) == pytest.approx(peak * (step + 1) / 3)
    for step in range(3, 40):
        p = min(1.0, (step - 10) / 20)
        assert warmup_cosine(step, peak, 3, 10, 20, m) == pytest.approx(peak * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))))
    assert warmup_cosine(30, peak, 3, 10, 20, m) == pytest.approx(peak * m)  # the floor, flat after


def test_both_loops_take_their_lr_from_it():
    t = TrainConfig(steps=100, warmup_steps=10, lr=3e-3, min_lr_ratio=0.1)
    assert [t.lr_at(s) for s in (0, 9, 10, 55, 99)] == pytest.approx(
        [3e-4, 3e-3, 3e-3, 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))), 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))])
    s = RemovalConfig.of(warmup_steps=2, min_lr_ratio=0.5).schedule
    # held at the peak through the removal (step 19 is its last), then the cosine from 1/final_steps on
    assert s.lr_at(19, 20, 4, 1.0) == 1.0
    assert s.lr_at(20, 20, 4, 1.0) == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(23, 20, 4, 1.0) == pytest.approx(0.5)


def test_each_rank_gets_its_contiguous_share_of_the_global_batch():
    batch = torch.arange(24).reshape(6, 4)
    shares = [Dist(r, 3).share(batch) for r in range(3)]
    assert all(len(s) == 2 for s in shares)
    torch.testing.assert_close(torch.cat(shares), batch)
    assert Dist().share(batch) is not None and Dist().main and not Dist(1, 2).main


def test_evaluate_is_the_mean_next_token_cross_entropy():
    torch.manual_seed(0)
    W = torch.randn(11, 11) * 3
    forward = lambda t: W[t]  # noqa: E731  — logits from the current token alone
    batches = [torch.randint(0, 11, (2, 7)), torch.randint(0, 11, (3, 7))]
    seen = []
    got = evaluate(forward, batches, torch.device("cpu"), before=seen.append)
    want = sum(F.cross_entropy(W[b[:, :-1]].reshape(-1, 11), b[:, 1:].reshape(-1)).item() for b in batches) / 2
    assert got == pytest.approx(want, rel=1e-6) and len(seen) == 2


def test_a_bad_device_is_one_line():
    with pytest.raises(WorkbenchError, match="unknown device 'tpu'; use cpu or cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(WorkbenchError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
