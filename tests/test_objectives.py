"""The training objectives (docs/METHOD.md §7, §8): each loss is its formula on hand-built tensors."""

import math

import pytest
import torch

from d_fusion.objectives import dpo_loss, dpok_loss, gaussian_kl, per_prompt_advantages, ppo_loss


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


def test_stat_tracking_uses_each_prompts_last_scores_across_epochs_or_the_batch():
    scores, prompts = [4.0, 5.0, 0.0, 10.0], ["a", "a", "b", "b"]
    history = {"a": [1.0, 2.0, 3.0], "c": [7.0]}
    advantages = per_prompt_advantages(scores, prompts, 10.0, history, buffer_size=4, min_count=3)

    def standardised(values, of):
        of = torch.tensor(of)
        return ((torch.tensor(values) - of.mean()) / (of.std(unbiased=False) + 1e-6)).tolist()

    # "a": its last 4 scores, 2 of them from earlier epochs; "b": 2 < min_count 3, so the whole batch's
    assert advantages[:2].tolist() == pytest.approx(standardised([4.0, 5.0], [2.0, 3.0, 4.0, 5.0]))
    assert advantages[2:].tolist() == pytest.approx(standardised([0.0, 10.0], scores))
    # without a buffer: this epoch's per-prompt statistics, whatever the history
    assert per_prompt_advantages(scores, prompts, 10.0, history).tolist() == pytest.approx([-1, 1, -1, 1], abs=1e-5)
    assert per_prompt_advantages(scores, prompts, 0.5, history, 4, 3).abs().max() == 0.5  # then clipped


def test_dpok_kl_is_the_gaussian_kl_and_the_loss_adds_it_to_ppo():
    generator = torch.Generator().manual_seed(0)
    mean, ref_mean = torch.randn(3, 4, 2, 2, generator=generator), torch.randn(3, 4, 2, 2, generator=generator)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    direct = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref_mean, std.expand_as(mean))
    )  # (3, 4, 2, 2), per latent dim
    torch.testing.assert_close(gaussian_kl(mean, ref_mean, std), direct.mean(dim=(1, 2, 3)))
    log_prob, old, advantages = torch.tensor([0.5, 0.0, -0.5]), torch.zeros(3), torch.tensor([1.0, -1.0, -1.0])
    loss, stats = dpok_loss(log_prob, old, advantages, mean, ref_mean, std, eps=0.2, kl_weight=0.3)
    ppo, _ = ppo_loss(log_prob, old, advantages, eps=0.2)
    torch.testing.assert_close(loss, ppo + 0.3 * direct.mean(dim=(1, 2, 3)))
    assert torch.equal(stats["kl"], gaussian_kl(mean, ref_mean, std))
