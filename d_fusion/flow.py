"""One stochastic flow-matching step that also returns the log-probability of the transition
(docs/METHOD.md §10: the SDE form of the Euler step that Flow-GRPO uses for SD 3.5).

Notation. `FlowMatchEulerDiscreteScheduler`'s sigmas run from 1 (noise) to 0 (data), with
x_sigma = (1 - sigma) x0 + sigma * noise and the transformer's velocity v ~ noise - x0.

    sigma, sigma'   the sigma of this step and of the next one; dt = sigma' - sigma < 0
    v               the transformer's velocity at x (with CFG)
    a               the noise level (`sample.noise_level`); a = 0 is the scheduler's Euler step
    sigma_max       the scheduler's sigmas[1], standing in for sigma = 1 where (1 - sigma) divides

1. std  = a * sqrt(sigma / (1 - sigma))                       (sigma = 1 -> sigma_max below)
2. mean = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt
3. x'   = mean + std * sqrt(-dt) * noise                      (noise from the sample's generator)
4. log_prob = mean over latent dims of log N(x'; mean, (std * sqrt(-dt))^2)

The step is computed in fp32 whatever the transformer's dtype. A step is known by its timestep
(one of `scheduler.timesteps`, as the trajectories store it), so stored transitions can be scored
again with per-sample timesteps.
"""

import math

import torch

from d_fusion.ddim import step_noise


def step_sigmas(scheduler, timestep):
    """(sigma, sigma') of the step at `timestep` (B,): this step's sigma and the next one's."""
    timesteps = scheduler.timesteps.to(timestep.device)
    found = timestep[:, None] == timesteps[None, :]  # (B, T)
    if not found.any(dim=1).all():
        raise ValueError(f"timesteps {timestep.tolist()} are not all among the scheduler's {timesteps.tolist()}")
    index = found.float().argmax(dim=1)
    sigmas = scheduler.sigmas.to(timestep.device)
    return sigmas[index], sigmas[index + 1]


def _std(scheduler, sigma, noise_level):
    """Step 1: a * sqrt(sigma / (1 - sigma)), with sigma_max for sigma = 1 in the denominator."""
    sigma_max = scheduler.sigmas[1].item()
    return noise_level * (sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))).sqrt()


def flow_step_std(scheduler, timestep, noise_level):
    """The standard deviation std * sqrt(-dt) of x' at the step from `timestep` (a float); 0 for
    noise level 0, where the step has no log-probability (docs/METHOD.md §8)."""
    sigma, sigma_prev = step_sigmas(scheduler, torch.as_tensor(timestep, dtype=torch.float32).view(1))
    return (_std(scheduler, sigma, noise_level) * (sigma - sigma_prev).sqrt()).item()


def flow_step_mean(scheduler, velocity, timestep, sample, noise_level):
    """The Gaussian of x -> x': (mean (B, C, H, W), std * sqrt(-dt) (B, 1, 1, 1)), in fp32 (steps 1-2).

    velocity, sample: (B, C, H, W). timestep: a float or (B,), among `scheduler.timesteps`.
    """
    batch = sample.shape[0]
    sample, velocity = sample.float(), velocity.float()
    timestep = torch.as_tensor(timestep, device=sample.device).float().expand(batch)
    shape = (batch,) + (1,) * (sample.ndim - 1)
    sigma, sigma_prev = (s.view(shape) for s in step_sigmas(scheduler, timestep))
    dt = sigma_prev - sigma

    std = _std(scheduler, sigma, noise_level)  # 1.
    mean = sample * (1 + std**2 / (2 * sigma) * dt) + velocity * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt  # 2.
    return mean, std * (-dt).sqrt()


def flow_step_with_logprob(scheduler, velocity, timestep, sample, noise_level, generators=None, prev_sample=None):
    """x -> x': returns (prev_sample, log_prob (B,), mean).

    velocity, sample: (B, C, H, W). timestep: a float or (B,), among `scheduler.timesteps`. Noise
    comes from `generators` (one per sample) unless `prev_sample`, a given x' to be scored, is passed.
    """
    mean, step_std = flow_step_mean(scheduler, velocity, timestep, sample, noise_level)
    if prev_sample is None:  # 3.
        if noise_level > 0:
            prev_sample = mean + step_std * step_noise(generators, sample.shape[1:], sample.device)
        else:
            prev_sample = mean
    prev_sample = prev_sample.float()
    log_prob = (  # 4.
        -((prev_sample.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim))), mean
