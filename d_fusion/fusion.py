"""Fused sampling: targets made from a base's noise with a reference's self-attention (docs/METHOD.md §6.5).

Per step, one UNet pass over the distinct references (regenerated from their own generators,
unchanged) records the keys and values of the self-attention layers that fuse at this step and
the reference's cross-attention object mask; one pass over the targets (from the base's x_T, with
the base's generator) fuses them. Each reference guides two targets, so a step costs 1.5 UNet
passes per target. The base's trajectory is already stored from sampling: its pass runs only
when its masks are asked for (`fusion.base_masks`). Only the current step's keys and values are
kept.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from d_fusion.attention import Fuse, Record, fusion_processors
from d_fusion.families import Conditioning
from d_fusion.injection import Injection
from d_fusion.masks import object_masks, union_mask
from d_fusion.sampling import Denoising, SamplerSettings, Trajectories


@dataclass(frozen=True)
class FusionSettings:
    injection: Injection  # which steps and blocks blend the reference's K and V
    sampler: SamplerSettings  # the references', bases' and targets' denoising (the sampling's own)
    mask_resolution: int = 0  # grid of the mask layers; 0: latent side // 4
    use_mask: bool = True  # False: K' = K_ref, V' = V_ref everywhere
    base_pass: bool = False  # also regenerate the bases (for their masks)
    blocks: str = ""  # SD 3's fused blocks (fusion.blocks, d_fusion/sd3_fusion.py); "": the default
    mask_blocks: str = ""  # SD 3's mask blocks (fusion.mask_blocks); "": the default


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

        return fuse_steps(
            unet, scheduler, scheduler.timesteps, (sampler,), references, targets, bases, blocks_at, guide,
            item_weights, item_thresholds, settings.use_mask, sampler.cfg, progress,
        )


def fuse_steps(
    model, scheduler, timesteps, step_args, references, targets, bases, blocks_at, guide, item_weights,
    item_thresholds, use_mask, cfg, progress=False,
):
    """The steps of a fused sampling, for any model whose attention processors read `Record` and `Fuse`.

    references, targets, bases (or None): the batches on their way (`sampling.Denoising` or the like),
    stepped as `batch.step(model, scheduler, t, *step_args, attention_kwargs)`; blocks_at(i): the
    blocks (k_blocks, v_blocks) whose K, V the targets take from their references at step i; guide
    (B,), item_weights (R, I, tokens), item_thresholds (R, I): on the model's device.
    """
    reference_masks, base_masks, fused = [], [], []
    for i, t in enumerate(tqdm(timesteps, desc="fused step", leave=False, disable=not progress)):
        k_blocks, v_blocks = blocks_at(i)
        reference = Record(k_blocks | v_blocks, keep_masks=use_mask, cfg=cfg)
        references.step(model, scheduler, t, *step_args, {"fusion": reference})
        mask = None
        if use_mask:
            reference_masks.append(object_masks(reference.cross_attention_map(), item_weights, item_thresholds))
            mask = union_mask(reference_masks[-1])
        target = Fuse(reference, guide, mask, k_blocks, v_blocks)
        targets.step(model, scheduler, t, *step_args, {"fusion": target})
        fused += [(i, layer.block) for layer in target.fused]
        if bases is not None:
            base = Record(frozenset(), keep_masks=True, cfg=cfg)
            bases.step(model, scheduler, t, *step_args, {"fusion": base})
            base_masks.append(object_masks(base.cross_attention_map(), item_weights[guide], item_thresholds[guide]))
        del reference, target  # the step's keys and values go
    return FusedSamples(
        targets.trajectories(timesteps),
        references.trajectories(timesteps),
        None if bases is None else bases.trajectories(timesteps),
        _stack_masks(reference_masks),
        _stack_masks(base_masks),
        fused,
    )
