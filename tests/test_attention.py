import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from d_fusion.attention import Fuse, Record, attention_layers, fused_attention, fusion_processors
from d_fusion.errors import UserError
from d_fusion.tiny import build_unet


def direct_fused_attention(q, k, v, k_ref, v_ref, mask):
    """docs/METHOD.md §6.3 written out: K' = M K_r + (1 - M) K, V' likewise, softmax(Q K'^T / sqrt(d)) V'."""
    m = mask[:, None, :, None]
    key = m * k_ref + (1 - m) * k
    value = m * v_ref + (1 - m) * v
    probs = torch.softmax(q @ key.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return probs @ value


def qkv(batch=3, heads=2, nq=6, n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, d, generator=g)
    k, v, k_ref, v_ref = (torch.randn(batch, heads, n, d, generator=g) for _ in range(4))
    return q, k, v, k_ref, v_ref


def test_fused_attention_matches_the_formula():
    q, k, v, k_ref, v_ref = qkv()
    mask = (torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    torch.testing.assert_close(fused_attention(q, k, v, k_ref, v_ref, mask), direct_fused_attention(q, k, v, k_ref, v_ref, mask))


def test_empty_mask_is_plain_attention_and_full_mask_is_the_reference():
    q, k, v, k_ref, v_ref = qkv()
    plain = torch.nn.functional.scaled_dot_product_attention
    zeros, ones = torch.zeros(3, 6), torch.ones(3, 6)
    assert torch.equal(fused_attention(q, k, v, k_ref, v_ref, zeros), plain(q, k, v))
    torch.testing.assert_close(fused_attention(q, k, v, k_ref, v_ref, ones), plain(q, k_ref, v_ref))
    torch.testing.assert_close(fused_attention(q, k, v, k_ref, v_ref, None), plain(q, k_ref, v_ref))


def test_key_only_fusion_keeps_the_target_values():
    q, k, v, k_ref, v_ref = qkv()
    mask = torch.ones(3, 6)
    out = fused_attention(q, k, v, k_ref, v_ref, mask, fuse_k=True, fuse_v=False)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k_ref, v))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet().eval()


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, 77, 32, generator=g)


def test_layers_are_numbered_by_block_and_mask_layers_found_by_grid(unet):
    layers = {layer.name: layer for layer in attention_layers(unet)}
    blocks = {name.split(".attentions")[0]: layer.block for name, layer in layers.items()}
    assert blocks == {
        "down_blocks.0": 0, "down_blocks.1": 1, "down_blocks.2": 2, "mid_block": 3,
        "up_blocks.1": 4, "up_blocks.2": 5, "up_blocks.3": 6,
    }
    mask_layers = sorted(name for name, layer in layers.items() if layer.mask_layer)
    assert [n.split(".attentions")[0] for n in mask_layers] == ["down_blocks.2", "up_blocks.1", "up_blocks.1"]
    assert all(n.endswith("attn2.processor") for n in mask_layers)
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1.processor"].grid == 2
    with pytest.raises(UserError, match="mask_resolution = 3"):
        attention_layers(unet, 3)


def test_without_state_the_processors_are_the_models_own_attention(unet):
    x, embeds = unet_inputs()
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        own = unet(x, 500, encoder_hidden_states=embeds).sample
        with fusion_processors(unet) as layers:
            ours = unet(x, 500, encoder_hidden_states=embeds).sample
            every_block = frozenset(layer.block for layer in layers)
            record = Record(every_block, keep_masks=True, cfg=True)
            recording = unet(x, 500, encoder_hidden_states=embeds, cross_attention_kwargs={"fusion": record}).sample
        assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())  # put back
    torch.testing.assert_close(ours, own, rtol=0, atol=1e-5)
    torch.testing.assert_close(recording, own, rtol=0, atol=1e-5)
    assert set(record.keys) == {layer.name for layer in layers if layer.self_attention}
    assert record.probs_layers == 3 and record.cross_attention_map().shape == (1, 16, 77)  # cond half of 2 rows
    torch.testing.assert_close(record.cross_attention_map().sum(-1), torch.ones(1, 16))


def fuse_state(unet, x, embeds, mask, layers):
    """Record a reference pass over (x, embeds) and return a Fuse of every block guided by it."""
    blocks = frozenset(layer.block for layer in layers)
    record = Record(blocks, keep_masks=False, cfg=True)
    unet(x, 500, encoder_hidden_states=embeds, cross_attention_kwargs={"fusion": record})
    return Fuse(record, torch.tensor([0]), mask, blocks, blocks)


def test_fuse_pass_with_empty_mask_is_plain_and_its_mask_is_shared_by_both_cfg_halves(unet):
    x, embeds = unet_inputs(2, seed=1)  # [uncond; cond] of one reference
    y, _ = unet_inputs(2, seed=2)  # [uncond; cond] of one target
    with torch.no_grad(), fusion_processors(unet) as layers:
        plain = unet(y, 500, encoder_hidden_states=embeds).sample
        fuse = fuse_state(unet, x, embeds, torch.zeros(1, 4, 4), layers)
        empty = unet(y, 500, encoder_hidden_states=embeds, cross_attention_kwargs={"fusion": fuse}).sample
        mask = torch.zeros(1, 4, 4)
        mask[0, :2] = 1
        half = fuse_state(unet, x, embeds, mask, layers)
        rows = half.mask_at(8, 2)
        fused = unet(y, 500, encoder_hidden_states=embeds, cross_attention_kwargs={"fusion": half}).sample
    assert torch.equal(empty, plain)
    assert rows.shape == (2, 64) and torch.equal(rows[0], rows[1]) and rows[0].sum() == 32
    assert (fused - plain).abs().max() > 1e-3
    assert {layer.block for layer in fuse.fused} == {layer.block for layer in layers}


def test_processors_use_lora_adapters():
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = build_unet().eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # adapters start as no-ops; make them act
            param.data.normal_(0, 0.5)
    x, embeds = unet_inputs(2, seed=3)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        own = unet(x, 500, encoder_hidden_states=embeds).sample
        unet.disable_adapters()
        without = unet(x, 500, encoder_hidden_states=embeds).sample
        unet.enable_adapters()
        with fusion_processors(unet) as layers:
            fuse = fuse_state(unet, x, embeds, torch.zeros(1, 4, 4), layers)
            ours = unet(x, 500, encoder_hidden_states=embeds, cross_attention_kwargs={"fusion": fuse}).sample
    assert (own - without).abs().max() > 1e-3
    torch.testing.assert_close(ours, own, rtol=0, atol=1e-5)
