"""One DDIM step that also returns the log-probability of the transition (docs/METHOD.md §3).

With the same noise, x_{t'} equals `DDIMScheduler.step`. The step is computed in fp32 whatever
the model's dtype, so that log-probabilities of fp16 sampling stay accurate.
"""

import math

import torch


def previous_timestep(scheduler, timestep):
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _alpha_cumprod(scheduler, timestep):
    """alphas_cumprod at `timestep` (B,), or the scheduler's final alpha where the timestep is < 0."""
    alphas = scheduler.alphas_cumprod.to(timestep.device)
    final = scheduler.final_alpha_cumprod.to(timestep.device)
    return torch.where(timestep >= 0, alphas[timestep.clamp(min=0)], final)


def _x0_and_eps(scheduler, model_output, sample, alpha):
    """Predicted x0 and noise from the model output, by the scheduler's `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - (1 - alpha).sqrt() * model_output) / alpha.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
    elif kind == "v_prediction":
        x0 = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        eps = alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0, eps


def _std(alpha, alpha_prev, eta):
    """The step's standard deviation: eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))."""
    return eta * ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()


def step_std(scheduler, timestep, eta):
    """The standard deviation of the step from `timestep` (a float). It is 0 for a step onto a final
    alpha of 1 (`set_alpha_to_one`): that step has no log-probability (docs/METHOD.md §3.3)."""
    timestep = torch.as_tensor(timestep).long().view(1)
    alpha, alpha_prev = (_alpha_cumprod(scheduler, t) for t in (timestep, previous_timestep(scheduler, timestep)))
    return _std(alpha, alpha_prev, eta).item()


def step_noise(generators, shape, device):
    """One standard-normal draw per sample, each from its own generator: (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators]).to(device)


def ddim_step_mean(scheduler, model_output, timestep, sample, eta):
    """The Gaussian of x_t -> x_{t'}: (mean (B, C, H, W), std (B, 1, 1, 1), pred_x0), in fp32.

    model_output, sample: (B, C, H, W). timestep: int or (B,).
    """
    batch = sample.shape[0]
    sample, model_output = sample.float(), model_output.float()
    timestep = torch.as_tensor(timestep, device=sample.device).long().expand(batch)
    shape = (batch,) + (1,) * (sample.ndim - 1)
    alpha = _alpha_cumprod(scheduler, timestep).float().view(shape)
    alpha_prev = _alpha_cumprod(scheduler, previous_timestep(scheduler, timestep)).float().view(shape)

    x0, eps = _x0_and_eps(scheduler, model_output, sample, alpha)
    std = _std(alpha, alpha_prev, eta)
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps
    return mean, std, x0


def ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta, generators=None, prev_sample=None):
    """x_t -> x_{t'}: returns (prev_sample, log_prob (B,), pred_x0).

    model_output, sample: (B, C, H, W). timestep: int or (B,). Noise comes from `generators`
    (one per sample) unless `prev_sample`, a given x_{t'} to be scored, is passed.
    """
    mean, std, x0 = ddim_step_mean(scheduler, model_output, timestep, sample, eta)
    sample = sample.float()
    if prev_sample is None:
        if eta > 0:
            prev_sample = mean + std * step_noise(generators, sample.shape[1:], sample.device)
        else:
            prev_sample = mean
    prev_sample = prev_sample.float()
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, sample.ndim))), x0
