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

from dataclasses import dataclass

import torch

from d_fusion.fusion import _copy_generators, fuse_steps
from d_fusion.injection import ComponentInjection
from d_fusion.joint_attention import block_range, default_fusion_blocks, default_mask_blocks, joint_fusion_processors
from d_fusion.sd3 import FlowDenoising, set_flow_timesteps


@dataclass(frozen=True)
class JointFusionSettings:
    num_steps: int
    noise_level: float  # sample.noise_level
    guidance_scale: float
    fused_steps: tuple | None  # (lo, hi): step i fuses where lo <= num_steps - 1 - i < hi (inject_t); None: never
    blocks: str = ""  # fusion.blocks, "lo-hi" inclusive; "": the second half of the blocks
    mask_blocks: str = ""  # fusion.mask_blocks; "": the middle third
    cfg: bool = True
    use_mask: bool = True  # False: K' = K_ref, V' = V_ref on every image token
    base_pass: bool = False  # also regenerate the bases (for their masks)

    def plan(self, num_blocks):
        """Where to fuse (a `ComponentInjection` on step and block) and the mask blocks (lo, hi)."""
        blocks = block_range(self.blocks, "fusion.blocks", num_blocks, default_fusion_blocks)
        mask_blocks = block_range(self.mask_blocks, "fusion.mask_blocks", num_blocks, default_mask_blocks)
        return ComponentInjection(True, self.fused_steps, blocks), mask_blocks


@torch.no_grad()
def fused_flow_sampling(
    models, reference_text, negative, reference_generators, base_generators, guide, item_weights, item_thresholds,
    settings, progress=False,
):
    """Make one target per base: from the base's x_1, with its reference's image-token K/V fused in.

    reference_text: `sd3.TextConditioning` of the references (R rows; a target shares its
    reference's prompt); negative: that of the empty prompt; reference_generators: R fresh
    per-sample generators; base_generators: B fresh per-sample generators (they are consumed);
    guide: (B,) long, the reference row of each target; item_weights (R, I, 77 + L) and
    item_thresholds (R, I): each reference prompt's objects (`masks.item_selection` with the first
    CLIP tokenizer and 77 + L tokens). Returns `fusion.FusedSamples`.
    """
    transformer, scheduler, device = models.transformer, models.scheduler, models.device
    timesteps = set_flow_timesteps(scheduler, transformer, settings.num_steps, device)
    guide = guide.to(device)
    target_text = reference_text[guide]
    references = FlowDenoising(models, reference_generators, reference_text, negative)
    bases = FlowDenoising(models, _copy_generators(base_generators), target_text, negative) if settings.base_pass else None
    targets = FlowDenoising(models, base_generators, target_text, negative)
    fusion, mask_blocks = settings.plan(len(transformer.transformer_blocks))

    def blocks_at(i):
        blocks = frozenset(b for b in range(len(transformer.transformer_blocks)) if fusion.fuses(i, settings.num_steps, b))
        return blocks, blocks  # keys and values alike

    with joint_fusion_processors(transformer, mask_blocks):
        return fuse_steps(
            transformer, scheduler, timesteps, (settings.noise_level, settings.guidance_scale, settings.cfg),
            references, targets, bases, blocks_at, guide, item_weights.to(device), item_thresholds.to(device),
            settings.use_mask, settings.cfg, progress,
        )
