"""The policy on SD 3: stored flow transitions scored again, reference = adapters off, DPO's gradient reaches LoRA."""

import math

import pytest
import torch

from d_fusion.objectives import dpo_loss
from d_fusion.sd3 import encode_sd3_prompts, load_sd3_models
from d_fusion.trainer import Policy, add_model_lora
from tests.test_sampling import assert_equal_to_fp32_precision
from tests.test_sd3 import PROMPT, STEPS, flow_sampler, sample


@pytest.fixture
def fresh_tiny_sd3(tiny_sd3_dir):
    return load_sd3_models(tiny_sd3_dir, mixed_precision="no")


def policy(models, noise_level=0.7):
    return Policy(models, encode_sd3_prompts(models, [""]), flow_sampler(noise_level))


def test_stored_log_probs_are_scored_again_exactly(tiny_sd3):
    trajectories = sample(tiny_sd3, [0, 1])
    log_probs = policy(tiny_sd3).trajectory_log_probs(trajectories, encode_sd3_prompts(tiny_sd3, [PROMPT] * 2))
    assert_equal_to_fp32_precision(log_probs, trajectories.log_probs)
    assert policy(tiny_sd3).trainable_steps() == list(range(STEPS))
    assert policy(tiny_sd3, noise_level=0.0).trainable_steps() == []


def test_dpo_on_flow_pairs_starts_at_log_2_and_its_gradient_reaches_lora(fresh_tiny_sd3):
    models = fresh_tiny_sd3
    pair = sample(models, [0, 1])  # (w, l)
    params = add_model_lora(models, rank=2, seed=0)
    flow = policy(models)
    flow.set_timesteps()
    text = encode_sd3_prompts(models, [PROMPT] * 2)
    log_prob, velocity = flow.transition(pair.latents, pair.timesteps, 1, text)
    ref_log_prob, ref_velocity = flow.reference_transition(pair.latents, pair.timesteps, 1, text)
    torch.testing.assert_close(log_prob, ref_log_prob, atol=0, rtol=0)  # LoRA B = 0: the policy is the reference
    log_ratio = log_prob - ref_log_prob
    loss, _ = dpo_loss(log_ratio[:1], log_ratio[1:], velocity[:1], ref_velocity[:1], 1.0, 0.0, 0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.sum().backward()
    lora_b = [p for name, p in models.transformer.named_parameters() if "lora_B" in name]
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in lora_b)
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= 10.0 * p.grad
    moved, _ = flow.transition(pair.latents, pair.timesteps, 1, text)
    assert (moved - ref_log_prob).abs().max() > 0


def test_step_mean_and_std_are_the_flow_steps_gaussian(tiny_sd3):
    """DPOK's KL reads the step's mean and std: the stored x' lies at mean + std * noise, its log-prob theirs."""
    trajectories = sample(tiny_sd3, [0])
    flow = policy(tiny_sd3)
    flow.set_timesteps()
    text = encode_sd3_prompts(tiny_sd3, [PROMPT])
    log_prob, velocity = flow.transition(trajectories.latents, trajectories.timesteps, 1, text)
    mean, std = flow.step_mean(velocity, trajectories.latents, trajectories.timesteps, 1)
    z = (trajectories.latents[:, 2] - mean) / std
    expected = (-z**2 / 2 - torch.log(std) - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=0)
    assert std.shape == (1, 1, 1, 1) and 0.3 < z.std() < 3  # the step's noise, at its scale
