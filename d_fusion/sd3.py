"""Stable Diffusion 3 / 3.5: loading, prompt encoding, flow sampling with recorded trajectories
(docs/METHOD.md §10).

The parts load from a diffusers folder or hub id as `StableDiffusion3Pipeline.from_pretrained`
reads them; T5 (`text_encoder_3`) is optional, as the pipeline allows, and its part of the text
sequence is zeros without it. Sampling follows `StableDiffusion3Pipeline` (same sigmas, CFG as
[uncond; cond], per-sample initial noise) with the stochastic flow step of `d_fusion.flow`; with
noise level 0 and the same initial noise its final latents are the pipeline's. Every sample owns
its generator (`sampling.sample_generators`): it draws x_1 and every step's noise, so a sample
regenerates exactly, alone or in any batch.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from tqdm.auto import tqdm
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from d_fusion.errors import UserError
from d_fusion.flow import flow_step_with_logprob
from d_fusion.models import check_hub_reachable, inference_dtype, resolve_device
from d_fusion.sampling import Trajectories, decode_images, initial_latents

log = logging.getLogger(__name__)

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass
class StableDiffusion3:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer  # its token positions are the objects' positions (docs/METHOD.md §10)
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_2: CLIPTokenizer
    text_encoder_3: T5EncoderModel | None  # None: T5 left out, its tokens are zeros
    tokenizer_3: T5TokenizerFast | None
    scheduler: FlowMatchEulerDiscreteScheduler
    device: torch.device
    dtype: torch.dtype  # inference dtype of the frozen parts
    max_sequence_length: int = 256  # T5 tokens after the 77 CLIP tokens, as the pipeline's default

    @property
    def latent_shape(self):
        """(C, H, W) of one latent."""
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self):
        return self.transformer.config.sample_size * self.vae_scale_factor

    def pipeline(self):
        """diffusers' StableDiffusion3Pipeline on these very parts (with its own scheduler)."""
        pipeline = StableDiffusion3Pipeline(
            transformer=self.transformer,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            text_encoder_3=self.text_encoder_3,
            tokenizer_3=self.tokenizer_3,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline


def _has_t5(model, kwargs):
    """Whether the model's model_index.json names a T5 text encoder."""
    index = StableDiffusion3Pipeline.load_config(model, **kwargs)
    return index.get("text_encoder_3", [None])[0] is not None


def load_sd3_models(model, revision="main", mixed_precision="fp16", dev_id=0, t5=True):
    """Every part of SD 3 / 3.5, frozen, on the device, in the inference dtype; T5 only when the
    model has one and `t5` is on (without it, its tokens are zeros, as the pipeline does)."""
    if os.path.isdir(model):
        missing = [p for p in PARTS if not os.path.isdir(os.path.join(model, p))]
        if missing:
            raise UserError(
                f"config.pretrained.model = {model!r} lacks {', '.join(p + '/' for p in missing)}: "
                "pass a diffusers Stable Diffusion 3 folder"
            )
    else:
        check_hub_reachable(model, revision)
    device = resolve_device(dev_id)
    dtype = inference_dtype(mixed_precision, device)
    kwargs = {} if os.path.isdir(model) else {"revision": revision}
    try:
        texts = [
            (CLIPTokenizer.from_pretrained(model, subfolder=f"tokenizer{s}", **kwargs),
             CLIPTextModelWithProjection.from_pretrained(model, subfolder=f"text_encoder{s}", dtype=dtype, **kwargs))
            for s in ("", "_2")
        ]
        t5_parts = (None, None)
        if t5 and _has_t5(model, kwargs):
            t5_parts = (
                T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3", dtype=dtype, **kwargs),
                T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_3", **kwargs),
            )
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype, **kwargs)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **kwargs)
    except OSError as error:
        raise UserError(
            f"could not load Stable Diffusion 3 from config.pretrained.model = {model!r} ({error}). "
            "Pass a local diffusers folder, or a hub id on a machine that can download it"
        ) from None
    (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = texts
    for part in (text_encoder, text_encoder_2, t5_parts[0], vae, transformer):
        if part is not None:
            part.requires_grad_(False)
            part.eval()
            part.to(device)
    models = StableDiffusion3(
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, *t5_parts, scheduler, device, dtype
    )
    log.info("loaded %s on %s in %s (%d px, T5 %s)", model, device, dtype, models.resolution,
             "on" if t5_parts[0] is not None else "left out")
    return models


# ---------------------------------------------------------------- prompts


@dataclass
class TextConditioning:
    """What the transformer reads of a batch of prompts."""

    embeds: torch.Tensor  # (B, 77 + L, D): both CLIPs' tokens (zero-padded to D), then T5's L tokens
    pooled: torch.Tensor  # (B, P): both CLIPs' pooled projections, concatenated

    def __getitem__(self, rows):
        return TextConditioning(self.embeds[rows], self.pooled[rows])

    def expand(self, batch):
        return TextConditioning(self.embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @staticmethod
    def cat(parts):
        return TextConditioning(torch.cat([p.embeds for p in parts]), torch.cat([p.pooled for p in parts]))


def _clip_embeddings(tokenizer, text_encoder, prompts, device):
    """The penultimate hidden states (B, 77, d) and the pooled projection (B, p) of one CLIP."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    output = text_encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], output.text_embeds


def _t5_embeddings(models, prompts):
    """T5's tokens (B, L, D), or zeros when T5 is left out."""
    width = models.transformer.config.joint_attention_dim
    if models.text_encoder_3 is None:
        return torch.zeros(len(prompts), models.max_sequence_length, width, device=models.device, dtype=models.dtype)
    ids = models.tokenizer_3(
        list(prompts), padding="max_length", max_length=models.max_sequence_length, truncation=True,
        add_special_tokens=True, return_tensors="pt",
    ).input_ids.to(models.device)
    return models.text_encoder_3(ids)[0]


@torch.no_grad()
def encode_sd3_prompts(models, prompts):
    """`StableDiffusion3Pipeline.encode_prompt` of `prompts` (the same prompt for all three encoders).

    The negative (unconditional) conditioning of CFG is `encode_sd3_prompts(models, [""])`, the
    pipeline's default negative prompt.
    """
    (h1, p1), (h2, p2) = (
        _clip_embeddings(tokenizer, encoder, prompts, models.device)
        for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2))
    )
    t5 = _t5_embeddings(models, prompts)
    clip = torch.cat([h1, h2], dim=-1)  # (B, 77, d1 + d2)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D)
    return TextConditioning(torch.cat([clip, t5], dim=1), torch.cat([p1, p2], dim=-1))  # (B, 77 + L, D), (B, P)


