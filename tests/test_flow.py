"""The stochastic flow step against FlowMatchEulerDiscreteScheduler.step and an independent Normal."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from d_fusion.flow import flow_step_std, flow_step_with_logprob
from d_fusion.tiny import SD3_SCHEDULER
from tests.test_ddim import assert_per_sample_timesteps_equal_one_step_per_sample


def make_scheduler(num_steps=10):
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(num_steps)
    return scheduler


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def tensors(seed, count=3, shape=(3, 16, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


@pytest.mark.parametrize("step_index", [0, 4, 9])  # 0: sigma = 1; 9: onto sigma = 0
def test_noise_level_zero_is_the_euler_step(step_index):
    scheduler = make_scheduler()
    t = scheduler.timesteps[step_index]
    sample, velocity, _ = tensors(0)
    ours, _, _ = flow_step_with_logprob(scheduler, velocity, t, sample, 0.0)
    scheduler._step_index = step_index
    theirs = scheduler.step(velocity, t, sample).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def independent_mean_and_std(scheduler, step_index, sample, velocity, a):
    """docs/METHOD.md §10 by another road: x' = x + dt * [v + std^2 / (2 sigma) * (x + (1 - sigma) v)]."""
    sigmas = scheduler.sigmas.tolist()
    sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
    std = a * (sigma / (1 - (sigmas[1] if sigma == 1.0 else sigma))) ** 0.5
    dt = sigma_next - sigma
    mean = sample + dt * (velocity + std**2 / (2 * sigma) * (sample + (1 - sigma) * velocity))
    return mean, std * (-dt) ** 0.5


@pytest.mark.parametrize("step_index", [0, 5, 9])
@pytest.mark.parametrize("a", [0.7, 0.3])
def test_log_prob_is_the_gaussian_log_density_of_a_given_sample(step_index, a):
    scheduler = make_scheduler()
    sample, velocity, prev = tensors(1)
    mean, std = independent_mean_and_std(scheduler, step_index, sample, velocity, a)
    expected = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    t = scheduler.timesteps[step_index]
    given, log_prob, our_mean = flow_step_with_logprob(scheduler, velocity, t, sample, a, prev_sample=prev)
    assert torch.equal(given, prev)
    torch.testing.assert_close(our_mean, mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-5)
    assert flow_step_std(scheduler, t, a) == pytest.approx(std, rel=1e-6)


def test_sampled_step_is_mean_plus_std_times_each_generators_noise():
    scheduler = make_scheduler()
    sample, velocity, _ = tensors(2)
    t = scheduler.timesteps[3]
    ours, _, _ = flow_step_with_logprob(scheduler, velocity, t, sample, 0.7, generators([5, 6, 7]))
    mean, std = independent_mean_and_std(scheduler, 3, sample, velocity, 0.7)
    noise = torch.stack([torch.randn(sample.shape[1:], generator=g) for g in generators([5, 6, 7])])
    torch.testing.assert_close(ours, mean + std * noise, rtol=0, atol=1e-5)


def test_per_sample_timesteps_equal_one_step_per_sample():
    assert_per_sample_timesteps_equal_one_step_per_sample(flow_step_with_logprob, make_scheduler(), 0.7, (0, 4, 9))


def test_a_timestep_outside_the_schedule_is_an_error():
    scheduler = make_scheduler()
    sample, velocity, _ = tensors(4)
    with pytest.raises(ValueError, match="not all among"):
        flow_step_with_logprob(scheduler, velocity, 123.0, sample, 0.7, generators([1, 2, 3]))
