"""Joint-attention processors for SD 3 / 3.5: plain equals diffusers', record and fuse follow docs/METHOD.md §10."""

import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from d_fusion.attention import Fuse, Record
from d_fusion.errors import UserError
from d_fusion.joint_attention import (
    JointFusionAttnProcessor,
    JointLayer,
    block_range,
    default_fusion_blocks,
    default_mask_blocks,
    joint_attention_layers,
    joint_fusion_processors,
)
from d_fusion.tiny import SD3_JOINT_DIM, build_sd3_transformer

TEXT = 77 + 8  # text tokens of these tests: CLIP's 77 and 8 (zero) T5 tokens


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return build_sd3_transformer().eval()  # 4 blocks, 0 and 1 dual-attention, 3 drops its text


def inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT, SD3_JOINT_DIM, generator=g),
        pooled_projections=torch.randn(batch, 80, generator=g),
        timestep=torch.tensor([700.0] * batch),
    )


def run(transformer, state=None, **kwargs):
    kwargs = kwargs or inputs()
    return transformer(**kwargs, joint_attention_kwargs=None if state is None else {"fusion": state}).sample


def test_layers_are_numbered_by_block_with_attn2_in_dual_blocks(transformer):
    layers = joint_attention_layers(transformer, (1, 2))
    assert [(layer.block, layer.joint, layer.mask_layer) for layer in layers] == [
        (0, True, False), (0, False, False), (1, True, True), (1, False, False), (2, True, True), (3, True, False)
    ]
    assert layers[1].name == "transformer_blocks.0.attn2.processor"


def test_plain_and_recording_passes_equal_diffusers_joint_attention(transformer):
    assert all(isinstance(p, JointAttnProcessor2_0) for p in transformer.attn_processors.values())
    theirs = run(transformer)
    with joint_fusion_processors(transformer, (0, 3)):
        plain = run(transformer)
        recorded = run(transformer, Record(frozenset(range(4)), keep_masks=True, cfg=True))
    torch.testing.assert_close(plain, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(recorded, theirs, atol=1e-5, rtol=0)
    assert all(isinstance(p, JointAttnProcessor2_0) for p in transformer.attn_processors.values())  # restored


def attention_inputs(transformer, block, attention="attn"):
    """What the attention `attention` of `block` is called with in a plain pass (hooked)."""
    seen = {}
    module = getattr(transformer.transformer_blocks[block], attention)
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    run(transformer)
    hook.remove()
    return module, seen["hidden_states"], seen.get("encoder_hidden_states")


def heads(x, h=2):
    return x.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, N, h * d) -> (B, h, N, d)


def test_record_keeps_image_keys_values_and_text_renormalised_probabilities(transformer):
    record = Record(frozenset({0, 2}), keep_masks=True, cfg=True)
    with joint_fusion_processors(transformer, (1, 2)):
        run(transformer, record)
    assert set(record.keys) == {"transformer_blocks.0.attn.processor", "transformer_blocks.0.attn2.processor",
                                "transformer_blocks.2.attn.processor"}
    attn, x, context = attention_inputs(transformer, 0, "attn2")
    torch.testing.assert_close(record.keys["transformer_blocks.0.attn2.processor"], attn.norm_k(heads(attn.to_k(x))))
    torch.testing.assert_close(record.values["transformer_blocks.0.attn2.processor"], heads(attn.to_v(x)))

    expected = 0
    for block in (1, 2):  # the joint probabilities' image-query, text-key block, renormalised per row
        attn, x, context = attention_inputs(transformer, block)
        q = torch.cat([attn.norm_q(heads(attn.to_q(x))), attn.norm_added_q(heads(attn.add_q_proj(context)))], dim=2)
        k = torch.cat([attn.norm_k(heads(attn.to_k(x))), attn.norm_added_k(heads(attn.add_k_proj(context)))], dim=2)
        joint = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)[1:, :, :64, 64:]  # cond row, image -> text
        expected = expected + (joint / joint.sum(-1, keepdim=True)).mean(1) / 2
    assert record.probs_layers == 2
    torch.testing.assert_close(record.cross_attention_map(), expected, atol=1e-6, rtol=1e-5)


def processor_call(attn, layer, x, context, state):
    return JointFusionAttnProcessor(layer)(attn, x, context, fusion=state)


