"""Fused sampling: targets made from a base's noise with a reference's self-attention (docs/METHOD.md §6.5).

Per step, a UNet pass over the distinct references (regenerated from their own generators,
unchanged) records the keys and values of the self-attention layers that fuse at this step and
the reference's cross-attention object mask; a pass over the targets (from the base's x_T, with
the base's generator) fuses them. Each reference guides two targets, so a step costs 1.5 UNet
rows per target. References do not depend on targets: with `one_call` (the default) the
references' step i + 1 runs in the same UNet call as the targets' step i (`attention.Split`), so a
step is one call and two steps' keys and values are held; without it a step is two calls (the
references', then the targets'), and only the current step's keys and values are kept. The base's
trajectory is already stored from sampling: its pass runs only when its masks are asked for
(`fusion.base_masks`).
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from d_fusion.attention import Fuse, Record, Split, fusion_processors
from d_fusion.families import Conditioning
from d_fusion.injection import Injection
from d_fusion.masks import object_masks, union_mask
from d_fusion.sampling import Denoising, SamplerSettings, Trajectories, guided_noise


@dataclass(frozen=True)
class FusionSettings:
    injection: Injection  # which steps and blocks blend the reference's K and V
    sampler: SamplerSettings  # the references', bases' and targets' denoising (the sampling's own)
    mask_resolution: int = 0  # grid of the mask layers; 0: latent side // 4
    use_mask: bool = True  # False: K' = K_ref, V' = V_ref everywhere
    base_pass: bool = False  # also regenerate the bases (for their masks)
    blocks: str = ""  # SD 3's fused blocks (fusion.blocks, d_fusion/sd3_fusion.py); "": the default
    mask_blocks: str = ""  # SD 3's mask blocks (fusion.mask_blocks); "": the default
    one_call: bool = True  # one UNet call per step: targets' step i with references' step i + 1 (and bases')


@dataclass
class FusionBatch:
    """The pairs of one fused pass: R distinct references, B targets (one per base)."""

    reference_conditioning: Conditioning  # R rows; a target shares its reference's prompt
    reference_generators: list  # R fresh per-sample generators: each reference regenerates unchanged
    base_generators: list  # B fresh per-sample generators (consumed): each target starts from its base's x_T
    guide: torch.Tensor  # (B,) long: the reference row of each target
    item_weights: torch.Tensor  # (R, I, 77): each reference prompt's object tokens (`masks.item_selection`)
    item_thresholds: torch.Tensor  # (R, I)


@dataclass
class FusedSamples:
    targets: Trajectories
    references: Trajectories
    bases: Trajectories | None  # only with settings.base_pass
    reference_masks: torch.Tensor | None  # (R, T, I, g, g) bool: each object's mask at each step
    base_masks: torch.Tensor | None  # (B, T, I, g, g) bool, only with settings.base_pass
    fused: list  # (step index, block) of every fused self-attention call, in call order


def _copy_generators(generators):
    return [torch.Generator(g.device).set_state(g.get_state()) for g in generators]


def _stack_masks(masks):
    return torch.stack(masks, dim=1) if masks else None


def step_together(unet, scheduler, parts, sampler):
    """One UNet call that takes a DDIM step of several batches: parts [(Denoising, timestep, attention state)],
    each batch at its own timestep and with its own state (`attention.Split`)."""
    batches = [denoising for denoising, _, _ in parts]
    sizes = [len(d.generators) for d in batches]
    if len(parts) == 1:
        timesteps, state = parts[0][1], parts[0][2]
    else:
        timesteps = torch.cat([t.expand(size) for (_, t, _), size in zip(parts, sizes)])  # (B,): one per row
        state = Split([s for _, _, s in parts], sizes, sampler.cfg)
    noise = guided_noise(
        unet,
        torch.cat([d.latents[-1] for d in batches]),
        timesteps,
        Conditioning.cat([d.conditioning for d in batches]),
        Conditioning.cat([d.negative for d in batches]),
        sampler.guidance_scale,
        cfg=sampler.cfg,
        attention_kwargs={"fusion": state},
    )
    for (denoising, t, _), batch_noise in zip(parts, noise.split(sizes)):
        denoising.advance(scheduler, batch_noise, t, sampler)


@torch.no_grad()
def fused_sampling(unet, scheduler, batch, negative, settings, progress=False):
    """Make one target per base of `batch` (a FusionBatch): from the base's x_T, with its reference's
    self-attention fused in. negative: the one-row unconditional Conditioning."""
    sampler, num_steps = settings.sampler, settings.sampler.num_steps
    scheduler.set_timesteps(num_steps, device=unet.device)
    guide = batch.guide.to(unet.device)
    item_weights, item_thresholds = batch.item_weights.to(unet.device), batch.item_thresholds.to(unet.device)
    target_conditioning = batch.reference_conditioning[guide]
    references = Denoising(unet, batch.reference_generators, batch.reference_conditioning, negative)
    bases = (
        Denoising(unet, _copy_generators(batch.base_generators), target_conditioning, negative)
        if settings.base_pass else None
    )
    targets = Denoising(unet, batch.base_generators, target_conditioning, negative)
    injection = settings.injection
    with fusion_processors(unet, settings.mask_resolution) as layers:
        blocks = sorted({layer.block for layer in layers})

        def blocks_at(i):
            k_blocks = frozenset(b for b in blocks if injection.blends_k(i, num_steps, b))
            v_blocks = frozenset(b for b in blocks if injection.blends_v(i, num_steps, b))
            return k_blocks, v_blocks

        together = (lambda parts: step_together(unet, scheduler, parts, sampler)) if settings.one_call else None
        return fuse_steps(
            unet, scheduler, scheduler.timesteps, (sampler,), references, targets, bases, blocks_at, guide,
            item_weights, item_thresholds, settings.use_mask, sampler.cfg, progress, together,
        )


def fuse_steps(
    model, scheduler, timesteps, step_args, references, targets, bases, blocks_at, guide, item_weights,
    item_thresholds, use_mask, cfg, progress=False, together=None,
):
    """The steps of a fused sampling, for any model whose attention processors read `Record` and `Fuse`.

    references, targets, bases (or None): the batches on their way (`sampling.Denoising` or the like),
    stepped as `batch.step(model, scheduler, t, *step_args, attention_kwargs)`; blocks_at(i): the
    blocks (k_blocks, v_blocks) whose K, V the targets take from their references at step i; guide
    (B,), item_weights (R, I, tokens), item_thresholds (R, I): on the model's device. together(parts),
    when given, steps several batches in one call, parts [(batch, timestep, attention state)]: then
    the references' step i + 1 runs with the targets' step i (and the bases' step i).
    """
    reference_masks, base_masks, fused, records = [], [], [], {}

    def step(parts):
        if together is not None:
            return together(parts)
        for batch, t, state in parts:
            batch.step(model, scheduler, t, *step_args, {"fusion": state})

    def reference_step(i):
        """The references' step i, recording what the targets' step i takes."""
        k_blocks, v_blocks = blocks_at(i)
        records[i] = Record(k_blocks | v_blocks, keep_masks=use_mask, cfg=cfg)
        return references, timesteps[i], records[i]

    ahead = together is not None
    if ahead:
        step([reference_step(0)])
    for i, t in enumerate(tqdm(timesteps, desc="fused step", leave=False, disable=not progress)):
        if not ahead:
            step([reference_step(i)])
        reference, mask = records.pop(i), None  # the step's keys and values go after its targets' step
        if use_mask:
            reference_masks.append(object_masks(reference.cross_attention_map(), item_weights, item_thresholds))
            mask = union_mask(reference_masks[-1])
        target = Fuse(reference, guide, mask, *blocks_at(i))
        parts = [(targets, t, target)]
        if ahead and i + 1 < len(timesteps):
            parts.append(reference_step(i + 1))
        if bases is not None:
            base = Record(frozenset(), keep_masks=True, cfg=cfg)
            parts.append((bases, t, base))
        for call in [parts] if ahead else [[part] for part in parts]:
            step(call)
        fused += [(i, layer.block) for layer in target.fused]
        if bases is not None:
            base_masks.append(object_masks(base.cross_attention_map(), item_weights[guide], item_thresholds[guide]))
    return FusedSamples(
        targets.trajectories(timesteps),
        references.trajectories(timesteps),
        None if bases is None else bases.trajectories(timesteps),
        _stack_masks(reference_masks),
        _stack_masks(base_masks),
        fused,
    )
