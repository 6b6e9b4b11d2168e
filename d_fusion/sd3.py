"""Stable Diffusion 3 / 3.5: loading, prompt encoding, the flow step that sampling, fusion and training
take (docs/METHOD.md §10); `families.StableDiffusion3Family` hands them to the loop.

The parts load from a diffusers folder or hub id as `StableDiffusion3Pipeline.from_pretrained`
reads them; T5 (`text_encoder_3`) is optional, as the pipeline allows, and its part of the text
sequence is zeros without it. Sampling follows `StableDiffusion3Pipeline` (same sigmas, CFG as
[uncond; cond], per-sample initial noise) with the stochastic flow step of `d_fusion.flow`; with
noise level 0 and the same initial noise its final latents are the pipeline's (`sampling.sample_trajectories`
with `FLOW`, the family's solver). Every sample owns
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
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from d_fusion.families import Conditioning, StableDiffusion3Family
from d_fusion.flow import flow_step_mean, flow_step_std, flow_step_with_logprob
from d_fusion.models import LatentModel, check_hub_reachable, check_parts, freeze, inference_dtype, loading_error, resolve_device
from d_fusion.sampling import guided, row_timesteps

log = logging.getLogger(__name__)

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass
class StableDiffusion3(LatentModel):
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
    family: type = StableDiffusion3Family


def _has_t5(model, kwargs):
    """Whether the model's model_index.json names a T5 text encoder."""
    index = StableDiffusion3Pipeline.load_config(model, **kwargs)
    return index.get("text_encoder_3", [None])[0] is not None


def load_sd3_models(model, revision="main", mixed_precision="fp16", dev_id=0, t5=True):
    """Every part of SD 3 / 3.5, frozen, on the device, in the inference dtype; T5 only when the
    model has one and `t5` is on (without it, its tokens are zeros, as the pipeline does)."""
    if os.path.isdir(model):
        check_parts(model, PARTS, "a diffusers Stable Diffusion 3 folder")
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
        raise loading_error("Stable Diffusion 3", model, error) from None
    (tokenizer, text_encoder), (tokenizer_2, text_encoder_2) = texts
    freeze((text_encoder, text_encoder_2, t5_parts[0], vae, transformer), device)
    models = StableDiffusion3(
        transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, *t5_parts, scheduler, device, dtype
    )
    log.info("loaded %s on %s in %s (%d px, T5 %s)", model, device, dtype, models.resolution,
             "on" if t5_parts[0] is not None else "left out")
    return models


# ---------------------------------------------------------------- prompts


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
    """`StableDiffusion3Pipeline.encode_prompt` of `prompts` (the same prompt for all three encoders), as a
    `Conditioning`: embeds (B, 77 + L, D), both CLIPs' tokens (zero-padded to D), then T5's L tokens;
    pooled (B, P), both CLIPs' pooled projections, concatenated.

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
    return Conditioning(torch.cat([clip, t5], dim=1), torch.cat([p1, p2], dim=-1))  # (B, 77 + L, D), (B, P)


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

    latents: (B, C, H, W); text, negative: `Conditioning`s of B rows. With CFG the batch is
    [uncond; cond], as the pipeline does.
    """
    if cfg:
        latents, text = torch.cat([latents, latents]), Conditioning.cat([negative, text])  # (2B, ...)
    input_dtype = transformer.pos_embed.proj.weight.dtype
    output = transformer(
        hidden_states=latents.to(input_dtype),
        timestep=row_timesteps(timestep, latents.shape[0], latents.device),
        encoder_hidden_states=text.embeds,
        pooled_projections=text.pooled,
        joint_attention_kwargs=attention_kwargs,
    ).sample.float()
    return guided(output, guidance_scale, cfg)


class FLOW:
    """SD 3's step: `sampling.DDIM`'s methods for the stochastic flow step (`sample.noise_level`)."""

    prediction = staticmethod(guided_velocity)  # the velocity takes the noise prediction's place
    level = "noise_level"

    @staticmethod
    def set_timesteps(models, num_steps):
        return set_flow_timesteps(models.scheduler, models.transformer, num_steps, models.device)

    @staticmethod
    def step(scheduler, prediction, timestep, latents, sampler, generators=None, prev_sample=None):
        """(x', log_prob (B,), mean) of the step from x = `latents`, with SamplerSettings `sampler`."""
        return flow_step_with_logprob(scheduler, prediction, timestep, latents, sampler.noise_level, generators, prev_sample)

    @staticmethod
    def step_mean(scheduler, prediction, timestep, latents, sampler):
        """The step's mean (B, C, H, W) and std (B, 1, 1, 1)."""
        return flow_step_mean(scheduler, prediction, timestep, latents, sampler.noise_level)

    @staticmethod
    def step_std(scheduler, timestep, sampler):
        return flow_step_std(scheduler, timestep, sampler.noise_level)