def direct_fused_joint_attention(attn, x, context, k_ref, v_ref, mask):
    """docs/METHOD.md §10 written out: image K/V blended under M, text K/V and every query the target's own."""
    m = mask[:, None, :, None]
    k = m * k_ref + (1 - m) * attn.norm_k(heads(attn.to_k(x)))
    v = m * v_ref + (1 - m) * heads(attn.to_v(x))
    q = torch.cat([attn.norm_q(heads(attn.to_q(x))), attn.norm_added_q(heads(attn.add_q_proj(context)))], dim=2)
    k = torch.cat([k, attn.norm_added_k(heads(attn.add_k_proj(context)))], dim=2)
    v = torch.cat([v, heads(attn.add_v_proj(context))], dim=2)
    out = (torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v).transpose(1, 2).flatten(2)
    return attn.to_out[0](out[:, :64]), attn.to_add_out(out[:, 64:])


def test_fuse_blends_image_keys_values_under_the_mask_and_keeps_text_and_queries(transformer):
    attn, layer = transformer.transformer_blocks[1].attn, JointLayer("transformer_blocks.1.attn.processor", 1, True, False)
    g = torch.Generator().manual_seed(3)
    ref_x, x = torch.randn(2, 64, 16, generator=g), torch.randn(4, 64, 16, generator=g)  # CFG rows [uncond; cond]
    ref_context, context = torch.randn(2, TEXT, 16, generator=g), torch.randn(4, TEXT, 16, generator=g)
    reference = Record(frozenset({1}), keep_masks=False, cfg=True)
    processor_call(attn, layer, ref_x, ref_context, reference)
    mask = (torch.rand(1, 8, 8, generator=g) > 0.5).float()
    fused = processor_call(attn, layer, x, context, Fuse(reference, torch.tensor([0, 0]), mask, frozenset({1}), frozenset({1})))
    k_ref = attn.norm_k(heads(attn.to_k(ref_x)))[[0, 0, 1, 1]]  # each target row's reference row, CFG half by half
    v_ref = heads(attn.to_v(ref_x))[[0, 0, 1, 1]]
    expected = direct_fused_joint_attention(attn, x, context, k_ref, v_ref, mask.flatten(1).expand(4, -1))
    for ours, theirs in zip(fused, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    zero = Fuse(reference, torch.tensor([0, 0]), torch.zeros(1, 8, 8), frozenset({1}), frozenset({1}))
    for ours, theirs in zip(processor_call(attn, layer, x, context, zero), processor_call(attn, layer, x, context, None)):
        assert torch.equal(ours, theirs)


def test_attn2_fuses_with_its_block(transformer):
    attn, layer = transformer.transformer_blocks[0].attn2, JointLayer("transformer_blocks.0.attn2.processor", 0, False, False)
    g = torch.Generator().manual_seed(4)
    ref_x, x = torch.randn(2, 64, 16, generator=g), torch.randn(2, 64, 16, generator=g)
    reference = Record(frozenset({0}), keep_masks=False, cfg=False)
    processor_call(attn, layer, ref_x, None, reference)
    fused = processor_call(attn, layer, x, None, Fuse(reference, torch.tensor([1, 0]), None, frozenset({0}), frozenset({0})))
    q, k, v = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(ref_x))), heads(attn.to_v(ref_x))
    out = torch.softmax(q @ k[[1, 0]].transpose(-1, -2) / 8**0.5, dim=-1) @ v[[1, 0]]
    torch.testing.assert_close(fused, attn.to_out[0](out.transpose(1, 2).flatten(2)), atol=1e-5, rtol=0)


def test_block_defaults_and_ranges():
    assert default_fusion_blocks(24) == (12, 23) and default_mask_blocks(24) == (8, 15)  # SD 3.5 Medium
    assert default_fusion_blocks(38) == (19, 37) and default_mask_blocks(38) == (12, 24)  # SD 3.5 Large
    assert default_mask_blocks(4) == (1, 1)
    assert block_range("", "fusion.blocks", 24, default_fusion_blocks) == (12, 23)
    assert block_range("0-3", "fusion.blocks", 24, default_fusion_blocks) == (0, 3)
    with pytest.raises(UserError, match="blocks 0-23"):
        block_range("20-24", "fusion.mask_blocks", 24, default_mask_blocks)


def test_sd35_medium_layer_pattern_under_the_default_blocks():
    """SD 3.5 Medium's pattern (24 blocks, the first 13 dual-attention), narrow: what the defaults fuse and read."""
    medium = build_sd3_transformer(num_layers=24, dual_attention_layers=tuple(range(13)))
    fused = range(default_fusion_blocks(24)[0], default_fusion_blocks(24)[1] + 1)
    layers = joint_attention_layers(medium, default_mask_blocks(24))
    assert len(layers) == 24 + 13
    assert [layer.name for layer in layers if layer.block in fused and not layer.joint] == [
        "transformer_blocks.12.attn2.processor"
    ]
    assert [layer.block for layer in layers if layer.mask_layer] == list(range(8, 16))
