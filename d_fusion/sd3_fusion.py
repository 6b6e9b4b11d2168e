"""Fused flow sampling on SD 3 / 3.5 (docs/METHOD.md §10): targets made from a base's noise whose
image-token keys and values borrow the reference's inside the reference's object mask.

The passes are those of `fusion.fused_sampling` and run in its loop (`fusion.fuse_steps`): per
step, one transformer pass over the distinct references (regenerated from their own generators,
unchanged) records the image-token keys and values of the blocks that fuse at this step and the
image-to-text attention of the mask blocks; one pass over the targets (from the base's x_1, with
the base's generator, so the same noise at every step) fuses them (`joint_attention`). The bases
are regenerated only when their masks are asked for (`base_pass`). The targets' trajectories and
log-probabilities are recorded as sampling records them.

An object's map is its tokens' image-to-text attention (softmax over the text keys alone),
averaged over heads and the mask blocks; its tokens are positions of the first CLIP tokenizer
(`masks.item_selection(models.tokenizer, ...)`: CLIP's 77 tokens come first in the text sequence,
T5's tokens are never object positions). Masks are thresholded and united as for SD 2.1
(`masks.object_masks`, `masks.union_mask`), on the transformer's image-token grid.
"""

import torch

from d_fusion.fusion import _copy_generators, fuse_steps
from d_fusion.injection import ComponentInjection
from d_fusion.joint_attention import block_range, default_fusion_blocks, default_mask_blocks, joint_fusion_processors
from d_fusion.sampling import Denoising
from d_fusion.sd3 import FLOW


def fusion_plan(settings, num_blocks):
    """Where to fuse (a `ComponentInjection` on step and block) and the mask blocks (lo, hi) of
    `fusion.FusionSettings`: the steps are the self-attention Q entry's of inject_t (with its flag),
    the blocks fusion.blocks (inject_l does not apply: a UNet's block numbers); K and V fuse alike."""
    blocks = block_range(settings.blocks, "fusion.blocks", num_blocks, default_fusion_blocks)
    mask_blocks = block_range(settings.mask_blocks, "fusion.mask_blocks", num_blocks, default_mask_blocks)
    self_q = settings.injection.self_q
    return ComponentInjection(self_q.enabled, self_q.t_range, blocks), mask_blocks


@torch.no_grad()
def fused_flow_sampling(models, batch, negative, settings, progress=False):
    """Make one target per base of `batch` (a `fusion.FusionBatch`): from the base's x_1, with its
    reference's image-token K/V fused in.

    batch.reference_conditioning: `sd3.encode_sd3_prompts` of the references (R rows; a target
    shares its reference's prompt); batch.item_weights (R, I, 77 + L): each reference prompt's
    objects (`masks.item_selection` with the first CLIP tokenizer and 77 + L tokens); negative: the
    empty prompt's; settings: `fusion.FusionSettings` (its sampler's noise_level, its blocks and
    mask_blocks, see `fusion_plan`). Returns `fusion.FusedSamples`.
    """
    transformer, scheduler, device, sampler = models.transformer, models.scheduler, models.device, settings.sampler
    timesteps = FLOW.set_timesteps(models, sampler.num_steps)
    guide = batch.guide.to(device)
    target_text = batch.reference_conditioning[guide]

    def denoising(generators, text):
        return Denoising(transformer, generators, text, negative, FLOW)

    references = denoising(batch.reference_generators, batch.reference_conditioning)
    bases = denoising(_copy_generators(batch.base_generators), target_text) if settings.base_pass else None
    targets = denoising(batch.base_generators, target_text)
    num_blocks = len(transformer.transformer_blocks)
    fusion, mask_blocks = fusion_plan(settings, num_blocks)

    def blocks_at(i):
        blocks = frozenset(b for b in range(num_blocks) if fusion.fuses(i, sampler.num_steps, b))
        return blocks, blocks  # keys and values alike

    with joint_fusion_processors(transformer, mask_blocks):
        return fuse_steps(
            transformer, scheduler, timesteps, (sampler,), references, targets, bases, blocks_at, guide,
            batch.item_weights.to(device), batch.item_thresholds.to(device), settings.use_mask, sampler.cfg, progress,
        )
