"""The DDIM step with log-probability against diffusers' DDIMScheduler.step and an independent Normal."""

import pytest
import torch
from diffusers import DDIMScheduler

from d_fusion.ddim import ddim_step_with_logprob
from d_fusion.tiny import SD_SCHEDULER


def make_scheduler(prediction_type, num_steps=20, **extra):
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type, **extra})
    scheduler.set_timesteps(num_steps)
    return scheduler


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def diffusers_step(scheduler, model_output, t, sample, eta, seeds):
    """diffusers' step, fed the same per-sample noise our generators draw."""
    noise = torch.stack([torch.randn(sample.shape[1:], generator=g) for g in generators(seeds)])
    return scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("step_index", [0, 7, 19])  # 19: the last step uses the final alpha
def test_prev_sample_equals_diffusers(prediction_type, step_index):
    scheduler = make_scheduler(prediction_type)
    t = scheduler.timesteps[step_index]
    torch.manual_seed(0)
    sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    seeds = [11, 12, 13]
    ours, _, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, generators(seeds))
    theirs = diffusers_step(scheduler, model_output, t, sample, 1.0, seeds)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_clipped_and_thresholded_x0_follow_the_scheduler_config():
    torch.manual_seed(1)
    sample, model_output = 3 * torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8)
    for extra in ({"clip_sample": True}, {"thresholding": True, "sample_max_value": 1.5}):
        scheduler = make_scheduler("epsilon", **extra)
        t = scheduler.timesteps[3]
        ours, _, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, 1.0, generators([1, 2]))
        torch.testing.assert_close(ours, diffusers_step(scheduler, model_output, t, sample, 1.0, [1, 2]), atol=1e-5, rtol=0)


def assert_per_sample_timesteps_equal_one_step_per_sample(step, scheduler, level, step_indices=(0, 10, 19)):
    """`step(scheduler, model_output, timestep(s), sample, level, generators)` of a batch at one timestep
    per sample equals each sample's step alone (ours for DDIM and for flow matching)."""
    torch.manual_seed(2)
    sample, model_output = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    steps = scheduler.timesteps[list(step_indices)]
    batched, batched_logp, _ = step(scheduler, model_output, steps, sample, level, generators([1, 2, 3]))
    for row, (t, seed) in enumerate(zip(steps, [1, 2, 3])):
        alone, alone_logp, _ = step(scheduler, model_output[row : row + 1], t, sample[row : row + 1], level, generators([seed]))
        torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched_logp[row : row + 1], alone_logp, atol=1e-6, rtol=0)


def test_per_sample_timesteps_equal_one_step_per_sample():
    assert_per_sample_timesteps_equal_one_step_per_sample(ddim_step_with_logprob, make_scheduler("epsilon"), 1.0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_equals_normal_log_prob_of_given_prev_sample(eta):
    scheduler = make_scheduler("epsilon")
    t = scheduler.timesteps[5]
    torch.manual_seed(3)
    sample, model_output, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    # mean: diffusers' step without noise; std: eta * sqrt(variance) of the scheduler
    mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros_like(sample)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = eta * scheduler._get_variance(t, prev_t).sqrt()
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))

    given, log_prob, _ = ddim_step_with_logprob(scheduler, model_output, t, sample, eta, prev_sample=prev)
    assert torch.equal(given, prev)
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=1e-5)


def test_log_prob_is_differentiable_in_the_model_output():
    scheduler = make_scheduler("epsilon")
    torch.manual_seed(4)
    sample, prev = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    model_output = torch.randn(1, 4, 8, 8, requires_grad=True)
    _, log_prob, _ = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[2], sample, 1.0, prev_sample=prev)
    log_prob.sum().backward()
    assert model_output.grad is not None and model_output.grad.abs().sum() > 0
