"""Sampling with recorded trajectories (docs/METHOD.md §1, steps 1-2, and §3).

Every sample owns a CPU `torch.Generator` seeded `seed + epoch * N + j`; it draws the initial
latent and every step's noise, so sample j regenerates exactly, alone or in any batch.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from d_fusion.ddim import ddim_step_mean, ddim_step_with_logprob, step_noise, step_std
from d_fusion.families import Conditioning


@dataclass(frozen=True)
class SamplerSettings:
    """How a trajectory is denoised: the same for sampling, fusion, training's log-probs and held-out."""

    num_steps: int  # denoising steps T
    eta: float  # DDIM's eta: 0 is deterministic (no log-probability), 1 is DDPM-like
    guidance_scale: float  # classifier-free guidance weight w
    cfg: bool = True  # False: the conditional prediction alone
    noise_level: float = 0.7  # SD 3's flow step (d_fusion/flow.py): 0 is the Euler step, without log-probability


def sample_seed(seed, epoch, num_samples, index):
    return seed + epoch * num_samples + index


def sample_generators(seed, epoch, num_samples, indices):
    """One fresh generator per sample index in `indices`."""
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, epoch, num_samples, j)) for j in indices]


def encode_prompts(models, prompts):
    """The family's text conditioning of `prompts` (a Conditioning of len(prompts) rows), padded to the
    tokenizer's 77 tokens."""
    return models.family.encode(models, prompts)


def negative_conditioning(models):
    """The one-row unconditional conditioning of CFG (the empty prompt's, or the family's zeros)."""
    return models.family.negative(models)


def row_timesteps(timestep, rows, device):
    """The timestep of each of a model call's `rows` rows: one timestep for all, or (B,) one per sample,
    repeated over the CFG halves [uncond; cond]."""
    timestep = torch.as_tensor(timestep, device=device)
    return timestep.expand(rows) if timestep.ndim == 0 else timestep.repeat(rows // len(timestep))


def guided_noise(unet, latents, timestep, conditioning, negative, guidance_scale, cfg=True, attention_kwargs=None):
    """The UNet's noise prediction with classifier-free guidance.

    latents: (B, C, H, W); conditioning, negative: B-row Conditionings; timestep: a number, or (B,) one
    per row. With CFG the batch is [uncond; cond], as diffusers does.
    """
    if cfg:
        model_input = torch.cat([latents, latents])
        conditioning = Conditioning.cat([negative, conditioning])
    else:
        model_input = latents
    input_dtype = unet.conv_in.weight.dtype  # not unet.dtype, which walks every parameter on each call
    output = unet(
        model_input.to(input_dtype),
        row_timesteps(timestep, model_input.shape[0], model_input.device),
        cross_attention_kwargs=attention_kwargs,
        **conditioning.unet_kwargs(input_dtype),
    ).sample.float()
    return guided(output, guidance_scale, cfg)


def guided(output, guidance_scale, cfg):
    """The guided prediction (B, ...) of a model's output: with CFG, its [uncond; cond] halves combined."""
    if not cfg:
        return output
    uncond, cond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class Trajectories:
    """Denoising trajectories of a batch: latents[:, i] = x_t and latents[:, i + 1] = x_{t'} at step i."""

    latents: torch.Tensor  # (B, T + 1, C, H, W), fp32
    log_probs: torch.Tensor  # (B, T), fp32
    timesteps: torch.Tensor  # (T,), int64

    def __getitem__(self, rows):
        return Trajectories(self.latents[rows], self.log_probs[rows], self.timesteps)

    @staticmethod
    def cat(parts):
        return Trajectories(
            torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]), parts[0].timesteps
        )


def initial_latents(generators, latent_shape, device):
    """x_T for each sample, drawn from its own generator: (B, C, H, W)."""
    return step_noise(generators, latent_shape, device)


