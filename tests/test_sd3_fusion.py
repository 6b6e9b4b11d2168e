"""Fused flow sampling on the tiny SD 3.5: passes regenerate, masks come from the mask blocks, fusion acts as docs/METHOD.md §10."""

import pytest
import torch

from d_fusion.attention import Record
from d_fusion.fusion import FusionBatch, FusionSettings
from d_fusion.injection import ComponentInjection, Injection
from d_fusion.joint_attention import JointFusionAttnProcessor, joint_fusion_processors
from d_fusion.masks import PromptObjects, item_selection, object_masks
from d_fusion.sampling import sample_generators, sample_trajectories
from d_fusion.sd3 import encode_sd3_prompts, guided_velocity
from d_fusion.sd3_fusion import fused_flow_sampling
from tests.test_sampling import assert_equal_to_fp32_precision
from tests.test_sd3 import flow_sampler

PROMPT = "a dog driving a car"
STEPS = 4
ALL_STEPS = (0, STEPS)  # every step fuses: 0 <= STEPS - 1 - i < STEPS


def settings(fused_steps=ALL_STEPS, **kwargs):
    """FusionSettings on SD 3: `fused_steps` is inject_t's entry (every component's), kwargs FusionSettings'."""
    injection = Injection(*[ComponentInjection(True, fused_steps, None)] * 6)
    return FusionSettings(injection, flow_sampler(num_steps=STEPS), **kwargs)


def generators(indices):
    return sample_generators(42, 0, 8, indices)


def objects(models, thresholds, references=1):
    """Words 1 and 4 ("dog", "car"), at positions of the first CLIP tokenizer among the 77 + 256 text tokens
    (a uniform map is 1/333 = 0.003 a token)."""
    return item_selection(models.tokenizer, [PROMPT] * references, {PROMPT: PromptObjects((1, 4), thresholds)}, 77 + 256)


def fuse(models, fusion_settings, thresholds=(0.003, 0.003), references=(0,), bases=(5, 6), guide=(0, 0)):
    weights, item_thresholds = objects(models, thresholds, len(references))
    batch = FusionBatch(
        encode_sd3_prompts(models, [PROMPT] * len(references)), generators(references), generators(bases),
        torch.tensor(guide), weights, item_thresholds,
    )
    return fused_flow_sampling(models, batch, encode_sd3_prompts(models, [""]), fusion_settings)


def stored(models, indices):
    """Trajectories of `indices` as sampling makes them."""
    return sample_trajectories(
        models, encode_sd3_prompts(models, [PROMPT] * len(indices)), encode_sd3_prompts(models, [""]),
        generators(indices), flow_sampler(), progress=False,
    )


def test_regenerated_reference_and_base_equal_their_stored_trajectories(tiny_sd3):
    result = fuse(tiny_sd3, settings(base_pass=True))
    reference, bases = stored(tiny_sd3, [0]), stored(tiny_sd3, [5, 6])
    for ours, theirs in ((result.references, reference), (result.bases, bases)):
        assert_equal_to_fp32_precision(ours.latents, theirs.latents)
        assert_equal_to_fp32_precision(ours.log_probs, theirs.log_probs)
    assert torch.equal(result.targets.latents[:, 0], bases.latents[:, 0])  # the base's noise
    assert (result.targets.latents[:, -1] - bases.latents[:, -1]).abs().max() > 1e-3
    assert result.targets.log_probs.shape == (2, STEPS) and torch.isfinite(result.targets.log_probs).all()
    assert result.reference_masks.shape == (1, STEPS, 2, 8, 8) and result.base_masks.shape == (2, STEPS, 2, 8, 8)


