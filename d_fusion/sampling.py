"""Sampling with recorded trajectories (docs/METHOD.md §1, steps 1-2, and §3).

Every sample owns a CPU `torch.Generator` seeded `seed + epoch * N + j`; it draws the initial
latent and every step's noise, so sample j regenerates exactly, alone or in any batch.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from d_fusion.ddim import ddim_step_with_logprob, step_noise
from d_fusion.families import Conditioning


@dataclass(frozen=True)
class SamplerSettings:
    """How a trajectory is denoised: the same for sampling, fusion, training's log-probs and held-out."""

    num_steps: int  # DDIM steps T
    eta: float  # DDIM's eta: 0 is deterministic (no log-probability), 1 is DDPM-like
    guidance_scale: float  # classifier-free guidance weight w
    cfg: bool = True  # False: the conditional prediction alone


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


def guided_noise(unet, latents, timestep, conditioning, negative, guidance_scale, cfg=True, attention_kwargs=None):
    """The UNet's noise prediction with classifier-free guidance.

    latents: (B, C, H, W); conditioning, negative: B-row Conditionings; timestep: a number, or (B,) one
    per row. With CFG the batch is [uncond; cond], as diffusers does.
    """
    if cfg:
        model_input = torch.cat([latents, latents])
        conditioning = Conditioning.cat([negative, conditioning])
        if torch.is_tensor(timestep) and timestep.ndim:
            timestep = torch.cat([timestep, timestep])
    else:
        model_input = latents
    input_dtype = unet.conv_in.weight.dtype  # not unet.dtype, which walks every parameter on each call
    output = unet(
        model_input.to(input_dtype),
        timestep,
        cross_attention_kwargs=attention_kwargs,
        **conditioning.unet_kwargs(input_dtype),
    ).sample.float()
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


class Denoising:
    """A batch on its way from x_T: its latents so far, log-probs, generators and text conditioning."""

    def __init__(self, unet, generators, conditioning, negative):
        latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.generators, self.conditioning = generators, conditioning  # B rows
        self.negative = negative.expand(len(generators)) if len(negative) == 1 else negative
        self.latents = [initial_latents(generators, latent_shape, unet.device)]  # x_T: (B, C, H, W)
        self.log_probs = []

    def step(self, unet, scheduler, timestep, sampler, attention_kwargs=None):
        """One DDIM step (SamplerSettings `sampler`); `attention_kwargs` reach the attention processors
        (fusion's state)."""
        latents = self.latents[-1]
        noise = guided_noise(
            unet,
            latents,
            timestep,
            self.conditioning,
            self.negative,
            sampler.guidance_scale,
            cfg=sampler.cfg,
            attention_kwargs=attention_kwargs,
        )
        self.advance(scheduler, noise, timestep, sampler)

    def advance(self, scheduler, noise, timestep, sampler):
        """The DDIM step from the batch's latest latents with the noise prediction `noise` (B, C, H, W)."""
        latents, log_prob, _ = ddim_step_with_logprob(
            scheduler, noise, timestep, self.latents[-1], sampler.eta, self.generators
        )
        self.latents.append(latents)
        self.log_probs.append(log_prob)

    def trajectories(self, timesteps):
        return Trajectories(torch.stack(self.latents, dim=1), torch.stack(self.log_probs, dim=1), timesteps.cpu())


@torch.no_grad()
def sample_trajectories(models, conditioning, negative, generators, sampler, progress=True):
    """Denoise from each generator's x_T with DDIM, keeping every x_t and every step's log-prob.

    conditioning: B rows (`encode_prompts`); negative: 1 row (`negative_conditioning`); generators:
    B per-sample generators.
    """
    scheduler, unet = models.scheduler, models.unet
    scheduler.set_timesteps(sampler.num_steps, device=models.device)
    batch = Denoising(unet, generators, conditioning, negative)
    for t in tqdm(scheduler.timesteps, desc="timestep", leave=False, disable=not progress):
        batch.step(unet, scheduler, t, sampler)
    return batch.trajectories(scheduler.timesteps)


def sample_images(models, conditioning, negative, generators, sampler, progress=True):
    """(trajectories, uint8 images (B, H, W, 3)) of one batch: sample_trajectories, then the VAE."""
    trajectories = sample_trajectories(models, conditioning, negative, generators, sampler, progress)
    return trajectories, decode_images(models, trajectories.latents[:, -1])


@torch.no_grad()
def decode_images(models, latents):
    """Final latents (B, C, H, W) -> uint8 images (B, H, W, 3) as numpy."""
    vae = models.vae
    images = vae.decode(latents.to(models.dtype) / vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