class DDIM:
    """The UNet families' step (docs/METHOD.md §3), as `Denoising` and `trainer.Policy` call it; SD 3's
    is `sd3.FLOW`, with the same methods."""

    prediction = staticmethod(guided_noise)  # (model, latents, timestep, conditioning, negative, w, cfg, kwargs)
    level = "eta"  # the sample.* setting that makes the steps stochastic (0: no log-probability)

    @staticmethod
    def set_timesteps(models, num_steps):
        models.scheduler.set_timesteps(num_steps, device=models.device)
        return models.scheduler.timesteps

    @staticmethod
    def step(scheduler, prediction, timestep, latents, sampler, generators=None, prev_sample=None):
        """(x', log_prob (B,), _) of the step from x = `latents`, with SamplerSettings `sampler`."""
        return ddim_step_with_logprob(scheduler, prediction, timestep, latents, sampler.eta, generators, prev_sample)

    @staticmethod
    def step_mean(scheduler, prediction, timestep, latents, sampler):
        """The step's mean (B, C, H, W) and std (B, 1, 1, 1)."""
        mean, std, _ = ddim_step_mean(scheduler, prediction, timestep, latents, sampler.eta)
        return mean, std

    @staticmethod
    def step_std(scheduler, timestep, sampler):
        return step_std(scheduler, timestep, sampler.eta)


class Denoising:
    """A batch on its way from x_T: its latents so far, log-probs, generators and text conditioning.
    `solver`: the family's step (`DDIM`, or SD 3's `sd3.FLOW`); `model`: its UNet or transformer."""

    def __init__(self, model, generators, conditioning, negative, solver=DDIM):
        latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
        self.generators, self.conditioning, self.solver = generators, conditioning, solver  # B rows
        self.negative = negative.expand(len(generators)) if len(negative) == 1 else negative
        self.latents = [initial_latents(generators, latent_shape, model.device)]  # x_T: (B, C, H, W)
        self.log_probs = []

    def step(self, model, scheduler, timestep, sampler, attention_kwargs=None):
        """One step (SamplerSettings `sampler`); `attention_kwargs` reach the attention processors
        (fusion's state)."""
        latents = self.latents[-1]
        prediction = self.solver.prediction(
            model,
            latents,
            timestep,
            self.conditioning,
            self.negative,
            sampler.guidance_scale,
            cfg=sampler.cfg,
            attention_kwargs=attention_kwargs,
        )
        self.advance(scheduler, prediction, timestep, sampler)

    def advance(self, scheduler, prediction, timestep, sampler):
        """The step from the batch's latest latents, given the model's prediction (B, C, H, W)."""
        latents, log_prob, _ = self.solver.step(
            scheduler, prediction, timestep, self.latents[-1], sampler, self.generators
        )
        self.latents.append(latents)
        self.log_probs.append(log_prob)

    def trajectories(self, timesteps):
        return Trajectories(torch.stack(self.latents, dim=1), torch.stack(self.log_probs, dim=1), timesteps.cpu())


@torch.no_grad()
def sample_trajectories(models, conditioning, negative, generators, sampler, progress=True):
    """Denoise from each generator's x_T with the family's step (DDIM, SD 3's flow step), keeping every
    x_t and every step's log-prob.

    conditioning: B rows (`encode_prompts`); negative: 1 row (`negative_conditioning`); generators:
    B per-sample generators.
    """
    solver, model = models.family.solver(), models.denoiser
    timesteps = solver.set_timesteps(models, sampler.num_steps)
    batch = Denoising(model, generators, conditioning, negative, solver)
    for t in tqdm(timesteps, desc="timestep", leave=False, disable=not progress):
        batch.step(model, models.scheduler, t, sampler)
    return batch.trajectories(timesteps)


def sample_images(models, conditioning, negative, generators, sampler, progress=True):
    """(trajectories, uint8 images (B, H, W, 3)) of one batch: sample_trajectories, then the VAE."""
    trajectories = sample_trajectories(models, conditioning, negative, generators, sampler, progress)
    return trajectories, decode_images(models, trajectories.latents[:, -1])


@torch.no_grad()
def decode_images(models, latents):
    """Final latents (B, C, H, W) -> uint8 images (B, H, W, 3) as numpy: the VAE reads latents / scaling
    (+ shift: SD 3's VAE has a shift factor)."""
    vae = models.vae
    shift = vae.config.get("shift_factor") or 0.0
    images = vae.decode(latents.to(models.dtype) / vae.config.scaling_factor + shift).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
