"""The training objectives (docs/METHOD.md §7): each loss is its formula on hand-built tensors."""

import math

import pytest
import torch

from d_fusion.objectives import dpo_loss, per_prompt_advantages, ppo_loss


def test_dpo_loss_is_the_formula():
    alpha, beta, eps = 2.0, 0.5, 0.1
    log_ratio_w = torch.tensor([0.05, 0.3, -0.02])  # the second is clipped to log(1.1)
    log_ratio_l = torch.tensor([-0.01, 0.0, -0.5])  # the third is clipped to log(0.9)
    noise_w = torch.randn(3, 4, 2, 2)
    noise_ref_w = torch.randn(3, 4, 2, 2)
    loss, stats = dpo_loss(log_ratio_w, log_ratio_l, noise_w, noise_ref_w, alpha, beta, eps)
    for j in range(3):
        r_w = min(max(math.exp(log_ratio_w[j].item()), 1 - eps), 1 + eps)
        r_l = min(max(math.exp(log_ratio_l[j].item()), 1 - eps), 1 + eps)
        margin = alpha * (math.log(r_w) - math.log(r_l))
        expected = -math.log(1 / (1 + math.exp(-margin))) + beta * ((noise_w[j] - noise_ref_w[j]) ** 2).mean().item()
        assert loss[j].item() == pytest.approx(expected, rel=1e-5)
    assert stats["clipped"].tolist() == [0.0, 0.5, 0.5]
    assert stats["accuracy"].tolist() == [1.0, 1.0, 1.0]


def test_ppo_loss_and_advantages():
    advantages = per_prompt_advantages([1.0, 3.0, 10.0, 10.0, 0.0], ["a", "a", "b", "b", "b"], clip=1.2)
    assert advantages[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    b = torch.tensor([10.0, 10.0, 0.0])
    assert advantages[2:].tolist() == pytest.approx(((b - b.mean()) / (b.std(unbiased=False) + 1e-6)).clamp(-1.2, 1.2).tolist())
    log_prob = torch.tensor([0.5, 0.0, -0.5])
    loss, stats = ppo_loss(log_prob, torch.zeros(3), torch.tensor([1.0, -1.0, -1.0]), eps=0.2)
    # ratio e^0.5 > 1.2 with A > 0: clipped; ratio 1: unclipped; ratio e^-0.5 < 0.8 with A < 0: clipped
    assert loss.tolist() == pytest.approx([-1.2, 1.0, 0.8])
    assert stats["clipped"].tolist() == [1.0, 0.0, 1.0]
