"""Sampling with recorded trajectories (docs/METHOD.md §1, steps 1-2, and §3).

Every sample owns a CPU `torch.Generator` seeded `seed + epoch * N + j`; it draws the initial
latent and every step's noise, so sample j regenerates exactly, alone or in any batch.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from d_fusion.ddim import ddim_step_with_logprob, step_noise


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


@torch.no_grad()
def encode_prompts(models, prompts):
    """Text embeddings (B, 77, D) of `prompts`, padded to the tokenizer's length."""
    ids = models.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=models.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(models.device)
    return models.text_encoder(ids)[0]


def guided_noise(unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale, cfg=True, attention_kwargs=None):
    """The UNet's noise prediction with classifier-free guidance.

    latents: (B, C, H, W); embeds: (B, 77, D). With CFG the batch is [uncond; cond], as diffusers does.
    """
    if cfg:
        model_input = torch.cat([latents, latents])
        embeds = torch.cat([negative_embeds, prompt_embeds])
    else:
        model_input, embeds = latents, prompt_embeds
    input_dtype = unet.conv_in.weight.dtype  # not unet.dtype, which walks every parameter on each call
    output = unet(
        model_input.to(input_dtype), timestep, encoder_hidden_states=embeds, cross_attention_kwargs=attention_kwargs
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
    """A batch on its way from x_T: its latents so far, log-probs, generators and embeddings."""

    def __init__(self, unet, generators, prompt_embeds, negative_embeds):
        latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        self.generators, self.prompt_embeds = generators, prompt_embeds  # (B, 77, D)
        self.negative_embeds = negative_embeds.expand(len(generators), -1, -1)
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
            self.prompt_embeds,
            self.negative_embeds,
            sampler.guidance_scale,
            cfg=sampler.cfg,
            attention_kwargs=attention_kwargs,
        )
        latents, log_prob, _ = ddim_step_with_logprob(scheduler, noise, timestep, latents, sampler.eta, self.generators)
        self.latents.append(latents)
        self.log_probs.append(log_prob)

    def trajectories(self, timesteps):
        return Trajectories(torch.stack(self.latents, dim=1), torch.stack(self.log_probs, dim=1), timesteps.cpu())


@torch.no_grad()
def sample_trajectories(models, prompt_embeds, negative_embeds, generators, sampler, progress=True):
    """Denoise from each generator's x_T with DDIM, keeping every x_t and every step's log-prob.

    prompt_embeds: (B, 77, D); negative_embeds: (1, 77, D); generators: B per-sample generators.
    """
    scheduler, unet = models.scheduler, models.unet
    scheduler.set_timesteps(sampler.num_steps, device=models.device)
    batch = Denoising(unet, generators, prompt_embeds, negative_embeds)
    for t in tqdm(scheduler.timesteps, desc="timestep", leave=False, disable=not progress):
        batch.step(unet, scheduler, t, sampler)
    return batch.trajectories(scheduler.timesteps)


def sample_images(models, prompt_embeds, negative_embeds, generators, sampler, progress=True):
    """(trajectories, uint8 images (B, H, W, 3)) of one batch: sample_trajectories, then the VAE."""
    trajectories = sample_trajectories(models, prompt_embeds, negative_embeds, generators, sampler, progress)
    return trajectories, decode_images(models, trajectories.latents[:, -1])


@torch.no_grad()
def decode_images(models, latents):
    """Final latents (B, C, H, W) -> uint8 images (B, H, W, 3) as numpy."""
    vae = models.vae
    images = vae.decode(latents.to(models.dtype) / vae.config.scaling_factor).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