def test_masks_are_the_mask_blocks_text_attention_at_the_objects_clip_tokens(tiny_sd3):
    result = fuse(tiny_sd3, settings(mask_blocks="1-2"))
    fraction = result.reference_masks.float().mean(dim=(-1, -2))
    assert ((fraction > 0) & (fraction < 1)).any(), "the test needs masks that are neither empty nor full"
    reference = result.references
    weights, thresholds = objects(tiny_sd3, (0.003, 0.003))
    assert weights[0, :, :77].nonzero()[:, 1].tolist() == [2, 5] and weights[0, :, 77:].sum() == 0
    text, negative = encode_sd3_prompts(tiny_sd3, [PROMPT]), encode_sd3_prompts(tiny_sd3, [""])
    with joint_fusion_processors(tiny_sd3.transformer, (1, 2)):
        for i, t in enumerate(reference.timesteps):  # a plain pass on the reference's latents, recorded
            record = Record(frozenset(), keep_masks=True, cfg=True)
            guided_velocity(tiny_sd3.transformer, reference.latents[:, i], t, text, negative, 5.0, True, {"fusion": record})
            assert torch.equal(object_masks(record.cross_attention_map(), weights, thresholds), result.reference_masks[:, i])


@pytest.mark.parametrize("fusion_settings, thresholds", [
    (settings(base_pass=True), (float("inf"), float("inf"))),  # all-zero masks
    (settings(base_pass=True, fused_steps=None), (0.0, 0.0)),  # no step fuses
])
def test_target_equals_base_without_fusion(tiny_sd3, fusion_settings, thresholds):
    result = fuse(tiny_sd3, fusion_settings, thresholds=thresholds)
    assert torch.equal(result.targets.latents, result.bases.latents)
    assert torch.equal(result.targets.log_probs, result.bases.log_probs)


def test_full_mask_and_range_give_every_fused_layer_the_references_image_keys_values(tiny_sd3, monkeypatch):
    seen = []
    fuse_kv = JointFusionAttnProcessor.fuse

    def watched(self, k, v, fusion):
        fused_k, fused_v = fuse_kv(self, k, v, fusion)
        rows = fusion.reference_rows(k.shape[0], fusion.reference.keys[self.layer.name].shape[0])
        seen.append((self.layer, torch.equal(fused_k, fusion.reference.keys[self.layer.name][rows]),
                     torch.equal(fused_v, fusion.reference.values[self.layer.name][rows]), torch.equal(fused_k, k)))
        return fused_k, fused_v

    monkeypatch.setattr(JointFusionAttnProcessor, "fuse", watched)
    full_mask = fuse(tiny_sd3, settings(blocks="0-3"), thresholds=(0.0, 0.0), references=(0, 1), bases=(4, 5, 6, 7),
                     guide=(0, 0, 1, 1))
    # 6 attentions a step (attn of blocks 0-3, attn2 of the dual-attention blocks 0 and 1)
    assert len(seen) == 6 * STEPS and {(layer.block, layer.joint) for layer, *_ in seen} == {
        (0, True), (0, False), (1, True), (1, False), (2, True), (3, True)
    }
    assert all(k_is_ref and v_is_ref and not k_is_own for _, k_is_ref, v_is_ref, k_is_own in seen)
    assert full_mask.fused == [(i, b) for i in range(STEPS) for b in (0, 0, 1, 1, 2, 3)]
    monkeypatch.undo()
    no_mask = fuse(tiny_sd3, settings(blocks="0-3", use_mask=False), references=(0, 1), bases=(4, 5, 6, 7),
                   guide=(0, 0, 1, 1))
    assert torch.equal(full_mask.targets.latents, no_mask.targets.latents)  # a full mask is K' = K_r, V' = V_r


def test_fusion_happens_at_the_chosen_steps_and_blocks(tiny_sd3):
    result = fuse(tiny_sd3, settings(fused_steps=(0, 2), blocks="1-2"))  # steps i with 3 - i < 2: 2 and 3
    assert result.fused == [(i, b) for i in (2, 3) for b in (1, 1, 2)]
    default = fuse(tiny_sd3, settings())  # the second half of the 4 blocks
    assert default.fused == [(i, b) for i in range(STEPS) for b in (2, 3)]