# ---------------------------------------------------------------- sampling


def set_flow_timesteps(scheduler, transformer, num_steps, device):
    """The pipeline's schedule: with dynamic shifting, mu from the number of image tokens."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        side = transformer.config.sample_size // transformer.config.patch_size
        config = scheduler.config
        kwargs["mu"] = calculate_shift(
            side * side, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_steps, device=device, **kwargs)
    return scheduler.timesteps


def guided_velocity(transformer, latents, timestep, text, negative, guidance_scale, cfg=True, attention_kwargs=None):
    """The transformer's velocity with classifier-free guidance.

    latents: (B, C, H, W); text, negative: `TextConditioning` of B rows. With CFG the batch is
    [uncond; cond], as the pipeline does.
    """
    if cfg:
        latents, text = torch.cat([latents, latents]), TextConditioning.cat([negative, text])  # (2B, ...)
    input_dtype = transformer.pos_embed.proj.weight.dtype
    output = transformer(
        hidden_states=latents.to(input_dtype),
        timestep=torch.as_tensor(timestep, device=latents.device).expand(latents.shape[0]),
        encoder_hidden_states=text.embeds,
        pooled_projections=text.pooled,
        joint_attention_kwargs=attention_kwargs,
    ).sample.float()
    if not cfg:
        return output
    uncond, cond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class FlowDenoising:
    """A batch on its way from x_1 (pure noise): its latents so far, log-probs, generators, prompts."""

    def __init__(self, models, generators, text, negative):
        self.generators, self.text = generators, text
        self.negative = negative.expand(len(generators))
        self.latents = [initial_latents(generators, models.latent_shape, models.device)]  # x_1: (B, C, H, W)
        self.log_probs = []

    def step(self, transformer, scheduler, timestep, noise_level, guidance_scale, cfg=True, attention_kwargs=None):
        """One flow step; `attention_kwargs` reach the attention processors (fusion's state)."""
        latents = self.latents[-1]
        velocity = guided_velocity(
            transformer, latents, timestep, self.text, self.negative, guidance_scale, cfg, attention_kwargs
        )
        latents, log_prob, _ = flow_step_with_logprob(scheduler, velocity, timestep, latents, noise_level, self.generators)
        self.latents.append(latents)
        self.log_probs.append(log_prob)

    def trajectories(self, timesteps):
        return Trajectories(torch.stack(self.latents, dim=1), torch.stack(self.log_probs, dim=1), timesteps.cpu())


@torch.no_grad()
def sample_flow_trajectories(
    models, text, negative, generators, num_steps, noise_level, guidance_scale, cfg=True, progress=True
):
    """Denoise from each generator's x_1 with the stochastic flow step, keeping every latent and log-prob.

    text: `TextConditioning` (B rows); negative: that of the empty prompt (1 row). The trajectories'
    timesteps are the scheduler's (float32, sigma * 1000).
    """
    transformer, scheduler = models.transformer, models.scheduler
    timesteps = set_flow_timesteps(scheduler, transformer, num_steps, models.device)
    batch = FlowDenoising(models, generators, text, negative)
    for t in tqdm(timesteps, desc="timestep", leave=False, disable=not progress):
        batch.step(transformer, scheduler, t, noise_level, guidance_scale, cfg)
    return batch.trajectories(timesteps)


@torch.no_grad()
def decode_sd3_images(models, latents):
    """Final latents (B, 16, H, W) -> uint8 images (B, H, W, 3): the VAE reads latents / scaling + shift."""
    config = models.vae.config
    return decode_images(models, latents + config.shift_factor * config.scaling_factor)  # decode_images divides by scaling
